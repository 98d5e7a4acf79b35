"""`python -m stipple_chain_indexer`: settings from STIPPLE_* variables, then run."""

from stipple_common import eventloop
from stipple_common.settings import load_settings

from .service import IndexerSettings, run


def main() -> None:
    settings = load_settings(IndexerSettings)
    eventloop.run(run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
