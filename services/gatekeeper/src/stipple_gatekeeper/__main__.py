"""`python -m stipple_gatekeeper`: read settings from STIPPLE_* variables and run;
`python -m stipple_gatekeeper keys` prints a new issuer and callout key pair."""

import asyncio
import sys

from stipple_common.settings import load_settings

from .service import GatekeeperSettings, run


def main() -> None:
    if sys.argv[1:] == ["keys"]:
        from .jwt import new_keys

        for name, value in new_keys().items():
            print(f"{name}={value}")
        return
    asyncio.run(run(load_settings(GatekeeperSettings)))


if __name__ == "__main__":
    main()
