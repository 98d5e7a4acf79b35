"""The gateway while the bus cannot store (a NATS server lost, the TASKS stream's leader
being elected): a request fails fast with 503 `unavailable` and `Retry-After`, never a 500
and never a wait (a request path is not patient: bus.patiently), and the app's retry with
the same Idempotency-Key, once the stream is back, is one task."""

from __future__ import annotations

import dataclasses

from stipple_common import bus, subjects
from stipple_common.messages import task_event_decoder

TASK = {
    "base_model": "tiny-sd",
    "prompt": "a lighthouse",
    "task_config": {"image_width": 64, "image_height": 64, "steps": 2},
}


async def test_a_submission_while_the_tasks_stream_cannot_store_is_a_503_with_retry_after(make_gateway, asgi_client):
    gw = await make_gateway()
    config = (await gw.js.stream_info(subjects.TASKS_STREAM)).config
    # as during an election: nothing answers a publish on tasks.*.submitted
    await gw.js.update_stream(dataclasses.replace(config, subjects=["tasks.*.nothing"]))
    headers = {"Idempotency-Key": "lighthouse-1"}
    try:
        async with asgi_client(gw) as client:
            away = await client.post("/v1/tasks", json=TASK, headers=headers)
            assert away.status_code == 503, away.text
            assert away.json()["error"]["code"] == "unavailable"
            assert away.headers["Retry-After"] == "1"
            await gw.js.update_stream(config)
            back = await client.post("/v1/tasks", json=TASK, headers=headers)
            again = await client.post("/v1/tasks", json=TASK, headers=headers)
    finally:
        await gw.js.update_stream(config)
    assert back.status_code == again.status_code == 202, back.text
    task_id = back.json()["task_id"]
    assert again.json()["task_id"] == task_id
    stored = await bus.read_subject(
        gw.js, subjects.TASKS_STREAM, subjects.task_subject(task_id, "submitted"), task_event_decoder
    )
    assert len(stored) == 1
