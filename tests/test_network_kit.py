"""The test kit's network says why a task never ended when a control-plane service failed:
the services share one stop, so the first to fail ends them all, and a test waiting on a
task would otherwise see only a timeout (as a CI run did, with nothing in the log)."""

from __future__ import annotations

import re

import nats.js.errors
import pytest

from stipple_common import subjects
from stipple_common.settings import InvalidSettings
from stipple_testkit.network import Network
from stipple_testkit.waits import until
from stipple_validator.service import ValidatorSettings, ensure_validation_stream

pytestmark = pytest.mark.integration


async def test_a_failed_service_is_reported_by_the_task_waiting_on_it(fresh_js, fresh_nats_url):
    await ensure_validation_stream(fresh_js, ValidatorSettings(nats_url=fresh_nats_url, partitions=2))
    async with Network.plain(fresh_nats_url) as net:
        await net.dispatcher()
        await net.validator(partitions=4)  # refused at its start: the stream was made with 2
        with pytest.raises(AssertionError, match=r"the validator service failed: InvalidSettings") as failed:
            await net.run_task(timeout=60)  # (not waited out: that would be "never ended")
        assert isinstance(failed.value.__cause__, InvalidSettings)


async def test_a_task_that_never_ends_is_reported_with_what_the_streams_hold_of_it(fresh_nats_url):
    async with Network.plain(fresh_nats_url) as net:
        await net.dispatcher()  # no node: the task waits in the queue
        await net.validator(partitions=2, instance="v0")
        task_id = await net.submit_task()
        js = (await net.client("gateway")).js
        k = subjects.partition_for(task_id, 2)
        durable = subjects.validator_partition_consumer(k).durable_name

        async def copy_acked() -> bool:  # the validator took its partition and acked the copy (no nodes yet)
            try:
                c = await js.consumer_info(subjects.VALIDATION_STREAM, durable)
            except nats.js.errors.NotFoundError:
                return False
            return c.delivered.stream_seq >= 1 and c.num_pending == 0 and c.num_ack_pending == 0

        await until("the validator acked the task's copy", copy_acked, timeout=30)  # (a loaded CI: not 1.5 s)
        with pytest.raises(AssertionError, match="never ended") as failed:
            await net.outcome(task_id, timeout=0.5)
    said = str(failed.value)
    assert re.search(r"TASKS \d+:submitted@0\.0", said), said  # its events, with their sequence numbers
    assert re.search(rf"VALIDATION p{k} \(not acked\) none;", said), said  # acked: nothing of it left
    assert re.search(rf"consumer p{k}: delivered \d+, ack floor \d+, pending 0, unacked 0", said), said
