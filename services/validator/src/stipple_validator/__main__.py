"""`python -m stipple_validator`: read settings from STIPPLE_* variables and run."""

import asyncio

from stipple_common.settings import load_settings

from .service import ValidatorSettings, run


def main() -> None:
    asyncio.run(run(load_settings(ValidatorSettings)))


if __name__ == "__main__":
    main()
