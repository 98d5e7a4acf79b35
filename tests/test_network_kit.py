"""The test kit's network says why a task never ended when a control-plane service failed:
the services share one stop, so the first to fail ends them all, and a test waiting on a
task would otherwise see only a timeout (as a CI run did, with nothing in the log)."""

from __future__ import annotations

import re

import pytest

from stipple_common.settings import InvalidSettings
from stipple_testkit.network import Network
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
        with pytest.raises(AssertionError, match="never ended") as failed:
            await net.run_task(timeout=1.5)
    said = str(failed.value)
    assert re.search(r"TASKS \d+:submitted@0\.0", said), said  # its events, with their sequence numbers
    assert re.search(r"VALIDATION p[01] \(not acked\) .*submitted", said) is None, said  # acked: it has no nodes
    assert re.search(r"consumer p[01]: delivered \d+, ack floor \d+, pending 0, unacked 0", said), said
