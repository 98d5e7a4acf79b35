"""The dispatcher's settings (``STIPPLE_*`` variables): what the queue decides by (queue.py)."""

from __future__ import annotations

from stipple_common.settings import CommonSettings, InvalidSettings


class DispatcherSettings(CommonSettings, frozen=True, kw_only=True):
    task_timeout_s: float = 120.0  # from assignment to every node's commitment
    dispatch_timeout_s: float = 30.0  # how long a task may wait in the queue for free nodes
    node_slots: int = 1  # tasks in flight per node
    min_stake: int = 0  # smallest stake a node needs (the chain-indexer's `stakes` bucket says what each holds)
    model_memory_gb: str = ""  # name=GB[,...]: the (V)RAM a model's tasks need on a node
    seconds_per_step: float = 0.05  # GPU seconds per step at 512x512, for queue order and ETA
    accept_timeout_s: float = 10.0  # from assignment to the node's `started`; later, it is replaced
    max_reassignments: int = 2  # per task
    prefetch_demand: int = 2  # tasks within prefetch_window_s that make a model worth pre-fetching
    prefetch_window_s: float = 600.0
    prefetch_cooldown_s: float = 300.0  # between two pre-fetch rounds for one model


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
