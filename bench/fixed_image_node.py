"""A benchmark-only node agent that skips diffusers: `FixedImageNode`.

For measuring the control plane alone (bench/control_plane.py). Never use it outside
bench/ and tests: a network of these nodes "agrees" on every task without computing
anything.

Everything else is the real node agent (`stipple_node.service`): joining as its key
(`join_network`, with STIPPLE_CHAIN the stake at start), the announcement and
heartbeats, the durable work and control consumers, `started`, the upload of each PNG
through the gatekeeper's blob intake, the signed `committed`, and `revealed` on the
validator's request.
Only `_generate` differs: instead of running diffusers in a worker thread it returns at
once one precomputed PNG per image (a flat grey picture of the task's size, its pHash
computed once per size), with the seed (task seed + index), width and height a real
node would report. No model is loaded; torch is imported (by the node agent's modules)
but never used.

Run it as a process exactly like ``python -m stipple_node`` (settings from the same
STIPPLE_* variables):

    STIPPLE_NATS_URL=nats://127.0.0.1:4222 STIPPLE_KEY_FILE=/tmp/n1.key python bench/fixed_image_node.py

Its key (STIPPLE_KEY_FILE, else <STIPPLE_MODEL_CACHE>/node.key, made at first start;
with neither, a new key at every start) is its identity: its address is its node id.

STIPPLE_MODELS is read for the model *names* only (the folders are neither checked nor
loaded); the default announces the built-in `tiny-sd`.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import sys
from functools import cache
from pathlib import Path

import imagehash
import structlog
from PIL import Image

from stipple_common import commitment
from stipple_common.errors import StippleError
from stipple_common.logs import setup_logging
from stipple_common.messages import Assignment
from stipple_common.settings import InvalidSettings, load_settings
from stipple_node.pipeline import GeneratedImage
from stipple_node.service import NodeAgent, NodeSettings, check_node_id, join_network, load_or_create_key, serve

log = structlog.get_logger("stipple.node")

GREY = (128, 128, 128)


@cache
def fixed_png(width: int, height: int) -> tuple[bytes, str]:
    """The fixed image of one size: PNG bytes (encoded as the node encodes) and its pHash."""
    image = Image.new("RGB", (width, height), GREY)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue(), str(imagehash.phash(image, hash_size=8))


class FixedImageNode(NodeAgent):
    """A NodeAgent whose `_generate` returns fixed precomputed images at once (benchmarks only)."""

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        config = work.spec.task_config
        png, phash = fixed_png(config.image_width, config.image_height)
        return [
            GeneratedImage(
                png=png, phash=phash, seed=config.seed + i, width=config.image_width, height=config.image_height
            )
            for i in range(config.num_images)
        ]


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


async def run(settings: NodeSettings) -> None:
    """`stipple_node.service.run` without the model store and the pipeline runner."""
    setup_logging("node-agent", level=settings.log_level, fmt=settings.log_format)
    key_file = settings.key_file or (str(Path(settings.model_cache) / "node.key") if settings.model_cache else "")
    key = load_or_create_key(Path(key_file).expanduser()) if key_file else "0x" + secrets.token_hex(32)
    account = commitment.account_from_key(key)
    node_id = check_node_id(settings, account.address)
    runner = FixedRunner(model_names(settings.models))
    log.info("node_identity", node_id=node_id)
    async with join_network(settings, account) as ctx:
        await serve(ctx, settings, runner, None, key, agent_type=FixedImageNode)  # type: ignore[arg-type]


def main() -> None:
    try:
        asyncio.run(run(load_settings(NodeSettings)))
    except StippleError as exc:
        print(f"fixed_image_node: {exc.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
