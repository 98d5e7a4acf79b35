"""`python -m stipple_validator`: read settings from STIPPLE_* variables and run."""

from stipple_common import eventloop
from stipple_common.settings import load_settings

from .service import ValidatorSettings, run


def main() -> None:
    settings = load_settings(ValidatorSettings)
    eventloop.run(run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
