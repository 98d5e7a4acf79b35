"""The VALIDATION stream (subjects.validation_stream) on a real nats-server: the server
copies every TASKS message into the partition of its task id, in order, with the TASKS
sequence in a header only the server can write; `partition_for` is the server's hash."""

import asyncio
import uuid

import nats
import pytest
from nats.js.errors import BadRequestError

from stipple_common import subjects

pytestmark = pytest.mark.integration


@pytest.fixture
async def js(fresh_nats_url):
    nc = await nats.connect(fresh_nats_url)
    js = nc.jetstream()
    await js.add_stream(next(c for c in subjects.stream_configs() if c.name == subjects.TASKS_STREAM))
    yield js
    await nc.close()


async def copies(js, count, timeout=5.0):
    for _ in range(int(timeout / 0.05)):
        if (await js.stream_info(subjects.VALIDATION_STREAM)).state.messages >= count:
            break
        await asyncio.sleep(0.05)
    return [await js.get_msg(subjects.VALIDATION_STREAM, seq) for seq in range(1, count + 1)]


async def test_each_task_event_is_copied_to_its_tasks_partition_in_order_with_its_tasks_sequence(js):
    await js.add_stream(subjects.validation_stream(5))
    tasks = [uuid.uuid4().hex for _ in range(40)]
    published = []
    for task_id in tasks:
        for subject in (f"tasks.{task_id}.submitted", f"tasks.{task_id}.committed.0xnode"):
            published.append((subject, (await js.publish(subject, b"{}")).seq))
    seen = await copies(js, len(published))
    assert [(subjects.unpartitioned(m.subject), subjects.source_sequence(m.headers)) for m in seen] == published
    for m in seen:
        task_id = subjects.unpartitioned(m.subject).split(".")[1]
        assert subjects.partition_of(m.subject) == subjects.partition_for(task_id, 5)
    assert len({subjects.partition_of(m.subject) for m in seen}) == 5  # 40 tasks reach every partition


async def test_a_client_cannot_forge_the_source_header_the_validator_reads_the_sequence_from(js):
    await js.add_stream(subjects.validation_stream(3))
    forged = {"Nats-Stream-Source": "TASKS 999999 tasks.*.> x tasks.other.submitted AAAA"}
    with pytest.raises(BadRequestError):
        await js.publish(f"tasks.{uuid.uuid4().hex}.committed.0xnode", b"{}", headers=forged)


def test_subject_helpers_leave_other_subjects_alone():
    assert subjects.unpartitioned("vp.3.abc.committed.0xn") == "tasks.abc.committed.0xn"
    assert subjects.unpartitioned("tasks.abc.submitted") == "tasks.abc.submitted"
    assert subjects.partition_of("tasks.abc.submitted") == -1
    assert subjects.partition_of("vp.x.abc.submitted") == -1
    assert subjects.source_sequence(None) == 0
    assert subjects.source_sequence({"Nats-Stream-Source": "OTHER 5 a b c"}) == 0
    assert subjects.source_sequence({"Nats-Stream-Source": "TASKS 5 a b c d"}) == 5
    assert subjects.partitions_of(subjects.validation_stream(12)) == 12
    with pytest.raises(ValueError, match="partitions"):
        subjects.validation_stream(1)
