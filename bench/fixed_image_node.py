"""A benchmark-only node agent that skips diffusers: `FixedImageNode`.

For bench/control_plane.py (the control plane alone) and bench/sampling_latency.py (with a
set "compute" time). Never use it outside bench/ and tests: a network of these nodes
"agrees" on every task without computing anything.

Everything else is the real node agent (`stipple_node.service`): joining as its key
(`join_network`, with STIPPLE_CHAIN the stake at start), the announcement and
heartbeats, the durable work and control consumers, `started`, the upload of each PNG
through the gatekeeper's blob intake, the signed `committed`, and `revealed` on the
validator's request.
Only `_generate` differs: instead of running diffusers in a worker thread it returns one
precomputed PNG per image (a flat grey picture of the task's size, its pHash computed
once per size), with the seed (task seed + index), width and height a real node would
report, and:

- checkpoints (stipple_common.checkpoints) and a determinism class on every image, which
  the validator requires of every revealed image: one digest per fraction, derived from
  the task id, the image's seed and the fraction, so that honest copies are equal; and
  the determinism class the node announced when it joined (the real node's, from its
  hardware and libraries, so equal for every node on one machine) with "; float32", as
  the validator requires ("bench-fixed-image" where the announcement carries none).
- a wait of `BENCH_COMPUTE_S` seconds (0 when unset: the images come back at once, so
  control_plane.py measures the control plane alone) times ``max(0.1, 1 + j * N(0, 1))``,
  j = `BENCH_COMPUTE_JITTER` (0 when unset), before the images are returned. It is an
  asyncio sleep: it takes no CPU, so copies of a task on one machine do not contend for
  cores as real diffusion would, and what a sampled task costs beyond an unsampled one
  is the protocol's own (waiting for the slowest copy, the comparison), not the machine's.
  With a jitter the three copies of a sampled task take different times, as on three GPUs.

No model is loaded; torch is imported (by the node agent's modules) but never used. Like
the real node's `run`, it freezes its start-up heap before it joins
(`freeze_startup_heap`): without that, the first full collections after start stall its
event loop for 0.3 to 0.9 s.

Diagnostics, for finding where a task's time goes: a control message (reveal request,
cancellation) handled over 100 ms after it was stored is logged (`control_late`: how long
it waited to be fetched, how long its handler took); with `BENCH_DIAGNOSE=1` also every
garbage collection over 50 ms (`gc_pause`) and every stall of the event loop over 50 ms
(`loop_stalled`).

Run it as a process exactly like ``python -m stipple_node`` (settings from the same
STIPPLE_* variables, and BENCH_COMPUTE_S / BENCH_COMPUTE_JITTER / BENCH_DIAGNOSE):

    STIPPLE_NATS_URL=nats://127.0.0.1:4222 STIPPLE_KEY_FILE=/tmp/n1.key python bench/fixed_image_node.py
    BENCH_COMPUTE_S=0.5 STIPPLE_NATS_URL=nats://127.0.0.1:4222 STIPPLE_KEY_FILE=/tmp/n1.key \\
        python bench/fixed_image_node.py

Its key (STIPPLE_KEY_FILE, else <STIPPLE_MODEL_CACHE>/node.key, made at first start;
with neither, a new key at every start) is its identity: its address is its node id.

STIPPLE_MODELS is read for the model *names* only (the folders are neither checked nor
loaded); the default announces the built-in `tiny-sd`.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import random
import secrets
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import imagehash
import structlog
from PIL import Image

from stipple_common import checkpoints, commitment, eventloop
from stipple_common.errors import StippleError
from stipple_common.logs import setup_logging
from stipple_common.messages import Assignment
from stipple_common.service import freeze_startup_heap
from stipple_common.settings import InvalidSettings, load_settings
from stipple_node.pipeline import GeneratedImage
from stipple_node.service import NodeAgent, NodeSettings, check_node_id, join_network, load_or_create_key, serve

log = structlog.get_logger("stipple.node")

GREY = (128, 128, 128)
DETERMINISM = "bench-fixed-image"
BACKGROUND: set[asyncio.Task[None]] = set()  # the diagnostic watchers (kept referenced)


@cache
def fixed_png(width: int, height: int) -> tuple[bytes, str]:
    """The fixed image of one size: PNG bytes (encoded as the node encodes) and its pHash."""
    image = Image.new("RGB", (width, height), GREY)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue(), str(imagehash.phash(image, hash_size=8))


def env_float(name: str, default: float = 0.0) -> float:
    """A non-negative number from the environment (`default` when unset or empty)."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise InvalidSettings(f"{name}={text!r}: expected a number of seconds") from None
    if value < 0:
        raise InvalidSettings(f"{name}={text!r}: must be >= 0")
    return value


