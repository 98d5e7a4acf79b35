"""`python -m stipple_gateway`: read settings from STIPPLE_* variables and run."""

import asyncio

from stipple_common.settings import load_settings

from .service import run
from .settings import GatewaySettings


def main() -> None:
    asyncio.run(run(load_settings(GatewaySettings)))


if __name__ == "__main__":
    main()
