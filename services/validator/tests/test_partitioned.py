"""The partitioned validator's stream (ensure_validation_stream): made once with its
partition count, which a validator started with another count refuses; a network whose
single validator ran before copies TASKS from after what that validator acknowledged; a
partition consumer that fails for good ends the service, its partitions given back."""

import asyncio
import uuid

import nats.js.errors
import pytest

from stipple_common import subjects
from stipple_common.lease import partition_key
from stipple_common.settings import InvalidSettings
from stipple_validator.service import ValidatorSettings, ensure_validation_stream

pytestmark = pytest.mark.integration


@pytest.fixture
def js(fresh_js):
    return fresh_js


def settings(url, partitions):
    return ValidatorSettings(nats_url=url, partitions=partitions)


async def test_the_partition_count_is_fixed_once_the_stream_is_made(js, fresh_nats_url):
    await ensure_validation_stream(js, settings(fresh_nats_url, 4))
    await ensure_validation_stream(js, settings(fresh_nats_url, 4))  # the same count: fine, again
    with pytest.raises(InvalidSettings, match=r"STIPPLE_PARTITIONS=3: the VALIDATION stream was made with 4"):
        await ensure_validation_stream(js, settings(fresh_nats_url, 3))


async def test_a_network_the_single_validator_served_is_copied_from_after_what_it_acknowledged(js, fresh_nats_url):
    tasks = [uuid.uuid4().hex for _ in range(6)]
    for task_id in tasks:
        await js.publish(subjects.task_subject(task_id, "submitted"), b"{}")
    single = subjects.validator_consumer()
    await js.add_consumer(subjects.TASKS_STREAM, single)
    sub = await js.pull_subscribe_bind(durable=single.durable_name, stream=subjects.TASKS_STREAM)
    for msg in await sub.fetch(4, timeout=5):  # it judged the first four
        await msg.ack_sync()
    await ensure_validation_stream(js, settings(fresh_nats_url, 2))
    copied = []
    for _ in range(100):
        state = (await js.stream_info(subjects.VALIDATION_STREAM)).state
        if state.messages >= 2:
            break
        await asyncio.sleep(0.05)
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await js.get_msg(subjects.VALIDATION_STREAM, seq)
        copied.append(subjects.unpartitioned(msg.subject).split(".")[1])
    assert copied == tasks[4:]


async def test_a_new_network_is_copied_from_its_first_task(js, fresh_nats_url):
    first = uuid.uuid4().hex
    await js.publish(subjects.task_subject(first, "submitted"), b"{}")
    await ensure_validation_stream(js, settings(fresh_nats_url, 2))
    for _ in range(100):
        if (await js.stream_info(subjects.VALIDATION_STREAM)).state.messages:
            break
        await asyncio.sleep(0.05)
    msg = await js.get_msg(subjects.VALIDATION_STREAM, 1)
    assert subjects.unpartitioned(msg.subject) == subjects.task_subject(first, "submitted")


async def test_a_partition_consumer_that_fails_past_its_supervision_ends_the_service(fresh_nats_url, monkeypatch):
    """As a single validator's consumer does: the service ends (and its pod restarts),
    giving its partitions back, rather than run on without them."""
    from stipple_common.service import ServiceContext, open_service
    from stipple_validator.service import serve

    async def failing(self, *args, **kwargs):
        raise RuntimeError("the consumer gave up")

    monkeypatch.setattr(ServiceContext, "consume", failing)
    config = ValidatorSettings(nats_url=fresh_nats_url, partitions=2, lease_s=1.0, instance="v0")
    async with open_service("validator", config, blobs=True) as ctx:
        with pytest.raises(RuntimeError, match="the consumer gave up"):
            await asyncio.wait_for(serve(ctx, config), 30)
        kv = await ctx.js.key_value(subjects.LEASES_BUCKET)
        for k in range(2):  # given back on the way out: another replica takes them at once
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await kv.get(partition_key(subjects.VALIDATOR_DURABLE, k))
