"""`python -m stipple_gatekeeper`: read settings from STIPPLE_* variables and run;
`python -m stipple_gatekeeper keys` prints a new issuer and callout key pair."""

import sys

from stipple_common import eventloop
from stipple_common.settings import load_settings

from .service import GatekeeperSettings, run


def main() -> None:
    if sys.argv[1:] == ["keys"]:
        from .jwt import new_keys

        for name, value in new_keys().items():
            print(f"{name}={value}")
        return
    settings = load_settings(GatekeeperSettings)
    eventloop.run(run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
