"""`python -m stipple_dispatcher`: read settings from STIPPLE_* variables and run."""

import asyncio

from stipple_common.settings import load_settings

from .service import DispatcherSettings, run


def main() -> None:
    asyncio.run(run(load_settings(DispatcherSettings)))


if __name__ == "__main__":
    main()
