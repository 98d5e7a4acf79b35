"""`stipple-node`: run the node agent (default), or build the built-in tiny model.

stipple-node                         # run, settings from STIPPLE_* variables
stipple-node make-tiny-model DIR     # build the tiny SD model into DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stipple_common import eventloop
from stipple_common.errors import StippleError
from stipple_common.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stipple-node", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the node agent (settings from STIPPLE_* environment variables)")
    tiny = sub.add_parser("make-tiny-model", help="build the built-in tiny Stable Diffusion model")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "make-tiny-model":
            from .tinymodel import make_tiny_model

            path = make_tiny_model(args.directory, seed=args.seed)
            print(path)
            return
        from .service import NodeSettings, run

        settings = load_settings(NodeSettings)
        eventloop.run(run(settings), settings.event_loop)
    except StippleError as exc:
        print(f"stipple-node: {exc.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
