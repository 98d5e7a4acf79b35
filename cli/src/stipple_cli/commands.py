"""`stipple generate`, `stipple task` and `stipple nodes`: the gateway's native API from a
terminal, through the Python SDK (stipple_client), as any app would use it.

    stipple generate "a red fox" --steps 8 --num-images 2     # a progress bar per node, then the PNGs
    stipple task 3f2a...  [--watch] [--json]                  # status, nodes, outcome, image URLs
    stipple nodes [--json]                                    # node id, operator, stake, models, live

The gateway is `--gateway`, else $STIPPLE_GATEWAY_URL, else the network `stipple up` runs
(its state file, state.py), else http://127.0.0.1:8080; the API key `--api-key`, else
$STIPPLE_API_KEY. Exit status: 0 done; 1 the task failed (aborted, cancelled) or the gateway
could not answer; 2 the gateway refused the input (the message names the field and value).

Progress is drawn with rich on stderr, one bar per node from the events stream's
``progress`` events (steps done of the total), so stdout keeps only the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from stipple_client import Client, Event, StippleError, Task, TaskFailed, Unavailable

from . import state

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class CommandError(Exception):
    """A refusal of the command's own (before the gateway is asked), with its exit status."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- progress


class NodeBars:
    """A progress bar per node of a task, fed with its events (`feed`); drawn on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[node]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.bars: dict[str, TaskID] = {}

    def __enter__(self) -> NodeBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _bar(self, node_id: str) -> TaskID:
        if node_id not in self.bars:
            self.bars[node_id] = self.progress.add_task("", total=None, node=_short(node_id), status="assigned")
        return self.bars[node_id]

    def _set(self, node_id: str, **changes: Any) -> None:
        self.progress.update(self._bar(node_id), **changes)

    def feed(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        node = str(data.get("node_id", ""))
        if event.type == "assigned":
            for node_id in data.get("nodes", []):
                self._bar(str(node_id))
        elif event.type == "reassigned":
            self._set(str(data.get("replaced", "")), status=f"replaced ({data.get('reason', '')})")
            self._bar(str(data.get("by", "")))
        elif event.type == "progress" and node:
            self._set(node, completed=int(data.get("step", 0)), total=int(data.get("total", 0)) or None, status="")
        elif event.type == "started" and node:
            self._set(node, status="running")
        elif event.type == "committed" and node:
            bar = self.progress.tasks[self._bar(node)]
            done = bar.total if bar.total is not None else bar.completed
            self._set(node, completed=done, status="committed")
        elif event.type == "revealed" and node:
            self._set(node, status="revealed")
        elif event.type == "errored" and node:
            self._set(node, status=f"errored: {data.get('code', '')}")


def _short(node_id: str) -> str:
    return f"{node_id[:10]}…{node_id[-4:]}" if len(node_id) > 16 else node_id


def follow(client: Client, task_id: str, console: Console | None = None) -> Task:
    """Draw the task's events until its outcome; its final view."""
    with NodeBars(console) as bars:
        for event in client.events(task_id):
            bars.feed(event)
    return client.get(task_id)


# ---------------------------------------------------------------- generate


def image_paths(task_id: str, count: int, output: Path | None) -> list[Path]:
    """Where the `count` images go: `output` for one; output-1.png, output-2.png, ... for several
    (the suffix kept when it has one); by default stipple-<task id>-<n>.png in the working folder."""
    if output is None:
        return [Path(f"stipple-{task_id}-{n}.png") for n in range(1, count + 1)]
    if count == 1:
        return [output]
    suffix = output.suffix or ".png"
    stem = output.with_suffix("") if output.suffix else output
    return [stem.with_name(f"{stem.name}-{n}{suffix}") for n in range(1, count + 1)]


def default_model(client: Client) -> str:
    """The model the most live nodes serve (said on stderr), when --model is not given."""
    counts: dict[str, int] = {}
    for node in client.nodes():
        if node.live:
            for model in node.models:
                counts[model] = counts.get(model, 0) + 1
    if not counts:
        raise CommandError("--model: not given, and no live node serves a model to take by default", EXIT_FAILED)
    model = max(sorted(counts), key=lambda m: counts[m])
    others = f" (also served: {', '.join(m for m in sorted(counts) if m != model)})" if len(counts) > 1 else ""
    print(f"stipple generate: model {model}, the live nodes' model{others}; --model to choose", file=sys.stderr)
    return model


def generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    model = args.model or os.environ.get("STIPPLE_MODEL") or default_model(client)
    submitted = client.submit(
        args.prompt,
        model=model,
        width=args.width,
        height=args.height,
        steps=args.steps,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
    )
    print(f"stipple generate: task {submitted.task_id} (seed {submitted.seed})", file=sys.stderr)
    task = follow(client, submitted.task_id)
    if task.status != "succeeded":
        raise TaskFailed(task)
    paths = image_paths(task.task_id, len(task.images), args.output)
    print(f"task {task.task_id} {task.status} ({task.outcome.reason if task.outcome else ''})", file=out)
    for image, path in zip(task.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.image(task.task_id, image.index))
        print(f"{path}  seed {image.seed}  {image.width}x{image.height}", file=out)
    return 0


# ---------------------------------------------------------------- task


def show_task(task: Task, gateway: str, out: TextIO) -> None:
    raw = task.raw
    spec = task.spec
    config = spec.get("task_config") or {}
    model = spec.get("base_model")
    model = model.get("name") if isinstance(model, dict) else model
    submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(task.submitted_at))
    print(f"task     {task.task_id}\nstatus   {task.status}", file=out)
    print(f"         submitted {submitted} ({task.source}), fee {raw.get('fee', 0)}", file=out)
    print(f"prompt   {spec.get('prompt', '')!r}", file=out)
    shape = f"{config.get('image_width')}x{config.get('image_height')}, {config.get('steps')} steps"
    print(f"model    {model}, {shape}, seed {task.seed}, {config.get('num_images', 1)} image(s)", file=out)
    if task.queue is not None:
        q = task.queue
        print(f"queue    position {q.position} of {q.queue_length}, about {q.eta_s:.0f} s", file=out)
    verdicts = task.outcome.verdicts if task.outcome else {}
    if task.nodes:
        print("nodes", file=out)
    for node in task.nodes:
        node_id = str(node.get("node_id", ""))
        progress = node.get("progress") or {}
        steps = f"step {progress.get('step')}/{progress.get('total')}" if progress else ""
        error = node.get("error") or {}
        parts = [
            str(node.get("status", "")),
            steps,
            f"commit #{node['commit_order']}" if node.get("commit_order") else "",
            f"verdict {verdicts[node_id]}" if node_id in verdicts else "",
            f"error {error.get('code')}: {error.get('message')}" if error else "",
        ]
        print(f"  {node_id}  " + ", ".join(p for p in parts if p), file=out)
    if task.outcome is not None:
        outcome = task.outcome
        detail = f": {outcome.detail}" if outcome.detail else ""
        print(f"outcome  {outcome.status} ({outcome.reason}){detail}", file=out)
    if task.images:
        print("images", file=out)
    for image in task.images:
        url = image.url if "://" in image.url else gateway.rstrip("/") + image.url
        print(f"  {image.index}  {url}  seed {image.seed}  {image.width}x{image.height}", file=out)


def task(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    view = follow(client, args.task_id) if args.watch else client.get(args.task_id)
    if args.json:
        print(json.dumps(view.raw, indent=2), file=out)
    else:
        show_task(view, args.gateway, out)
    return EXIT_FAILED if args.watch and view.status != "succeeded" else 0


# ---------------------------------------------------------------- nodes


TOKEN = 10**18


def nodes(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    found = client.nodes()
    if args.json:
        print(json.dumps([dataclasses.asdict(n) for n in found], indent=2), file=out)
        return 0
    rows = [("NODE", "OPERATOR", "STAKE", "MODELS", "LIVE")]
    for n in sorted(found, key=lambda n: (not n.live, n.node_id)):
        operator = "self" if n.operator in ("", n.node_id) else n.operator
        live = "live" if n.live else f"last seen {n.last_seen_s_ago:.0f} s ago"
        rows.append((n.node_id, operator, f"{n.stake / TOKEN:g}", ",".join(n.models), live))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4], file=out)
    print(f"{sum(n.live for n in found)} live of {len(found)}", file=out)
    return 0


