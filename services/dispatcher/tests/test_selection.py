"""Eligibility and weights over the node index (DESIGN.md, Dispatch)."""

from collections import Counter

import msgspec
import numpy as np
import pytest

from stipple_common import __version__
from stipple_common.messages import NodeQos
from stipple_common.taskspec import parse_task
from stipple_dispatcher.selection import NodeIndex, NotEnoughNodes, Requirements, compatible, task_models
from stipple_testkit.nodes import joined

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p"})
NOW = 1000.0
REQ = Requirements(version=__version__)


def index_of(*nodes, seen=NOW, chain=None):
    """An index of `nodes`; `chain`: node id -> (stake, owner) as the chain-indexer says."""
    index = NodeIndex(capacity=2)  # small, so growing is exercised
    for node_id, (stake, owner) in (chain or {}).items():
        index.set_stake(node_id, stake, owner)
    for n in nodes:
        index.join(n, seen, __version__)
    return index


def pick(index, seed=0, count=3, spec=SPEC, req=REQ, now=NOW):
    return index.pick(spec, count, np.random.default_rng(seed), now=now, ttl_s=10.0, req=req)


def test_picks_distinct_nodes_serving_the_model():
    index = index_of(*[joined(f"n{i}") for i in range(6)], joined("other", models=("sdxl",)))
    chosen = pick(index)
    assert len(set(chosen)) == 3
    assert "other" not in chosen


OWNERS = {"a1": "alice", "a2": "alice", "a3": "alice", "b1": "bob", "c1": ""}  # c1 staked for itself


def test_never_two_nodes_of_one_operator():
    index = index_of(*map(joined, OWNERS), chain={n: (100, owner) for n, owner in OWNERS.items()})
    for seed in range(30):
        chosen = pick(index, seed)
        assert sorted(OWNERS[n] or n for n in chosen) == ["alice", "bob", "c1"]


def test_the_operator_is_the_owner_of_the_stake_as_the_chain_says():
    index = index_of(joined("n0"), joined("n1"), joined("n2"))  # the chain knows nothing yet: each its own operator
    assert sorted(pick(index)) == ["n0", "n1", "n2"]
    index.set_stake("n0", 100, "mallory")
    index.set_stake("n1", 100, "MALLORY")  # one owner (any case) staked for both
    for seed in range(10):
        with pytest.raises(NotEnoughNodes, match="3 eligible nodes of 2 operators"):
            pick(index, seed)
    assert sorted(pick(index, count=2)) in (["n0", "n2"], ["n1", "n2"])
    index.set_stake("n1", 100)  # the stake now its own (no owner: the node itself)
    assert sorted(pick(index)) == ["n0", "n1", "n2"]
    index.join(joined("n3"), NOW, __version__)
    index.set_stake("n3", 100, "n2")  # a node may own another's stake: they are one operator
    for seed in range(30):
        assert not {"n2", "n3"} <= set(pick(index, seed))


def test_a_replacement_is_of_none_of_the_excluded_nodes_operators():
    index = index_of(*map(joined, OWNERS), chain={n: (100, owner) for n, owner in OWNERS.items()})
    rng = np.random.default_rng(0)
    for _ in range(20):
        (chosen,) = index.pick(SPEC, 1, rng, now=NOW, ttl_s=10.0, req=REQ, exclude=["a2", "b1"])
        assert chosen == "c1"


def test_choice_is_random_across_tasks():
    index = index_of(*[joined(f"n{i}") for i in range(8)])
    assert len({frozenset(pick(index, seed)) for seed in range(20)}) > 5


