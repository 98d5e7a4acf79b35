"""`python -m stipple_dispatcher`: read settings from STIPPLE_* variables and run."""

from stipple_common import eventloop
from stipple_common.settings import load_settings

from .service import DispatcherSettings, run


def main() -> None:
    settings = load_settings(DispatcherSettings)
    eventloop.run(run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
