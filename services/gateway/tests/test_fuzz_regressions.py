"""Regressions of what fuzzing the API (test_fuzz_api.py) found, as plain tests."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.integration


async def test_a_sync_wait_that_runs_out_reads_the_task_once(make_gateway: Any, asgi_client: Any) -> None:
    """`wait_for_outcome` waited on its future with `asyncio.wait_for`, which cancels the
    future when the time runs out; a cancelled future is "done", so the wait took it for a
    wake-up by an outcome and re-read the task OUTCOME_CONFIRM_TRIES times (a second more
    for every 504). Now the future is shielded: one read, then 504."""
    gw = await make_gateway(sync_timeout_s=0.2)
    reads: list[str] = []
    load_task = gw.load_task

    async def counted(task_id: str, owner: str = "") -> Any:
        reads.append(task_id)
        return await load_task(task_id, owner)

    gw.load_task = counted  # type: ignore[method-assign]
    async with asgi_client(gw) as client:
        response = await client.post("/txt2img", json={"prompt": "a fox", "width": 64, "height": 64})
    assert response.status_code == 504
    assert "did not finish within 0.2 s (state pending)" in response.json()["msg"]
    assert len(reads) == 1