def test_too_few_says_how_many_there_are():
    chain = {"a1": (0, "alice"), "a2": (0, "alice"), "b1": (0, "bob")}
    index = index_of(joined("a1"), joined("a2"), joined("b1"), joined("x", models=("sdxl",)), chain=chain)
    with pytest.raises(NotEnoughNodes, match="3 eligible nodes of 2 operators") as info:
        pick(index)
    assert info.value.retryable


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda index: index.leave("n0"), "quit"),
        (lambda index: index.score(NodeQos(node_id="n0", qos=3.0, samples=3, recent_timeouts=2)), "paused"),
        (lambda index: index.assigned(["n0"]), "busy"),
        (lambda index: index.join(joined("n0", version="9.0.0"), NOW, __version__), "incompatible version"),
        (lambda index: index.set_stake("n0", 5), "stake below the minimum"),
        (lambda index: index.ban("n0", NOW + 60), "banned"),
        (lambda index: index.join(joined("n0", memory_bytes=10), NOW, __version__), "too little memory"),
        (lambda index: index.heartbeat("n0", NOW - 11), "stale heartbeat (kept)"),
    ],
)
def test_ineligible_nodes_are_never_picked(change, why):
    nodes = [joined(f"n{i}", memory_bytes=100) for i in range(4)]
    chain = {f"n{i}": (100, "") for i in range(4)}
    index = index_of(*nodes, chain=chain)
    if why == "stale heartbeat (kept)":
        index = index_of(*nodes[1:], chain=chain)
        index.join(nodes[0], NOW - 11, __version__)
    else:
        change(index)
    req = Requirements(min_stake=10, memory_bytes=50, version=__version__)
    for seed in range(20):
        assert "n0" not in pick(index, seed, req=req), why


def test_live_is_a_recent_heartbeat_and_not_quit_and_every_question_uses_it():
    index = index_of(joined("fresh"), joined("quit"), joined("other", models=("sdxl",), models_on_disk=("lora/x",)))
    index.join(joined("stale", models_on_disk=("lora/x",)), NOW - 11, __version__)
    index.join(joined("old", version="9.0.0"), NOW, __version__)
    index.leave("quit")
    assert [index.ids[row] for row in np.flatnonzero(index.live(NOW, 10.0))] == ["fresh", "other", "old"]
    assert index.live(NOW + 20, 10.0).sum() == 0
    assert [index.ids[row] for row in index.live_rows(NOW, 10.0)] == ["fresh", "other"]  # a compatible version
    assert [index.ids[row] for row in index.holders("lora/x", NOW, 10.0)] == ["other"]
    assert index.serving_live("tiny-sd", NOW, 10.0) == 2  # fresh and old (busy or not)
    assert index.serving_live("tiny-sd", NOW - 5, 10.0) == 3  # stale was live then
    assert index.serving_live("nobody-has-it", NOW, 10.0) == 0
    assert NodeIndex().live(NOW, 10.0).shape == (0,)


def test_a_paused_node_comes_back_only_when_it_passes_the_check():
    index = index_of(*[joined(f"n{i}") for i in range(3)])
    index.score(NodeQos(node_id="n0", qos=0.0, samples=3, recent_timeouts=2))
    with pytest.raises(NotEnoughNodes):
        pick(index)
    index.join(joined("n0"), NOW + 1, __version__)  # announcing again (say, after a pre-fetch) is not enough
    with pytest.raises(NotEnoughNodes):
        pick(index, now=NOW + 1)
    restarted = msgspec.structs.replace(joined("n0"), started_at=NOW + 2)  # nor is a restart
    index.join(restarted, NOW + 2, __version__)
    with pytest.raises(NotEnoughNodes):
        pick(index, now=NOW + 2)
    index.score(NodeQos(node_id="n0", qos=0.0, samples=3, recent_timeouts=0, task_id="probe:1"))  # passed
    assert "n0" in pick(index, now=NOW + 2)


def test_a_ban_holds_until_its_time_through_restarts():
    index = index_of(*[joined(f"n{i}") for i in range(3)])
    index.ban("n0", NOW + 5)
    index.join(msgspec.structs.replace(joined("n0"), started_at=NOW + 1), NOW + 1, __version__)  # restarting
    for seed in range(10):
        with pytest.raises(NotEnoughNodes, match="2 eligible nodes"):
            pick(index, seed, now=NOW + 4)
    assert sorted(pick(index, now=NOW + 5)) == ["n0", "n1", "n2"]


