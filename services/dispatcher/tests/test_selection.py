import random

import pytest

from stipple_common.messages import NodeJoined
from stipple_common.taskspec import parse_task
from stipple_dispatcher.selection import NotEnoughNodes, pick

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p"})


def node(node_id, operator=None, models=("tiny-sd",)):
    return NodeJoined(
        node_id=node_id,
        operator=operator or node_id,
        device="cpu",
        memory_bytes=1,
        models=list(models),
        version="0.1.0",
        started_at=0.0,
    )


def test_picks_distinct_nodes_serving_the_model():
    nodes = [node(f"n{i}") for i in range(6)] + [node("other", models=("sdxl",))]
    chosen = pick(nodes, SPEC, 3, random.Random(1))
    assert len(chosen) == 3
    assert len(set(chosen)) == 3
    assert "other" not in chosen


def test_never_two_nodes_of_one_operator():
    nodes = [node("a1", "alice"), node("a2", "alice"), node("a3", "alice"), node("b1", "bob"), node("c1", "carol")]
    for seed in range(30):
        chosen = pick(nodes, SPEC, 3, random.Random(seed))
        operators = [n.operator for n in nodes if n.node_id in chosen]
        assert sorted(operators) == ["alice", "bob", "carol"]


def test_choice_is_random_across_tasks():
    nodes = [node(f"n{i}") for i in range(8)]
    seen = {frozenset(pick(nodes, SPEC, 3, random.Random(seed))) for seed in range(20)}
    assert len(seen) > 5


def test_too_few_says_how_many_there_are():
    nodes = [node("a1", "alice"), node("a2", "alice"), node("b1", "bob"), node("x", models=("sdxl",))]
    with pytest.raises(NotEnoughNodes, match="3 live nodes of 2 operators serve it") as info:
        pick(nodes, SPEC, 3, random.Random(0))
    assert info.value.retryable


def test_a_model_on_a_nodes_disk_counts_as_served():
    spec = parse_task({"base_model": "org/some-model", "prompt": "p"})
    on_disk = [
        NodeJoined(
            node_id=f"n{i}",
            operator=f"o{i}",
            device="cpu",
            memory_bytes=1,
            models=["tiny-sd"],
            models_on_disk=["org/some-model"],
            version="0",
            started_at=0.0,
        )
        for i in range(3)
    ]
    assert sorted(pick(on_disk, spec, 3, random.Random(0))) == ["n0", "n1", "n2"]
    with pytest.raises(NotEnoughNodes):
        pick([node(f"m{i}") for i in range(3)], spec, 3, random.Random(0))
