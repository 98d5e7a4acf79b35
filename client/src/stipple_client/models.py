"""What the client returns: plain dataclasses read from the gateway's JSON (views.py there).

They read the fields they know and keep the whole answer in `raw`, so a newer gateway that
adds fields does not break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OUTCOME_EVENTS = ("succeeded", "aborted", "cancelled")
"""The event types that end a task (and its events stream)."""


@dataclass(frozen=True)
class Image:
    """An image of a succeeded task; its PNG is at `url` (`Client.image(task_id, index)`)."""

    index: int
    url: str
    seed: int
    phash: str
    width: int
    height: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        return cls(
            index=int(data["index"]),
            url=str(data.get("url", "")),
            seed=int(data.get("seed", 0)),
            phash=str(data.get("phash", "")),
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
        )


@dataclass(frozen=True)
class Outcome:
    """How a task ended: `status` succeeded, aborted or cancelled; `reason` (unanimous,
    majority, no_agreement, too_few_results, ...) and `detail`; the verdict on each node."""

    status: str
    reason: str
    detail: str
    verdicts: dict[str, str] = field(default_factory=dict)
    finished_at: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(
            status=str(data["status"]),
            reason=str(data.get("reason", "")),
            detail=str(data.get("detail", "")),
            verdicts=dict(data.get("verdicts") or {}),
            finished_at=data.get("finished_at"),
        )


@dataclass(frozen=True)
class QueuePlace:
    """A pending task's place in the queue: `position` tasks ahead of it, `eta_s` to finish."""

    position: int
    queue_length: int
    eta_s: float


@dataclass(frozen=True)
class Task:
    """A task as ``GET /v1/tasks/{task_id}`` shows it. `spec` is the task as stored (the seed
    resolved, input images summarized); `nodes` the nodes running it, as the gateway's JSON."""

    task_id: str
    status: str  # pending, assigned, running, revealing, escalating, then succeeded, aborted or cancelled
    seed: int
    source: str
    submitted_at: float
    spec: dict[str, Any]
    nodes: list[dict[str, Any]]
    outcome: Outcome | None
    images: list[Image]
    queue: QueuePlace | None
    expires_at: float | None
    raw: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status in OUTCOME_EVENTS

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        queue = data.get("queue")
        outcome = data.get("outcome")
        return cls(
            task_id=str(data["task_id"]),
            status=str(data["status"]),
            seed=int(data.get("seed", -1)),
            source=str(data.get("source", "")),
            submitted_at=float(data.get("submitted_at", 0.0)),
            spec=dict(data.get("task") or {}),
            nodes=list(data.get("nodes") or []),
            outcome=Outcome.from_json(outcome) if outcome else None,
            images=[Image.from_json(image) for image in data.get("images") or []],
            queue=QueuePlace(int(queue["position"]), int(queue["queue_length"]), float(queue["eta_s"]))
            if queue
            else None,
            expires_at=data.get("expires_at"),
            raw=data,
        )


@dataclass(frozen=True)
class Submitted:
    """The gateway's 202 to a submitted task: its id, and its seed (resolved when it was -1)."""

    task_id: str
    status: str
    seed: int
    links: dict[str, str]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Submitted:
        return cls(
            task_id=str(data["task_id"]),
            status=str(data.get("status", "pending")),
            seed=int(data.get("seed", -1)),
            links=dict(data.get("links") or {}),
        )


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a task: `type` is submitted, assigned, started, committed,
    reveal, revealed, errored, progress (``data["step"]``, ``data["total"]``) or an outcome
    (succeeded, aborted, cancelled); `data` its JSON. Task events carry `id` (to resume after);
    progress events do not."""

    id: str | None
    type: str
    data: Any

    @property
    def is_outcome(self) -> bool:
        return self.type in OUTCOME_EVENTS


@dataclass(frozen=True)
class Generation:
    """A finished, succeeded task and its images: `images[i]` is the PNG of image i, made
    with seed `seeds[i]`."""

    task_id: str
    task: Task
    images: list[bytes]
    seeds: list[int]


@dataclass(frozen=True)
class Node:
    """A node the gateway knows (``GET /v1/nodes``)."""

    node_id: str
    operator: str
    device: str
    models: list[str]
    live: bool
    last_seen_s_ago: float
    address: str
    stake: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        return cls(
            node_id=str(data["node_id"]),
            operator=str(data.get("operator", "")),
            device=str(data.get("device", "")),
            models=list(data.get("models") or []),
            live=bool(data.get("live", False)),
            last_seen_s_ago=float(data.get("last_seen_s_ago", 0.0)),
            address=str(data.get("address", "")),
            stake=int(data.get("stake", 0)),
        )