def test_busy_nodes_free_up():
    index = index_of(*[joined(f"n{i}") for i in range(3)])
    index.assigned(["n0", "n1", "n2"])
    with pytest.raises(NotEnoughNodes):
        pick(index)
    index.assigned(["n1"], -1)
    index.assigned(["n1"], -1)  # never below zero
    assert index.inflight[index.row["n1"]] == 0
    index.assigned(["n0", "n2"], -1)
    assert sorted(pick(index)) == ["n0", "n1", "n2"]


def frequencies(index, rounds=3000, count=1):
    seen = Counter()
    rng = np.random.default_rng(7)
    for _ in range(rounds):
        seen.update(index.pick(SPEC, count, rng, now=NOW, ttl_s=10.0, req=REQ))
    return seen


def test_weights_follow_stake_qos_and_locality():
    index = index_of(
        joined("rich"), joined("poor"), joined("new"), chain={"rich": (100, ""), "poor": (1, ""), "new": (100, "")}
    )
    index.score(NodeQos(node_id="rich", qos=10.0, samples=50, recent_timeouts=0))
    index.score(NodeQos(node_id="poor", qos=10.0, samples=50, recent_timeouts=0))
    weights = dict(zip(index.ids, index.weights(np.arange(3), ["tiny-sd"]), strict=True))
    # S = sqrt(stake / max): 1, 0.1, 1; Q = qos/10: 1, 1, 0.5 (new); w = SQ/(S+Q); all on disk: x1.7
    assert weights["rich"] == pytest.approx(0.5 * 1.7)
    assert weights["poor"] == pytest.approx(0.1 / 1.1 * 1.7)
    assert weights["new"] == pytest.approx(0.5 / 1.5 * 1.7)
    seen = frequencies(index)
    assert seen["rich"] > seen["new"] > seen["poor"] > 0


def test_loaded_models_double_the_weight():
    index = index_of(joined("warm", models_loaded=("tiny-sd",)), joined("cold"))
    w = dict(zip(index.ids, index.weights(np.arange(2), ["tiny-sd"]), strict=True))
    assert w["warm"] / w["cold"] == pytest.approx(2.0 / 1.7)
    index.heartbeat("cold", NOW, ["tiny-sd"])  # heartbeats carry what is loaded now
    w = dict(zip(index.ids, index.weights(np.arange(2), ["tiny-sd"]), strict=True))
    assert w["warm"] == pytest.approx(w["cold"])


def test_task_models_lists_everything_the_task_needs():
    spec = parse_task(
        {
            "base_model": "sdxl",
            "prompt": "p",
            "refiner": {"model": "refiner"},
            "vae": "vae",
            "loras": [{"model": "l1", "weight": 0.5}, {"model": "l1", "weight": 0.2}],
        }
    )
    assert task_models(spec) == {"sdxl": "model", "refiner": "model", "vae": "model", "l1": "lora"}


@pytest.mark.parametrize(
    ("node_version", "ours", "ok"),
    [("0.1.0", "0.1.3", True), ("0.2.0", "0.1.0", False), ("1.4.0", "1.0.0", True), ("2.0.0", "1.9.9", False)],
)
def test_versions_are_compatible_within_a_major(node_version, ours, ok):
    assert compatible(node_version, ours) is ok


def test_stakes_come_from_the_chain_only():
    index = NodeIndex(capacity=2)
    index.set_stake("n0", 500)  # before it joins
    for i in range(4):
        index.join(joined(f"n{i}"), NOW, __version__)
    assert [index.stake[index.row[f"n{i}"]] for i in range(4)] == [500, 0, 0, 0]  # unknown to the chain: 0
    req = Requirements(min_stake=100, version=__version__)
    with pytest.raises(NotEnoughNodes):
        pick(index, req=req)
    index.set_stake("n1", 100)
    index.set_stake("n2", 300)
    assert sorted(pick(index, req=req)) == ["n0", "n1", "n2"]
    index.join(msgspec.structs.replace(joined("n2"), started_at=NOW + 1), NOW + 1, __version__)  # a restart keeps it
    assert index.stake[index.row["n2"]] == 300
    index.set_stake("n2", 0)  # slashed, or leaving
    with pytest.raises(NotEnoughNodes):
        pick(index, req=req)


