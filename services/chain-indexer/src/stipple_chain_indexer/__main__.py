"""`python -m stipple_chain_indexer`: settings from STIPPLE_* variables, then run."""

import asyncio

from stipple_common.settings import load_settings

from .service import IndexerSettings, run


def main() -> None:
    asyncio.run(run(load_settings(IndexerSettings)))


if __name__ == "__main__":
    main()
