"""The dispatcher's settings (``STIPPLE_*`` variables): what the queue decides by (queue.py)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from stipple_common.settings import CommonSettings, InvalidSettings
from stipple_common.vrf import SEED_BYTES, VrfKey


class DispatcherSettings(CommonSettings, frozen=True, kw_only=True):
    task_timeout_s: float = 120.0  # from assignment to every node's commitment
    dispatch_timeout_s: float = 30.0  # how long a task may wait in the queue for free nodes
    node_slots: int = 1  # tasks in flight per node
    min_stake: int = 0  # smallest stake a node needs (the chain-indexer's `stakes` bucket says what each holds)
    model_memory_gb: str = ""  # name=GB[,...]: the (V)RAM a model's tasks need on a node
    seconds_per_step: float = 0.05  # GPU seconds per step at 512x512: queue order, and the ETA's prior (speed.py)
    eta_alpha: Annotated[float, Meta(gt=0, le=1)] = 0.2  # weight of a node's newest timed run in its speed (speed.py)
    accept_timeout_s: float = 10.0  # from assignment to the node's `started`; later, it is replaced
    max_reassignments: int = 2  # per task
    prefetch_demand: int = 2  # tasks within prefetch_window_s that make a model worth pre-fetching
    prefetch_window_s: float = 600.0
    prefetch_cooldown_s: float = 300.0  # between two pre-fetch rounds for one model
    # nodes with every model of the task loaded are drawn first (weighted among themselves), the
    # others only when too few of those are free: bench/warm_models.py (issue 16) for why
    warm_first: bool = True
    # a task waits up to this long for a node with its models loaded to free up (when one is live)
    # before a node has to load them: about what loading takes, so the wait costs no more than that
    warm_wait_s: Annotated[float, Meta(ge=0)] = 5.0
    # a node saying it has more models loaded than this is never counted warm (what it says is not
    # checked); the node agent keeps `pipeline_cache` (2) loaded
    warm_max_loaded: Annotated[int, Meta(ge=1)] = 4
    # the VRF secret (64 hex digits) that selects the tasks to compare (stipple_common.vrf);
    # empty: a new key at every start (its public key is published in the `sampling` bucket
    # all the same, but auditors need one that lasts: set it in production)
    sampling_key: str = ""
    class_operators: int = (
        5  # copies from the first node's determinism class only when this many operators of it are free
    )


def sampling_key(settings: DispatcherSettings) -> VrfKey:
    """The dispatcher's VRF key: `STIPPLE_SAMPLING_KEY`, or a new one when it is empty."""
    if not settings.sampling_key:
        return VrfKey.generate()
    try:
        seed = bytes.fromhex(settings.sampling_key)
    except ValueError:
        seed = b""
    if len(seed) != SEED_BYTES:
        raise InvalidSettings(f"STIPPLE_SAMPLING_KEY: expected {2 * SEED_BYTES} hex digits (a VRF secret seed)")
    return VrfKey(seed)


def parse_memory(spec: str) -> dict[str, int]:
    """``STIPPLE_MODEL_MEMORY_GB`` (name=GB[,...]) as bytes per model name."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, gb = item.partition("=")
        try:
            out[name] = int(float(gb) * 1024**3)
        except ValueError:
            raise InvalidSettings(f"STIPPLE_MODEL_MEMORY_GB={spec!r}: expected name=GB[,...], got {item!r}") from None
    return out