# ---------------------------------------------------------------- the command


def _whole(text: str) -> int:
    """An int; its range is the gateway's to check (so that its answer names the field)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stipple", description="The gateway's API from a terminal.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway",
        default=None,
        help="the gateway's URL (env STIPPLE_GATEWAY_URL; default: the network `stipple up` runs, "
        f"else {state.DEFAULT_GATEWAY_URL})",
    )
    common.add_argument("--api-key", default=None, help="the API key (env STIPPLE_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate",
        parents=[common],
        help="make images, with a progress bar per node",
        description="Submit a text-to-image task, show each node's progress, and write the PNGs. Exit 0 when "
        "written, 1 when the task failed, 2 when the gateway refused the input.",
    )
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="base model (env STIPPLE_MODEL; default: the live nodes' model)")
    g.add_argument("--width", type=_whole, default=None, help="pixels, a multiple of 8 (gateway default 512)")
    g.add_argument("--height", type=_whole, default=None, help="pixels, a multiple of 8 (gateway default 512)")
    g.add_argument("--steps", type=_whole, default=None, help="denoising steps (gateway default 25)")
    g.add_argument("--seed", type=_whole, default=None, help="seed (default: the gateway draws one)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--num-images", type=_whole, default=None, help="images to make (default 1)")
    g.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the PNG (FILE-1.png, FILE-2.png, ... for several; default stipple-<task id>-<n>.png here)",
    )
    g.set_defaults(run=generate)
    t = sub.add_parser(
        "task",
        parents=[common],
        help="a task's status, nodes, outcome and images",
        description="Show a task. With --watch, follow its events (a progress bar per node) until it ends; then "
        "exit 1 if it did not succeed. Exit 2 when there is no such task.",
    )
    t.add_argument("task_id", metavar="ID")
    t.add_argument("--json", action="store_true", help="print the gateway's view as it is")
    t.add_argument("--watch", action="store_true", help="follow the task until it ends")
    t.set_defaults(run=task)
    n = sub.add_parser("nodes", parents=[common], help="the network's nodes", description="List the nodes.")
    n.add_argument("--json", action="store_true", help="print the nodes as JSON")
    n.set_defaults(run=nodes)
    return p


def describe(exc: StippleError) -> str:
    """An error as one line that names what the gateway named: the field and its value."""
    if isinstance(exc, TaskFailed):
        verdicts = exc.task.outcome.verdicts if exc.task.outcome else {}
        shown = ", ".join(f"{node} {verdict}" for node, verdict in verdicts.items())
        return str(exc.message) + (f"; verdicts: {shown}" if shown else "")
    where = f"{exc.field}={json.dumps(exc.value)}: " if exc.field else ""
    status = f"HTTP {exc.status} " if exc.status is not None else ""
    return f"{where}{exc.message} ({status}{exc.code})"


def status_of(exc: StippleError) -> int:
    """2 for input the gateway refused (any 4xx); 1 for a failed task, or a gateway that could not answer."""
    if isinstance(exc, TaskFailed | Unavailable) or exc.status is None or exc.status >= 500:
        return EXIT_FAILED
    return EXIT_BAD_INPUT


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    """`stipple generate|task|nodes ...`; returns the exit status."""
    out = out or sys.stdout
    args = parser().parse_args(list(argv))
    command = f"stipple {args.command}"
    args.gateway = state.gateway_url(args.gateway, command)
    api_key = args.api_key or os.environ.get("STIPPLE_API_KEY") or None
    run: Callable[[Client, argparse.Namespace, TextIO], int] = args.run
    try:
        with Client(args.gateway, api_key=api_key, timeout=60.0) as client:
            return run(client, args, out)
    except CommandError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return exc.status
    except StippleError as exc:
        print(f"{command}: {describe(exc)}", file=sys.stderr)
        return status_of(exc)
