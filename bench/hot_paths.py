"""The fixed costs in the control plane's own Python, per call, on this machine.

bench/control_plane.py says how much CPU a task costs each process; this says what the
pieces every task pays for cost alone, in one process, without a server: what a cut in
one of them can save at most. Each figure is the best of several timed rounds (µs per
call), also given in reference loops (bench/control_plane.py's `reference_ms`, timed in the
same run: the host's speed drifts by half between runs minutes apart).

- the consumer wrapper (`bus._handle_one`) around a handler that does nothing: the span,
  the log context, the delivery count, the ack; every delivery to a service pays it;
- a task span continuing a stored carrier;
  these two first in a process that does not export (no span is made: the trace is carried,
  tracing.py), then with an exporter (every span made and recorded, here handed to a
  processor that drops it), and a span made with a tracer built per call
  (`trace.get_tracer` at each span, as before stop 26);
- signing a commitment (a node, per task) and recovering its signer (the validator, per
  revealed node: once per decision since stop 26, twice before);
- the dispatcher's VRF sampling proof (per task);
- the intake's facts of one 512x512 PNG (SHA-256, decode, pHash; per image).

    python bench/hot_paths.py
"""

from __future__ import annotations

import asyncio
import io
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from control_plane import reference_ms
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from PIL import Image

from stipple_common import bus, commitment, tracing
from stipple_common.pngfacts import png_facts
from stipple_common.vrf import SamplingProof, VrfKey

TASK_ID = "0123456789abcdef0123456789abcdef"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def best_us(batch: Callable[[int], object], number: int, rounds: int = 5) -> float:
    """µs per call: the best of `rounds` timings of `batch(number)`, which makes `number` calls."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        batch(number)
        best = min(best, (time.perf_counter() - started) / number)
    return best * 1e6


def calls(call: Callable[[], object]) -> Callable[[int], None]:
    """A batch of `call()`s, for `best_us`."""

    def batch(number: int) -> None:
        for _ in range(number):
            call()

    return batch


class _Client:
    """What a Msg's ack needs of a client: nothing is sent."""

    async def publish(self, *args: object, **kwargs: object) -> None:
        return None


def wrapper_us() -> float:
    client = _Client()
    tracer = trace.get_tracer("stipple.bench")

    async def nothing(msg: Msg) -> None:
        return None

    async def deliveries(number: int) -> None:
        for _ in range(number):
            msg = Msg(
                _client=client,  # type: ignore[arg-type]
                subject=f"tasks.{TASK_ID}.started.0x{'ab' * 20}",
                reply="$JS.ACK.TASKS.dispatcher.1.2.3.1700000000000000000.0",
                data=b"{}",
                headers={"traceparent": TRACEPARENT},
            )
            await bus._handle_one(msg, nothing, "TASKS", None, tracer)

    return best_us(lambda number: asyncio.run(deliveries(number)), 5_000)


def span_us(per_call_tracer: bool) -> float:
    def one() -> None:
        tracer = trace.get_tracer("stipple") if per_call_tracer else None
        with tracing.task_span("bench.span", task_id=TASK_ID, tracer=tracer, parent={"traceparent": TRACEPARENT}):
            pass

    return best_us(calls(one), 5_000)


def png_512() -> bytes:
    image = Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    tracing.setup_tracing("bench")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    reference = reference_ms()
    account = commitment.new_account()
    value = "0x" + "5a" * 32
    signature = commitment.sign(account, value)
    key = VrfKey.generate()
    image = png_512()
    rows = [
        ("consumer wrapper, per delivery (bus._handle_one, no-op handler), not exporting", wrapper_us()),
        ("task span, not exporting (the carrier's trace made current, no span)", span_us(per_call_tracer=False)),
    ]
    tracing.export_to(SpanProcessor())  # (a processor that does nothing with what it is handed)
    rows += [
        ("consumer wrapper, per delivery, exporting (a recorded span)", wrapper_us()),
        ("task span, exporting (recorded), the module's tracer", span_us(per_call_tracer=False)),
        ("task span, exporting, a tracer built per call (before stop 26)", span_us(per_call_tracer=True)),
        ("sign a commitment (node, per task)", best_us(calls(lambda: commitment.sign(account, value)), 2_000)),
        (
            "recover a commitment's signer (validator, per revealed node)",
            best_us(calls(lambda: commitment.signer(value, signature)), 2_000),
        ),
        (
            "VRF sampling proof (dispatcher, per task)",
            best_us(calls(lambda: SamplingProof.make(key, TASK_ID, 0.1)), 500),
        ),
        (
            f"PNG facts of a 512x512 image, {len(image) // 1024} KiB (intake, per image)",
            best_us(calls(lambda: png_facts(image, max_pixels=2**22)), 20, rounds=3),
        ),
    ]
    print(f"reference loop (bench/control_plane.py reference_ms): {reference:.1f} ms, just before\n")
    print(f"{'what':<78} {'µs per call':>12} {'‰ of a ref. loop':>17}")
    for name, micros in rows:
        print(f"{name:<78} {micros:>12.1f} {micros / reference:>17.2f}")


if __name__ == "__main__":
    main()