def test_model_names_nobody_has_any_more_leave_the_index():
    """Every announced model name is a column: names a node made up, or dropped, must not
    pile up (a node re-announcing with new names each time would grow the index forever)."""
    index = index_of(joined("n0", models=("tiny-sd", "made-up-1")), joined("n1", models=("tiny-sd", "shared")))
    index.join(joined("n0", models=("tiny-sd", "made-up-2", "shared")), NOW, __version__)
    assert "made-up-1" not in index.serves  # nobody has it any more
    assert {"tiny-sd", "made-up-2", "shared"} <= set(index.serves)
    index.join(joined("n0", models=("tiny-sd",)), NOW, __version__)
    assert "made-up-2" not in index.serves
    assert "shared" in index.serves  # n1 still has it
    assert index.registered_serving("shared") == 1
    for i in range(100):
        index.join(joined("n0", models=("tiny-sd", f"junk-{i}")), NOW, __version__)
    assert len(index.serves) == 3  # tiny-sd, shared, and the last junk name


def of_class(name: str, determinism: str):
    return msgspec.structs.replace(joined(name), determinism=determinism)


def test_the_copies_come_from_the_first_nodes_class_where_it_can():
    """Nodes of two classes: whichever node is drawn first, its copies are of its class
    (they compare bit for bit); over many draws, both classes lead."""
    h100 = [of_class(f"h{i}", "NVIDIA H100 sm9.0 cuda 12.8") for i in range(6)]
    a100 = [of_class(f"a{i}", "NVIDIA A100 sm8.0 cuda 12.8") for i in range(6)]
    index = index_of(*h100, *a100)
    classes = {n.node_id: n.determinism for n in (*h100, *a100)}
    leads = Counter()
    for seed in range(200):
        nodes = pick(index, seed=seed)
        assert len({classes[node] for node in nodes}) == 1, nodes
        leads[classes[nodes[0]]] += 1
    assert set(leads) == set(classes.values())


def test_a_node_of_a_rare_class_is_still_drawn_first_and_compared_across_classes():
    """Drawing the first node from all keeps a lone class in the sample: its copies then
    come from another class (compared by pHash), rather than it never being compared."""
    index = index_of(of_class("odd", "some-unique-class"), *[of_class(f"h{i}", "H100") for i in range(5)])
    firsts = [pick(index, seed=seed) for seed in range(200)]
    with_odd = [nodes for nodes in firsts if nodes[0] == "odd"]
    assert with_odd  # it leads some sampled tasks
    assert all(len(nodes) == 3 for nodes in with_odd)
    # when an H100 leads, its copies are H100s: the odd node is never needed
    assert all("odd" not in nodes for nodes in firsts if nodes[0] != "odd")


def test_a_class_of_few_operators_is_not_checked_only_by_itself():
    """Three operators that announce one made-up class: were their copies drawn from it, a
    cheat leading a sampled task would be checked only by its accomplices. Below the floor
    of operators (five), copies come from anyone."""
    made_up = [of_class(f"x{i}", "made-up") for i in range(3)]
    index = index_of(*made_up, *[of_class(f"h{i}", "H100") for i in range(6)])
    led = [nodes for nodes in (pick(index, seed=seed) for seed in range(300)) if nodes[0].startswith("x")]
    assert led
    assert any(not node.startswith("x") for nodes in led for node in nodes[1:])
    all_accomplices = sum(all(node.startswith("x") for node in nodes) for nodes in led)
    assert all_accomplices < len(led) / 4  # by weight, not by class: two of eight others are accomplices
