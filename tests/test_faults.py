"""Nothing is lost: services are SIGKILLed in the middle of tasks and restarted, and
every task still ends, exactly once, with the right outcome.

The real network as processes (LocalNetwork, as `stipple up` runs it). Each test
submits a batch over HTTP, kills one service while the batch is in flight, restarts it,
and then checks every task's events in the stream: one outcome each, `succeeded`, and
no honest node judged wrong.
"""

from __future__ import annotations

import asyncio

import pytest

from stipple_cli.network import LocalNetwork
from stipple_testkit.faults import check_all_succeeded_once, computing, outcomes, submit_batch, wait_live

# The network runs as processes (eight interpreters importing torch and the services): its
# start takes up to a minute and more on a cold machine, so these modules have five, and
# they share one test worker (xdist_group "process-networks", see conftest.py) instead of starting two at once.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("process-networks"),
]

BATCH = 6


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("faults"),
        port=0,
        nodes=3,
        extra_env={
            "STIPPLE_VALIDATION_RATE": "1",  # every task on three nodes: a killed one leaves two
            "STIPPLE_TASK_TIMEOUT_S": "20",  # a killed node's commitment is given up after this
            "STIPPLE_DISPATCH_TIMEOUT_S": "120",  # queued tasks outwait a restart
        },
    )
    net.start(timeout=240)
    yield net
    net.stop()


@pytest.mark.parametrize("victim", ["dispatcher", "validator"])
async def test_a_control_service_killed_mid_batch_loses_nothing(network: LocalNetwork, victim: str) -> None:
    task_ids = submit_batch(network.gateway_url, BATCH)
    await asyncio.sleep(0.5)  # some tasks assigned, some queued, some committed
    network.kill(victim)
    await asyncio.sleep(2.0)
    network.restart(victim)
    found = await outcomes(network.admin_url(), task_ids)
    check_all_succeeded_once(found, honest=set(network.node_ids().values()))


async def test_a_node_killed_mid_task_is_timed_out_and_the_tasks_still_end(network: LocalNetwork) -> None:
    wait_live(network, 3)
    task_ids = submit_batch(network.gateway_url, BATCH, steps=20)
    ids = network.node_ids()
    victim_task = await computing(network.admin_url(), task_ids, ids["node-2"])
    network.kill("node-2")
    # the task goes on without it: at the commit deadline the two others decide it
    first = await outcomes(network.admin_url(), [victim_task], timeout=60)
    assert first[victim_task], "the task of the killed node never ended"
    network.restart("node-2")  # back with a new process; the queued tasks need it
    found = await outcomes(network.admin_url(), task_ids, timeout=240)
    check_all_succeeded_once(found, honest=set(ids.values()))
    assert found[victim_task][0].verdicts == {ids["node-1"]: "agree", ids["node-2"]: "timeout", ids["node-3"]: "agree"}
    assert found[victim_task][0].qos[ids["node-2"]] == 0
