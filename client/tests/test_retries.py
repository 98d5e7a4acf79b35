"""The client's retry policy, its error mapping and its SSE parser, without a network: the
requests answered by httpx.MockTransport, and the policy's waits read off the effects that
the shared core yields (_core.py), so no test sleeps."""

from __future__ import annotations

import httpx
import pytest

from stipple_client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidInput,
    NotFound,
    RateLimited,
    StippleError,
    Unauthorized,
    Unavailable,
)
from stipple_client._core import Close, Core, EventParser, Read, Send, Sleep, task_body
from stipple_client.errors import error_from

ACCEPTED = {"task_id": "a" * 32, "status": "pending", "seed": 7, "links": {"self": "/v1/tasks/" + "a" * 32}}
TASK = {"base_model": "tiny-sd", "prompt": "a fox"}


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: object
) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, **extra}}, headers=headers)


class Script:
    """A MockTransport handler answering the requests with `answers` in order, recording them."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_503_then_202_is_retried_with_the_same_idempotency_key() -> None:
    script = Script(error(503, "no_nodes", "not enough live nodes"), httpx.Response(202, json=ACCEPTED))
    with Client("http://gateway", transport=httpx.MockTransport(script), backoff=0) as client:
        submitted = client.submit("a fox", model="tiny-sd", steps=4)
    assert submitted.task_id == "a" * 32
    assert submitted.seed == 7
    assert [r.method for r in script.requests] == ["POST", "POST"]
    keys = {r.headers["idempotency-key"] for r in script.requests}
    assert len(keys) == 1
    assert len(keys.pop()) == 32  # a fresh uuid4 hex per call
    assert script.requests[0].content == script.requests[1].content


async def test_the_async_client_retries_no_answer_and_keeps_a_given_idempotency_key() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(202, json=ACCEPTED))

    async def handler(request: httpx.Request) -> httpx.Response:
        return script(request)

    async with AsyncClient("http://gateway", transport=httpx.MockTransport(handler), backoff=0) as client:
        submitted = await client.submit(task=TASK, idempotency_key="order-42")
    assert submitted.task_id == "a" * 32
    assert [r.headers["idempotency-key"] for r in script.requests] == ["order-42", "order-42"]


def test_the_api_key_is_sent_as_a_bearer_token() -> None:
    script = Script(httpx.Response(200, json={"nodes": [], "live": 0}))
    with Client("http://gateway/prefix", "s3cret-key", transport=httpx.MockTransport(script)) as client:
        assert client.nodes() == []
    (request,) = script.requests
    assert request.headers["authorization"] == "Bearer s3cret-key"
    assert request.url == "http://gateway/prefix/v1/nodes"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, InvalidInput),
        (401, Unauthorized),
        (402, InvalidInput),  # insufficient_deposit names `fee`: any 4xx naming a field is the input's fault
        (404, NotFound),
        (409, Conflict),
        (410, NotFound),
        (413, InvalidInput),
        (422, InvalidInput),
        (429, RateLimited),
        (500, StippleError),
        (502, Unavailable),
        (503, Unavailable),
    ],
)
def test_each_status_has_its_error_kind(status: int, kind: type[StippleError]) -> None:
    answer = error(status, "some_code", "what went wrong", headers={"Retry-After": "3"}, field="f", value=[1])
    raised = error_from(answer)
    assert type(raised) is kind
    assert (raised.status, raised.code, raised.message, raised.field, raised.value) == (
        status,
        "some_code",
        "what went wrong",
        "f",
        [1],
    )
    assert str(raised) == f"what went wrong (HTTP {status}, some_code)"
    if status == 429:
        assert raised.retry_after == 3.0


def test_an_answer_that_is_not_the_native_error_shape_keeps_its_text() -> None:
    raised = error_from(httpx.Response(502, text="Bad Gateway from the load balancer"))
    assert type(raised) is Unavailable
    assert (raised.code, raised.message, raised.field) == ("http_502", "Bad Gateway from the load balancer", None)
    refused = error_from(httpx.Response(405, json={"detail": "Method Not Allowed"}))
    assert type(refused) is StippleError  # a 4xx naming no field is not known to be the input's fault
    assert refused.code == "http_405"


def test_other_4xx_are_never_retried_and_name_the_field_and_value() -> None:
    refusal = httpx.Response(
        422,
        json={"error": {"code": "invalid_input", "message": "steps", "field": "task_config.steps", "value": 0}},
    )
    script = Script(refusal)
    with (
        Client("http://gateway", transport=httpx.MockTransport(script), backoff=0) as client,
        pytest.raises(InvalidInput) as raised,
    ):
        client.submit("a fox", model="tiny-sd", steps=0)
    assert len(script.requests) == 1
    assert (raised.value.status, raised.value.field, raised.value.value) == (422, "task_config.steps", 0)

    script = Script(error(404, "not_found", "no task with id 'x'"))
    with (
        Client("http://gateway", transport=httpx.MockTransport(script), backoff=0) as client,
        pytest.raises(NotFound) as missing,
    ):
        client.get("x")
    assert len(script.requests) == 1
    assert missing.value.code == "not_found"


def test_retries_give_up_with_the_last_error() -> None:
    script = Script(*[error(503, "unavailable", "the message bus is unavailable; retry")] * 3)
    with (
        Client("http://gateway", transport=httpx.MockTransport(script), retries=2, backoff=0) as client,
        pytest.raises(Unavailable) as raised,
    ):
        client.nodes()
    assert len(script.requests) == 3
    assert (raised.value.status, raised.value.code) == (503, "unavailable")

    script = Script(*[httpx.ConnectError("refused")] * 2)
    with (
        Client("http://gateway", transport=httpx.MockTransport(script), retries=1, backoff=0) as client,
        pytest.raises(Unavailable) as gone,
    ):
        client.nodes()
    assert len(script.requests) == 2
    assert (gone.value.status, gone.value.code) == (None, "connection_failed")


def run(op, *answers):
    """Drive a core operation by hand: answer each Send with the next of `answers`, and return
    the effects it yielded and its result (or raise its error)."""
    effects = []
    answers = list(answers)
    reply = None
    try:
        while True:
            effect = op.send(reply)
            effects.append(effect)
            reply = answers.pop(0) if isinstance(effect, Send) else None
    except StopIteration as stop:
        return effects, stop.value


def test_retry_after_is_honoured_up_to_the_cap_and_backoff_doubles() -> None:
    limited = error(429, "rate_limited", "over the limit", headers={"Retry-After": "7"})
    core = Core(retries=3, backoff=0.5, max_wait=5.0)
    effects, response = run(core.request("GET", "/v1/nodes"), limited, limited, httpx.Response(200, json={}))
    assert [e.seconds for e in effects if isinstance(e, Sleep)] == [5.0, 5.0]  # 7 s asked, capped at max_wait
    assert response.status_code == 200

    core = Core(retries=3, backoff=1.0, max_wait=60.0)
    busy = error(503, "no_nodes", "not enough live nodes")
    effects, _ = run(core.request("GET", "/v1/nodes"), busy, busy, busy, httpx.Response(200, json={}))
    waits = [e.seconds for e in effects if isinstance(e, Sleep)]
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):  # full jitter on the upper half of 1, 2, 4 s
        assert 2**attempt / 2 <= wait <= 2**attempt

    core = Core(retries=0)
    with pytest.raises(RateLimited) as raised:
        run(core.request("GET", "/v1/nodes"), limited)
    assert raised.value.retry_after == 7.0


def test_a_dropped_event_stream_resumes_after_the_last_event_id() -> None:
    core = Core(retries=2, backoff=0)
    op = core.events("b" * 32)
    first = op.send(None)
    assert isinstance(first, Send)
    assert "last-event-id" not in {k.lower() for k in first.headers}
    stream = httpx.Response(200)
    read = op.send(stream)
    assert isinstance(read, Read)
    submitted = op.send('id: m1\nevent: submitted\ndata: {"type": "submitted"}\n\n: keep-alive\n\nevent: progr')
    assert (submitted.id, submitted.type, submitted.data) == ("m1", "submitted", {"type": "submitted"})
    assert isinstance(op.send(None), Read)
    progress = op.send('ess\ndata: {"step": 1, "total": 4}\n\n')  # an event split across chunks
    assert (progress.id, progress.type, progress.data) == (None, "progress", {"step": 1, "total": 4})
    assert isinstance(op.send(None), Read)
    assert op.throw(httpx.ReadError("connection reset")) == Close(stream)
    assert isinstance(op.send(None), Sleep)
    again = op.send(None)
    assert isinstance(again, Send)
    assert again.headers["Last-Event-ID"] == "m1"  # the gateway sends what came after it
    assert isinstance(op.send(httpx.Response(200)), Read)
    outcome = op.send('id: m2\nevent: succeeded\ndata: {"reason": "unanimous"}\n\n')
    assert outcome.is_outcome
    assert isinstance(op.send(None), Close)
    with pytest.raises(StopIteration) as ended:
        op.send(None)
    assert ended.value.value == outcome  # the stream ends with the outcome


def test_a_stream_that_keeps_ending_without_an_outcome_gives_up_after_the_retries() -> None:
    core = Core(retries=1, backoff=0)
    op = core.events("b" * 32)
    assert isinstance(op.send(None), Send)
    stream = httpx.Response(200)
    assert isinstance(op.send(stream), Read)
    assert op.send(None) == Close(stream)  # it ended without an outcome
    assert isinstance(op.send(None), Sleep)
    assert isinstance(op.send(None), Send)  # reopened
    assert isinstance(op.send(stream), Read)
    assert op.send(None) == Close(stream)
    with pytest.raises(Unavailable) as raised:
        op.send(None)
    assert "ended before the outcome, 2 times" in raised.value.message


def test_the_event_parser_follows_the_sse_format() -> None:
    parser = EventParser()
    events = parser.feed('id: 1\r\nevent: started\r\ndata: {"a":\r\ndata: 1}\r\n\r\n')
    assert [(e.id, e.type, e.data) for e in events] == [("1", "started", {"a": 1})]  # data lines join with \n
    events = parser.feed("data:plain\n\n:comment\n\ndata: [1, 2]\n\n")
    assert [(e.type, e.data) for e in events] == [("message", "plain"), ("message", [1, 2])]


def test_params_land_where_the_task_format_has_them() -> None:
    body = task_body(
        "a fox",
        {
            "model": "tiny-sd",
            "width": 128,
            "height": 96,
            "steps": 8,
            "seed": 3,
            "num_images": 2,
            "sampler": "Euler",
            "negative_prompt": "fog",
            "fee": None,
        },
    )
    assert body == {
        "prompt": "a fox",
        "base_model": "tiny-sd",
        "negative_prompt": "fog",
        "sampler": "Euler",
        "task_config": {"image_width": 128, "image_height": 96, "steps": 8, "seed": 3, "num_images": 2},
    }
    task = {"base_model": "x", "prompt": "p", "task_config": {"steps": 3, "cfg": 5.0}}
    assert task_body(None, {"steps": 9}, task=task, default_model="tiny-sd") == {
        "base_model": "x",
        "prompt": "p",
        "task_config": {"steps": 9, "cfg": 5.0},
    }
    assert task["task_config"]["steps"] == 3  # the caller's dict is left alone
    assert task_body("p", {}, default_model="tiny-sd")["base_model"] == "tiny-sd"


def test_the_event_parser_is_bounded_against_a_hostile_stream() -> None:
    """A gateway (or whatever answers in its place) cannot grow the client without end: an
    event over MAX_EVENT_CHARS, or data nested past MAX_EVENT_NESTING brackets, is a typed
    error; a long line fed in many chunks is appended, not split again at each one."""
    from stipple_client._core import MAX_EVENT_CHARS, MAX_EVENT_NESTING

    parser = EventParser()
    piece = "x" * 65536
    for _ in range(MAX_EVENT_CHARS // len(piece)):  # one line that never ends, up to the bound
        assert parser.feed(piece) == []
    with pytest.raises(StippleError) as too_long:
        parser.feed(piece)
    assert too_long.value.code == "bad_stream"

    deep = "data: " + "[" * (MAX_EVENT_NESTING + 1) + "]" * (MAX_EVENT_NESTING + 1) + "\n\n"
    with pytest.raises(StippleError) as nested:
        EventParser().feed(deep)
    assert nested.value.code == "bad_stream"

    steady = EventParser()  # many events, each small: the bound is per event, not per stream
    for i in range(2000):
        (event,) = steady.feed(f'id: {i}\nevent: progress\ndata: {{"step": {i}, "pad": "{"y" * 3000}"}}\n\n')
        assert event.data["step"] == i