class FixedImageNode(NodeAgent):
    """A NodeAgent whose `_generate` returns fixed precomputed images, with checkpoints and a
    determinism class, after `compute_s` (with jitter; 0: at once). Benchmarks only."""

    compute_s: float = 0.0
    jitter: float = 0.0
    _determinism: str = ""

    def determinism(self) -> str:
        """The class it reveals: the one it announced when it joined (`NodeJoined.determinism`,
        the class but the dtype, which the validator holds it to) and float32; DETERMINISM
        where the announcement carries none."""
        if not self._determinism:
            announced = getattr(self.announcement(), "determinism", "")
            self._determinism = f"{announced}; float32" if announced else DETERMINISM
        return self._determinism

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        if self.compute_s > 0:
            await asyncio.sleep(self.compute_s * max(0.1, 1 + self.jitter * random.gauss(0, 1)))
        config = work.spec.task_config
        png, phash = fixed_png(config.image_width, config.image_height)
        determinism = self.determinism()
        images = []
        for i in range(config.num_images):
            seed = config.seed + i
            images.append(
                GeneratedImage(
                    png=png,
                    phash=phash,
                    seed=seed,
                    width=config.image_width,
                    height=config.image_height,
                    checkpoints=[
                        checkpoints.digest(f"{work.task_id}:{seed}:{f}".encode()) for f in checkpoints.FRACTIONS
                    ],
                    determinism=determinism,
                )
            )
        return images

    async def handle_control(self, msg: Any) -> Any:
        """The real handler, logging a control message handled over 100 ms after it was
        stored (`control_late`): how long it waited to be fetched, and how long it took."""
        fetched = time.time()
        result = await super().handle_control(msg)
        waited, took = fetched - msg.metadata.timestamp.timestamp(), time.time() - fetched
        if waited + took > 0.1:
            log.warning("control_late", subject=msg.subject, waited_s=round(waited, 3), took_s=round(took, 3))
        return result


class FixedRunner:
    """What `serve()` and `NodeAgent` need of a PipelineRunner: the announced model
    names and what is loaded. Nothing is ever loaded or run."""

    def __init__(self, names: list[str]) -> None:
        self._names = sorted(names)

    @property
    def model_names(self) -> list[str]:
        return list(self._names)

    def loaded(self) -> list[str]:
        return list(self._names)  # announced as loaded, as a real node loads before announcing


def model_names(spec: str) -> list[str]:
    """The names in STIPPLE_MODELS (`name=folder[,...]`); folders are ignored here."""
    names = [item.partition("=")[0].strip() for item in spec.split(",") if item.strip()]
    if not all(names):
        raise InvalidSettings(f"STIPPLE_MODELS={spec!r}: expected name=folder[,name=folder...]")
    if not names:
        raise InvalidSettings("STIPPLE_MODELS is empty: a node must serve at least one model")
    return names


def log_gc_pauses(threshold_s: float = 0.05) -> None:
    """Log every garbage collection that takes over `threshold_s` (BENCH_DIAGNOSE=1)."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started and (took := time.perf_counter() - started[0]) > threshold_s:
            log.warning("gc_pause", generation=info["generation"], seconds=round(took, 3))

    gc.callbacks.append(callback)


async def watch_loop_lag(threshold_s: float = 0.05) -> None:
    """Log every stall of this process's event loop over `threshold_s` (BENCH_DIAGNOSE=1)."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.01)
        if (lag := time.perf_counter() - before - 0.01) > threshold_s:
            log.warning("loop_stalled", seconds=round(lag, 3))


async def run(settings: NodeSettings) -> None:
    """`stipple_node.service.run` without the model store and the pipeline runner."""
    setup_logging("node-agent", level=settings.log_level, fmt=settings.log_format)
    FixedImageNode.compute_s = env_float("BENCH_COMPUTE_S")
    FixedImageNode.jitter = env_float("BENCH_COMPUTE_JITTER")
    key_file = settings.key_file or (str(Path(settings.model_cache) / "node.key") if settings.model_cache else "")
    key = load_or_create_key(Path(key_file).expanduser()) if key_file else "0x" + secrets.token_hex(32)
    account = commitment.account_from_key(key)
    node_id = check_node_id(settings, account.address)
    runner = FixedRunner(model_names(settings.models))
    freeze_startup_heap()  # as stipple_node.service.run does, once everything is imported
    if os.environ.get("BENCH_DIAGNOSE"):
        log_gc_pauses()
        BACKGROUND.add(asyncio.create_task(watch_loop_lag()))
    log.info("node_identity", node_id=node_id, compute_s=FixedImageNode.compute_s, jitter=FixedImageNode.jitter)
    async with join_network(settings, account) as ctx:
        await serve(ctx, settings, runner, None, key, agent_type=FixedImageNode)  # type: ignore[arg-type]


def main() -> None:
    try:
        settings = load_settings(NodeSettings)
        eventloop.run(run(settings), settings.event_loop)  # as stipple-node runs
    except StippleError as exc:
        print(f"fixed_image_node: {exc.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
