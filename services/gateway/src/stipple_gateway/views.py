"""What the gateway answers, as msgspec Structs: the handlers build these, and the OpenAPI
document's schemas are generated from the same types, so the two cannot drift apart."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from stipple_common.aggregate import NodeStatus, Task, TaskStatus
from stipple_common.messages import Progress, QueueStatus, TaskEvent, TaskSubmitted, Validation, Verdict, event_name
from stipple_common.taskspec import TaskSpec

# --------------------------------------------------------------------------- requests


class TaskRequest(TaskSpec, frozen=True, kw_only=True):
    """The body of ``POST /v1/tasks``: a task, and optionally where to POST its outcome and how
    to validate it."""

    webhook_url: Annotated[
        str,
        msgspec.Meta(
            max_length=2000,
            description="An http(s) URL the gateway POSTs the task view to when the task ends, signed by the "
            "Standard Webhooks scheme with the app's own secret (GET /v1/webhook-secret; needs "
            "STIPPLE_WEBHOOK_SECRET on the gateway).",
        ),
    ] = ""
    validation: Annotated[
        Validation,
        msgspec.Meta(
            description='"sampled": one node, and three when the network\'s secret sample draws the task; '
            '"full": three nodes always, compared, and the fee is charged three times.'
        ),
    ] = "sampled"


# --------------------------------------------------------------------------- task view


class StepProgress(msgspec.Struct, kw_only=True, omit_defaults=True):
    step: int
    total: int
    eta_s: float | None = None  # seconds until its last step, from its step rate so far (once known)


class NodeImageView(msgspec.Struct, kw_only=True):
    index: int
    phash: str
    seed: int


class NodeErrorView(msgspec.Struct, kw_only=True):
    code: str
    message: str


class NodeView(msgspec.Struct, kw_only=True, omit_defaults=True):
    node_id: str
    status: NodeStatus
    images: list[NodeImageView]
    error: NodeErrorView | None = None
    progress: StepProgress | None = None  # the node's latest step, while this gateway has it
    commit_order: int = 0  # 1 for the first node to commit its result, 2 for the second, ...


class OutcomeView(msgspec.Struct, kw_only=True):
    status: TaskStatus
    reason: str
    detail: str
    verdicts: dict[str, Verdict]
    finished_at: float | None  # when the outcome was stored (server clock, epoch seconds)
    verdict_details: dict[str, str] = {}  # why a node's result was not believed (bad_result, bad_commitment)


class ImageView(msgspec.Struct, kw_only=True):
    index: int
    url: str
    seed: int
    phash: str
    width: int
    height: int


class QueueView(msgspec.Struct, kw_only=True):
    position: int  # tasks ahead of this one for the same nodes; 0 is next
    queue_length: int  # every queued task
    eta_s: float  # estimated seconds until it finishes


class TaskView(msgspec.Struct, kw_only=True, omit_defaults=True):
    task_id: str
    status: TaskStatus
    source: str
    submitted_at: float
    seed: int
    task: TaskSpec  # input images summarized as "<image, N characters>"
    nodes: list[NodeView]
    owner: str = ""  # the API key id that submitted it
    webhook_url: str = ""
    fee: int = 0
    queue: QueueView | None = None  # while pending: its place in the dispatcher's queue
    outcome: OutcomeView | None = None  # once finished
    images: list[ImageView] | None = None  # once succeeded
    expires_at: float | None = None  # once succeeded, when results expire (STIPPLE_RESULT_TTL_S)


class TaskLinks(msgspec.Struct, kw_only=True):
    self: str
    events: str


class TaskAccepted(msgspec.Struct, kw_only=True):
    task_id: str
    status: Literal["pending"]
    seed: int
    links: TaskLinks


# --------------------------------------------------------------------------- other answers


class NodeInfo(msgspec.Struct, kw_only=True):
    node_id: str  # the node's Ethereum address in lower case
    operator: str  # who owns its stake on chain (the node itself when it staked alone)
    device: str
    models: list[str]
    live: bool
    last_seen_s_ago: float
    address: str = ""  # the node's Ethereum address, checksummed: it signs commitments, stakes and is paid
    stake: int = 0  # its stake as the chain says (smallest token unit; 0 while leaving)


class NodesView(msgspec.Struct, kw_only=True):
    nodes: list[NodeInfo]
    live: int


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "unavailable"]
    nats: bool
    live_nodes: int


class SdcnResult(msgspec.Struct, kw_only=True):
    images: list[str]  # base64 PNGs
    task_id: str
    seeds: list[int]


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    field: str | msgspec.UnsetType = msgspec.UNSET  # the input field at fault
    value: Any = msgspec.UNSET  # its value (repr() of it when not a JSON scalar)
    limit: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET  # 429: key_id, rate_per_minute, burst
    status: str | msgspec.UnsetType = msgspec.UNSET  # 409 already_finished: the task's status
    reason: str | msgspec.UnsetType = msgspec.UNSET  # 409 already_finished: its outcome reason


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class SdcnError(msgspec.Struct, kw_only=True):
    msg: str


# --------------------------------------------------------------------------- building them


def image_summary(data_url: str) -> str:
    return f"<image, {len(data_url)} characters>" if data_url else ""


def spec_view(spec: TaskSpec) -> TaskSpec:
    """The task as stored, with input images summarized: they can be megabytes each."""
    controlnet = spec.controlnet
    if controlnet is not None:
        controlnet = msgspec.structs.replace(controlnet, image_dataurl=image_summary(controlnet.image_dataurl))
    return msgspec.structs.replace(
        spec,
        init_image=image_summary(spec.init_image),
        mask_image=image_summary(spec.mask_image),
        controlnet=controlnet,
    )


def task_view(
    task: Task,
    *,
    progress: dict[str, Progress] | None = None,
    etas: dict[str, float] | None = None,
    finished_at: float | None = None,
    result_ttl_s: float = 0.0,
    queue: QueueStatus | None = None,
) -> TaskView:
    """The app's view of a task."""
    progress, etas = progress or {}, etas or {}
    nodes = []
    for run in task.nodes.values():
        step = progress.get(run.node_id)
        nodes.append(
            NodeView(
                node_id=run.node_id,
                status=run.status,
                images=[NodeImageView(index=i.index, phash=i.phash, seed=i.seed) for i in run.images],
                error=NodeErrorView(code=run.error_code, message=run.error_message) if run.error_code else None,
                progress=StepProgress(step=step.step, total=step.total, eta_s=etas.get(run.node_id)) if step else None,
                commit_order=run.commit_order,
            )
        )
    view = TaskView(
        task_id=task.task_id,
        status=task.status,
        source=task.source,
        submitted_at=task.submitted_at,
        seed=task.spec.task_config.seed,
        task=spec_view(task.spec),
        nodes=nodes,
        owner=task.owner,
        webhook_url=task.webhook_url,
        fee=task.fee,
    )
    if queue is not None:
        view.queue = QueueView(position=queue.position, queue_length=queue.queue_length, eta_s=queue.eta_s)
    if task.finished:
        view.outcome = OutcomeView(
            status=task.status,
            reason=task.reason,
            detail=task.detail,
            verdicts=task.verdicts,
            finished_at=finished_at,
            verdict_details=task.verdict_details,
        )
    if task.status == "succeeded":
        view.images = [
            ImageView(
                index=i.index,
                url=f"/v1/tasks/{task.task_id}/images/{i.index}",
                seed=i.seed,
                phash=i.phash,
                width=i.width,
                height=i.height,
            )
            for i in task.images
        ]
        if result_ttl_s > 0 and finished_at is not None:
            view.expires_at = finished_at + result_ttl_s
    return view


def event_data(event: TaskEvent) -> dict[str, Any]:
    """An event as the events stream sends it: as stored, input images summarized."""
    data: dict[str, Any] = msgspec.to_builtins(event)
    if isinstance(event, TaskSubmitted):
        data["spec"] = msgspec.to_builtins(spec_view(event.spec))
    data["type"] = event_name(event)
    return data
