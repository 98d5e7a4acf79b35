"""The check a paused node must pass before the dispatcher hands it work again.

A node with 2 timeouts among its last 3 tasks is paused (qos.py). While it is paused
and live (heartbeating), the validator sends it a ProbeRequest on its control subject
every `probe_every_s`: a tiny task (one step, 64x64) on a model the node announced.
A node that answers ``nodes.<id>.probed`` without an error by the probe's deadline has
shown that it is reachable, takes control messages and runs its pipeline: its window
gets a `cleared` marker and ``nodes.<id>.qos`` says 0 recent timeouts, which lifts the
pause. An error or a late answer changes nothing but brings the next probe at the next
round; an answer to an older probe is ignored.

What the check does not prove is that the node computes honestly: nothing compares a
probe's image with anyone else's. Wrong results are what validation and slashing are for.

Paused nodes are rebuilt from the `qos` bucket at start; probes in flight are not (a new
one follows within `probe_every_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stipple_common import bus, subjects
from stipple_common.messages import NodeProbed, ProbeRequest, node_event_decoder
from stipple_common.nodes import NodeDirectory
from stipple_common.taskspec import TaskSpec, parse_task

from .qos import CLEARED, QosWindows, Sample, summary

log = structlog.get_logger("stipple.validator.probes")


def probe_spec(model: str, seed: int) -> TaskSpec:
    """The probe: the smallest task a node can run on `model`."""
    return parse_task(
        {
            "base_model": model,
            "prompt": "stipple probe",
            "task_config": {"image_width": 64, "image_height": 64, "steps": 1, "seed": seed, "num_images": 1},
        }
    )


@dataclass(frozen=True)
class _Sent:
    probe_id: str
    deadline: float


class Prober:
    def __init__(
        self,
        js: JetStreamContext,
        directory: NodeDirectory,
        windows: QosWindows,
        *,
        every_s: float,
        timeout_s: float,
    ) -> None:
        self.js = js
        self.directory = directory
        self.windows = windows
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.paused: set[str] = set()
        self.sent: dict[str, _Sent] = {}  # node -> its newest probe

    def pause_changed(self, node_id: str, paused: bool) -> None:
        """Told by the validator after each window update."""
        if paused:
            self.paused.add(node_id)
        else:
            self.paused.discard(node_id)
            self.sent.pop(node_id, None)

    async def rebuild(self) -> None:
        self.paused = set(await self.windows.paused())
        if self.paused:
            log.info("paused_nodes_rebuilt", nodes=sorted(self.paused))

    async def send_due(self, now: float | None = None) -> list[str]:
        """Probe every paused, live node whose last probe is answered wrongly or overdue."""
        now = time.time() if now is None else now
        live = {node.node_id: node for node in self.directory.live(now)}
        due = []
        for node_id in sorted(self.paused):
            node = live.get(node_id)
            last = self.sent.get(node_id)
            if node is None or not node.models or (last is not None and now < last.deadline):
                continue
            probe_id = secrets.token_hex(8)
            request = ProbeRequest(
                probe_id=probe_id,
                spec=probe_spec(node.models[0], secrets.randbelow(2**31)),
                deadline=now + self.timeout_s,
            )
            await bus.publish_control(self.js, node_id, request)
            self.sent[node_id] = _Sent(probe_id, request.deadline)
            due.append(node_id)
            log.info("probe_sent", node_id=node_id, probe_id=probe_id, model=node.models[0])
        return due

    async def answered(self, event: NodeProbed, received_at: float) -> bool:
        """Clear the node if this is the answer to its newest probe, in time and without error."""
        sent = self.sent.get(event.node_id)
        if sent is None or sent.probe_id != event.probe_id:
            return False
        if event.error or received_at > sent.deadline:
            log.warning("probe_failed", node_id=event.node_id, error=event.error or "late")
            self.sent.pop(event.node_id, None)  # the next round sends a new one
            return False
        changed_by = f"probe:{event.probe_id}"
        added = await self.windows.add(event.node_id, Sample(task_id=changed_by, score=0, verdict=CLEARED))
        if added is not None:  # (published even when unchanged: the dispatcher's unpause)
            qos = summary(event.node_id, added.window, changed_by)
            await bus.publish_event(self.js, qos)
        self.pause_changed(event.node_id, False)
        log.info("node_cleared", node_id=event.node_id, probe_id=event.probe_id, elapsed_s=event.elapsed_s)
        return True

    async def run(self, nc: NATS, stop: asyncio.Event) -> None:
        """Listen for answers (core NATS: a lost answer only means another probe) and
        send probes on a clock until `stop`."""

        async def on_answer(msg: Msg) -> None:
            try:
                event = node_event_decoder.decode(msg.data)
            except Exception as exc:
                log.warning("bad_probe_answer", subject=msg.subject, error=str(exc))
                return
            if isinstance(event, NodeProbed) and subjects.subject_token(msg.subject, 1) == event.node_id:
                try:
                    await self.answered(event, time.time())
                except (nats.errors.Error, TimeoutError) as exc:  # not cleared: the next probe asks again
                    log.warning("probe_answer_not_recorded", node_id=event.node_id, error=str(exc))

        sub = await nc.subscribe(subjects.node_subject("*", "probed"), cb=on_answer)
        try:
            while not stop.is_set():
                try:
                    await self.send_due()
                except (nats.errors.Error, TimeoutError) as exc:  # the next round tries again
                    log.warning("probes_not_sent", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every_s)
        finally:
            await sub.unsubscribe()
