"""`stipple`: the Stipple command line.

stipple up                run the whole network on this machine (Ctrl-C stops it)
stipple generate PROMPT   make images through the gateway, with a progress bar per node (commands.py)
stipple task ID           a task's status, nodes, outcome and images (--watch follows it; commands.py)
stipple nodes             the network's nodes (commands.py)
stipple chain reconcile   compare the chain-indexer's projections with the chain (reconcile.py)
stipple audit             check the sampled validation's VRF proofs in the TASKS stream (audit.py)

`stipple up` writes where its network is to a state file (state.py); the other commands
find that network there when no flag or environment variable names one.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from stipple_common.logs import redact

from . import state
from .network import LocalNetwork, NetworkError

DEMO_REQUEST = {
    "prompt": "a lighthouse on a cliff at dusk, oil painting",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 8,
    "cfg_scale": 7.0,
    "width": 128,
    "height": 128,
    "model": "tiny-sd",
}


def demo_image(network: LocalNetwork, out: Path) -> str:
    """Ask the running network for one image over plain HTTP, as an app would."""
    request = urllib.request.Request(
        f"{network.gateway_url}/txt2img",
        data=json.dumps(DEMO_REQUEST).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise NetworkError(f"the first image failed: HTTP {exc.code} {exc.read().decode(errors='replace')}") from None
    out.write_bytes(base64.b64decode(body["images"][0]))
    return f"{out} (task {body['task_id']}, {time.perf_counter() - started:.2f} s)"


def write_state(network: LocalNetwork) -> Path:
    """Record where the running network is (state.py), once it is up."""
    assert network.nats_url is not None
    return state.write(
        state.NetworkState(
            pid=os.getpid(),
            started_at=time.time(),
            data_dir=str(network.data_dir.resolve()),
            gateway_url=network.gateway_url,
            nats_url=network.admin_url(),
            nats_server=redact(network.nats_url),
            chain_url=network.chain_url,
        )
    )


def up(args: argparse.Namespace) -> int:
    network = LocalNetwork(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        nodes=args.nodes,
        nats_url=args.nats_url,
        verbose=args.verbose,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Starting Stipple in {args.data_dir} ...", flush=True)
    try:
        network.start()
    except NetworkError as exc:
        print(f"stipple up: {exc}", file=sys.stderr)
        return 1
    try:
        ids = network.node_ids()
        nodes = "\n           ".join(f"{name} {ids.get(name, '')}" for name in sorted(ids))
        auth = (
            "authentication on: services with their own passwords, nodes with their keys (gatekeeper)"
            if network.credentials is not None
            else "as given (its authentication is not ours)"
        )
        print(f"Stipple is up.\n  gateway  {network.gateway_url}\n  nats     {redact(network.nats_url or '')} ({auth})")
        if network.chain_url:
            print(f"  chain    {network.chain_url} (JSON-RPC; contracts deployed, stipple chain reconcile)")
        print(f"  nodes    {nodes}\n           (model tiny-sd)\n  logs     {args.data_dir / 'logs'}/")
        metrics = network.metrics_urls().items()
        print("  metrics  " + "\n           ".join(f"{name:<14}{url}" for name, url in metrics))
        print(f"  state    {write_state(network)} (where `stipple generate`, `task`, ... find this network)")
        if not args.no_demo:
            print(f"  first image: {demo_image(network, args.data_dir / 'first-image.png')}")
        print(
            f"\nTry:\n  curl -s -X POST {network.gateway_url}/txt2img "
            """-d '{"prompt": "a red fox", "width": 128, "height": 128, "steps": 8}'\n"""
            f"  curl -s -X POST {network.gateway_url}/v1/tasks "
            """-d '{"base_model": "tiny-sd", "prompt": "a red fox", "task_config": {"image_width": 128, """
            """"image_height": 128, "steps": 8}}'\nCtrl-C stops the network.""",
            flush=True,
        )
        while not stop.wait(1.0):
            if dead := network.dead():
                print(f"stipple up: {dead[0].name} exited; stopping.\n{dead[0].tail()}", file=sys.stderr)
                return 1
        print("Stopping ...", flush=True)
        return 0
    except NetworkError as exc:
        print(f"stipple up: {exc}", file=sys.stderr)
        return 1
    finally:
        state.remove()
        network.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chain"]:  # its own parser, imported only here: web3 takes a second to import
        from . import reconcile

        sys.exit(reconcile.main(argv[1:]))
    if argv[:1] == ["audit"]:  # its own parser (audit.py)
        from . import audit

        sys.exit(audit.main(argv[1:]))
    if argv[:1] and argv[0] in ("generate", "task", "nodes"):  # the gateway's clients (commands.py)
        from . import commands

        sys.exit(commands.main(argv))
    parser = argparse.ArgumentParser(prog="stipple", description="The Stipple command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("chain", help="the chain: `stipple chain reconcile` (stipple chain --help)", add_help=False)
    sub.add_parser("audit", help="check the sampled validation's proofs (stipple audit --help)", add_help=False)
    sub.add_parser("generate", help="make images (stipple generate --help)", add_help=False)
    sub.add_parser("task", help="a task's status; --watch follows it (stipple task --help)", add_help=False)
    sub.add_parser("nodes", help="the network's nodes (stipple nodes --help)", add_help=False)
    p_up = sub.add_parser("up", help="run the whole network on this machine")
    p_up.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    p_up.add_argument("--port", type=int, default=8080, help="gateway port (default 8080; 0: any free port)")
    p_up.add_argument("--nodes", type=int, default=3, help="node agents to run (default 3)")
    p_up.add_argument("--nats-url", default=None, help="use this NATS server instead of starting one (env NATS_URL)")
    p_up.add_argument(
        "--data-dir", type=Path, default=Path(".stipple"), help="state, models and logs (default .stipple)"
    )
    p_up.add_argument("--no-demo", action="store_true", help="do not make a first image at start")
    p_up.add_argument("--verbose", action="store_true", help="service logs on this terminal instead of files")
    args = parser.parse_args(argv)
    if args.command == "up":
        if args.nats_url is None:
            args.nats_url = os.environ.get("NATS_URL") or None
        sys.exit(up(args))


if __name__ == "__main__":
    main()
