import msgspec
import pytest

from stipple_common.messages import (
    Assignment,
    ImageResult,
    NodeErrored,
    NodeHeartbeat,
    ResultRevealed,
    TaskAborted,
    TaskAssigned,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    assignment_decoder,
    encode,
    event_name,
    node_event_decoder,
    task_event_decoder,
)
from stipple_common.taskspec import parse_task
from stipple_testkit.nodes import joined

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "a fox", "task_config": {"seed": 3}})
IMG = ImageResult(index=0, key="tasks/t/n/0.png", phash="00ff00ff00ff00ff", seed=3, width=64, height=64)

EVENTS = [
    TaskSubmitted(task_id="t", spec=SPEC, submitted_at=1.5),
    TaskAssigned(task_id="t", nodes=["a", "b", "c"], deadline=10.0),
    TaskStarted(task_id="t", node_id="a"),
    ResultRevealed(task_id="t", node_id="a", images=[IMG], elapsed_s=0.2),
    NodeErrored(task_id="t", node_id="b", code="model_not_found", message="no"),
    TaskSucceeded(task_id="t", reason="majority", images=[IMG], verdicts={"a": "agree", "b": "error"}),
    TaskAborted(task_id="t", reason="no_agreement", detail="x"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_task_events_round_trip_through_one_decoder(event):
    data = encode(event)
    assert msgspec.json.decode(data)["type"] == event_name(event)
    assert task_event_decoder.decode(data) == event


def test_event_names_are_the_subject_tokens():
    assert [event_name(e) for e in EVENTS] == [
        "submitted",
        "assigned",
        "started",
        "revealed",
        "errored",
        "succeeded",
        "aborted",
    ]


def test_node_events_and_assignment_round_trip():
    announcement = joined("n", started_at=1.0)
    beat = NodeHeartbeat(node_id="n", at=2.0, busy=True)
    assert node_event_decoder.decode(encode(announcement)) == announcement
    assert node_event_decoder.decode(encode(beat)) == beat
    work = Assignment(task_id="t", spec=SPEC, deadline=3.0)
    assert assignment_decoder.decode(encode(work)) == work


def test_decoding_a_wrong_type_fails_loudly():
    with pytest.raises(msgspec.ValidationError):
        task_event_decoder.decode(b'{"type": "exploded", "task_id": "t"}')
    with pytest.raises(msgspec.ValidationError):
        task_event_decoder.decode(b'{"type": "started", "task_id": "t"}')  # node_id missing


def test_a_newer_event_with_extra_fields_still_decodes():
    data = msgspec.json.encode({"type": "started", "task_id": "t", "node_id": "a", "gpu_temp": 71})
    assert task_event_decoder.decode(data) == TaskStarted(task_id="t", node_id="a")


def test_an_announcement_without_loras_on_disk_reads_as_none_and_one_with_them_round_trips():
    """Nodes older than `loras_on_disk` leave it out; the gateway must read them as holding none."""
    older = msgspec.json.decode(encode(joined("n1")), type=dict)
    del older["loras_on_disk"]
    assert node_event_decoder.decode(msgspec.json.encode(older)).loras_on_disk == []
    newer = msgspec.structs.replace(joined("n1"), loras_on_disk=["acme/fox-lora", "https://x.test/cat.safetensors"])
    assert node_event_decoder.decode(encode(newer)).loras_on_disk == ["acme/fox-lora", "https://x.test/cat.safetensors"]
    too_many = {**older, "loras_on_disk": [f"acme/lora-{i}" for i in range(257)]}
    with pytest.raises(msgspec.ValidationError, match="loras_on_disk"):
        node_event_decoder.decode(msgspec.json.encode(too_many))
