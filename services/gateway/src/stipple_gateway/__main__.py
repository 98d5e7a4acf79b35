"""`python -m stipple_gateway`: read settings from STIPPLE_* variables and run."""

from stipple_common import eventloop
from stipple_common.settings import load_settings

from .service import run
from .settings import GatewaySettings


def main() -> None:
    settings = load_settings(GatewaySettings)
    eventloop.run(run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
