"""`python -m stipple_gateway`: read settings from STIPPLE_* variables and run."""

import asyncio

from stipple_common.settings import load_settings

from .app import GatewaySettings
from .service import run


def main() -> None:
    asyncio.run(run(load_settings(GatewaySettings)))


if __name__ == "__main__":
    main()
