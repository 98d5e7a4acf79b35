"""Warm first (issue 16): nodes that have every model of a task loaded are drawn before
the others, weighted among themselves; the others only top a task up. For its first
`warm_wait_s` a task waits for such a node rather than have another load its models. A
node that claims more loaded models than `warm_max_loaded` is never warm.
bench/warm_models.py measures what it is worth."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stipple_common import __version__
from stipple_common.messages import TaskSubmitted
from stipple_common.settings import InvalidSettings, load_settings
from stipple_common.taskspec import parse_task
from stipple_dispatcher.queue import Assign, TaskQueue, Wait
from stipple_dispatcher.selection import NodeIndex, Requirements
from stipple_dispatcher.settings import DispatcherSettings
from stipple_testkit.nodes import joined

NOW = 1000.0
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p"})
LORA = "https://models.example/lora/fox.safetensors"
WITH_LORA = parse_task({"base_model": "tiny-sd", "prompt": "p", "loras": [{"model": LORA, "weight": 0.5}]})


def index_of(warm: dict[str, tuple[str, ...]], cool: int, *, stakes: dict[str, int] | None = None) -> NodeIndex:
    """`warm`: node -> what it has loaded; `cool` more nodes serving tiny-sd and the LoRA
    (on disk) with nothing loaded. Each node its own operator."""
    index = NodeIndex()
    for node_id, stake in (stakes or {}).items():
        index.set_stake(node_id, stake)
    for node_id, loaded in warm.items():
        index.join(joined(node_id, models_on_disk=(LORA,), models_loaded=loaded), NOW, __version__)
    for i in range(cool):
        index.join(joined(f"cool{i}", models_on_disk=(LORA,)), NOW, __version__)
    return index


def picks(index: NodeIndex, *, count: int = 1, spec=SPEC, warm_first: bool = True, rounds: int = 200) -> Counter:
    req = Requirements(version=__version__, warm_first=warm_first)
    rng = np.random.default_rng(0)
    seen: Counter = Counter()
    for _ in range(rounds):
        seen.update(index.pick(spec, count, rng, now=NOW, ttl_s=10.0, req=req))
    return seen


def test_a_free_node_with_the_model_loaded_is_always_drawn_first():
    index = index_of({"warm": ("tiny-sd",)}, cool=20)
    assert picks(index) == Counter({"warm": 200})
    # the 2x boost alone: 2 / (2 + 20 x 1.7), so the cool nodes take most runs
    before = picks(index, warm_first=False)
    assert before["warm"] < 50
    assert sum(before.values()) == 200


def test_what_a_heartbeat_says_is_loaded_decides():
    index = index_of({"warm": ("tiny-sd",)}, cool=3)
    index.heartbeat("warm", NOW, [])  # it dropped the model
    index.heartbeat("cool0", NOW, ["tiny-sd"])  # and another loaded it
    assert picks(index) == Counter({"cool0": 200})


def test_warm_nodes_are_drawn_by_their_weights_among_themselves():
    index = index_of({"rich": ("tiny-sd",), "poor": ("tiny-sd",)}, cool=10, stakes={"rich": 100, "poor": 1})
    seen = picks(index, rounds=400)
    assert set(seen) == {"rich", "poor"}  # never a cool node while a warm one is free
    assert seen["rich"] > 2 * seen["poor"] > 0  # S·Q/(S+Q) still weighs them: 0.5 against 0.17


def test_too_few_warm_nodes_are_topped_up_with_others_of_distinct_operators():
    index = index_of({"w1": ("tiny-sd",), "w2": ("tiny-sd",)}, cool=5)
    for seed in range(20):
        chosen = index.pick(
            SPEC, 3, np.random.default_rng(seed), now=NOW, ttl_s=10.0, req=Requirements(version=__version__)
        )
        assert len(set(chosen)) == 3
        assert {"w1", "w2"} < set(chosen)


def test_a_busy_warm_node_leaves_the_task_to_the_others():
    index = index_of({"warm": ("tiny-sd",)}, cool=2)
    index.assigned(["warm"])  # its one slot is taken
    assert set(picks(index)) == {"cool0", "cool1"}


def test_warm_means_every_model_of_the_task_loaded():
    index = index_of({"base-only": ("tiny-sd",), "both": ("tiny-sd", LORA)}, cool=5)
    assert picks(index, spec=WITH_LORA) == Counter({"both": 200})
    index.heartbeat("both", NOW, [LORA])  # the base model is no longer loaded: nobody is warm
    assert len(picks(index, spec=WITH_LORA)) > 2


def test_a_node_claiming_more_loaded_models_than_a_gpu_holds_is_not_warm():
    many = ("tiny-sd", "a", "b", "c", "d")  # five: over warm_max_loaded (4)
    index = index_of({"liar": many}, cool=20)
    assert picks(index)["liar"] < 50  # the 2x boost at most, as before
    index.heartbeat("liar", NOW, many[:4])
    assert picks(index) == Counter({"liar": 200})


def test_warm_settings_out_of_range_are_refused_naming_them():
    with pytest.raises(InvalidSettings, match="STIPPLE_WARM_WAIT_S='-1'"):
        load_settings(DispatcherSettings, {"STIPPLE_WARM_WAIT_S": "-1"})
    with pytest.raises(InvalidSettings, match="STIPPLE_WARM_MAX_LOADED='0'"):
        load_settings(DispatcherSettings, {"STIPPLE_WARM_MAX_LOADED": "0"})
    settings = load_settings(DispatcherSettings, {"STIPPLE_WARM_FIRST": "false", "STIPPLE_WARM_WAIT_S": "2.5"})
    assert (settings.warm_first, settings.warm_wait_s) == (False, 2.5)


@pytest.mark.parametrize("warm_first", [True, False])
def test_the_dispatcher_setting_reaches_the_pick(warm_first):
    queue: TaskQueue[str] = TaskQueue(NodeIndex(), DispatcherSettings(warm_first=warm_first))
    assert queue.requirements(SPEC).warm_first is warm_first


# ---------------------------------------------------------------------- waiting for a warm node


def queue_of(index: NodeIndex, **settings) -> TaskQueue[str]:
    settings.setdefault("node_ttl_s", 1e6)
    settings.setdefault("validation_rate", 0.0)  # one node a task
    return TaskQueue(index, DispatcherSettings(**settings), np.random.default_rng(0))


def submitted(task_id: str, *, at: float = NOW, fee: int = 0, spec=SPEC) -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, spec=spec, submitted_at=at, fee=fee)


def decide(queue: TaskQueue[str], now: float) -> dict[str, str | None]:
    """task -> its node (None: it waits), for one pass of the queue."""
    out: dict[str, str | None] = {}
    for decision in queue.pump(now):
        if isinstance(decision, Assign):
            (out[decision.assigned.task_id],) = decision.assigned.nodes
        else:
            assert isinstance(decision, Wait)
            out[decision.task_id] = None
    return out


def test_a_task_waits_for_a_busy_warm_node_rather_than_have_a_free_one_load_its_model():
    index = index_of({"warm": ("tiny-sd",)}, cool=3)
    index.assigned(["warm"])
    queue = queue_of(index, warm_wait_s=5.0)
    queue.submit(submitted("t"), "msg", {}, NOW)
    assert decide(queue, NOW + 1) == {"t": None}
    index.assigned(["warm"], -1)  # it committed: free again
    assert decide(queue, NOW + 2) == {"t": "warm"}


def test_past_the_warm_wait_a_node_that_must_load_the_model_takes_it():
    index = index_of({"warm": ("tiny-sd",)}, cool=3)
    index.assigned(["warm"])
    queue = queue_of(index, warm_wait_s=5.0)
    queue.submit(submitted("t"), "msg", {}, NOW)
    assert decide(queue, NOW + 4.9) == {"t": None}
    assert decide(queue, NOW + 5.0)["t"] in {"cool0", "cool1", "cool2"}


def test_nobody_waits_for_a_model_no_live_node_has_loaded_nor_with_the_wait_off():
    index = index_of({}, cool=3)
    queue = queue_of(index, warm_wait_s=5.0)
    queue.submit(submitted("t1"), "msg", {}, NOW)
    assert decide(queue, NOW)["t1"] is not None
    index = index_of({"warm": ("tiny-sd",)}, cool=3)
    index.assigned(["warm"])
    for settings in ({"warm_wait_s": 0.0}, {"warm_first": False}):
        queue = queue_of(index, **settings)
        queue.submit(submitted("t2"), "msg", {}, NOW)
        assert decide(queue, NOW)["t2"] in {"cool0", "cool1", "cool2"}


def test_a_task_waiting_for_a_warm_node_does_not_hold_up_one_past_its_wait():
    index = index_of({"warm": ("tiny-sd",)}, cool=1)
    index.assigned(["warm"])
    queue = queue_of(index, warm_wait_s=5.0)
    queue.submit(submitted("old", at=NOW - 10), "m1", {}, NOW - 10)  # waited past the warm wait
    queue.submit(submitted("young", fee=100), "m2", {}, NOW)  # ahead of it in the queue (pays more)
    assert decide(queue, NOW) == {"young": None, "old": "cool0"}


# ---------------------------------------------------------------------- the bench


def test_the_warm_models_bench_runs_and_warm_first_beats_the_old_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A smoke run of bench/warm_models.py (the real queue and index on a simulated clock):
    it keeps working as the dispatcher changes, and its accounting adds up."""
    path = Path(__file__).parents[3] / "bench" / "warm_models.py"
    spec = importlib.util.spec_from_file_location("warm_models", path)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "warm_models", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    cfg = bench.Config(
        nodes=40, models=8, disk=3, vram=2, zipf=1.1, load=0.5, task_s=10.0, load_s=8.0, download_s=60.0,
        warmup_s=60.0, measure_s=120.0, seed=3,
    )  # fmt: skip
    stock, crynux, now = (bench.simulate(cfg, policy) for policy in ("stock", "crynux", "warm-wait"))
    for out in (stock, crynux, now):
        assert out.tasks > 100
        assert out.tasks == len(out.waits) + out.aborted  # every task measured was placed or gave up
        assert len(out.waits) <= out.runs <= 3 * len(out.waits)  # one node a task, three when sampled
    assert now.share(now.warm) > stock.share(stock.warm)
    split = bench.simulate(cfg, "warm-wait", partitions=2)  # two dispatchers, each its half of the nodes
    assert split.tasks == now.tasks  # the same workload, split by task id
    assert split.tasks == len(split.waits) + split.aborted
    assert len(split.waits) <= split.runs <= 3 * len(split.waits)
