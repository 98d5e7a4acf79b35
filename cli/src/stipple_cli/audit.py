"""`stipple audit`: check, from outside the control plane, that the sampled validation was drawn honestly.

A task runs on one node, and on `replication` nodes when the dispatcher's VRF selects it
(probability `STIPPLE_VALIDATION_RATE`) or when the app asked for `full` validation
(docs/validation.md). Nodes cannot see the draw, so the trust sits with the control plane:
it could compare fewer tasks than it promised, or pick which ones. The VRF takes the choice
away from it (one valid proof per task id and key; stipple_common.vrf), and this command
checks that it was used: for every task assigned in a time range (or named), from its
``submitted``, ``assigned`` and outcome events in the TASKS stream:

- ``no_proof``: the assignment carries no `SamplingProof`.
- ``untrusted_key``: the proof names a key that is not a trusted one (the `sampling` bucket's,
  or the ones given with ``--public-key``: an auditor should take the key out of band, since
  whoever writes the bucket could publish a key of their own choosing next to it).
- ``bad_proof``: the proof does not verify for this task id under its key: a proof copied
  from another task, or altered.
- ``wrong_selected``: `selected` is not what the proof's output implies at the proof's rate.
- ``wrong_rate``: the proof's rate is not the rate published for its key (or not a rate).
- ``wrong_nodes``: the assignment names other than 1 node for an unselected `sampled` task,
  `replication` for a selected or `full` one (or names a node twice).
- ``outcome_differs``: the outcome (succeeded or aborted) carries another proof than the
  assignment did: the validator copies it, it never draws.
- ``no_submission``: an assignment for a task the stream holds no submission of.

And the counts: tasks checked, selected, unselected, `full`, unassigned (ended before any
assignment: skipped), still waiting, named tasks the stream does not hold (an app checking
its own), and the observed selection rate against the published one, flagged when more
than 4 standard deviations off (a binomial test: a statistical flag, not proof; task ids
ground until the draw says no, or selected tasks left out of the stream, would show there).

The pure part (`audit`) takes the events; `audit_nats` reads them (one consumer on the
TASKS stream for a time range, from a start time; one for named tasks). Exit status: 0 when
nothing is found, 1 when something is, 2 when the audit cannot run (usage, NATS, no key).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from stipple_common import records, subjects
from stipple_common.errors import Rejected
from stipple_common.logs import redact
from stipple_common.messages import (
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskSubmitted,
    TaskSucceeded,
    decode_task_event,
)
from stipple_common.vrf import PUBLIC_KEY_BYTES, SamplingProof, alpha_for_task, sampled, verify

from . import state
from .connect import connect

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_REPLICATION = 3
DEFAULT_WINDOW_S = 3600.0  # the last hour, when no range and no tasks are given
DEFAULT_MARGIN_S = 600.0
FLAG_SIGMAS = 4.0
EVENTS = ("submitted", "assigned", *subjects.OUTCOME_EVENTS)  # what the audit reads of a task
Outcome = TaskSucceeded | TaskAborted | TaskCancelled
Kind = Literal[
    "no_proof",
    "untrusted_key",
    "bad_proof",
    "wrong_selected",
    "wrong_rate",
    "wrong_nodes",
    "outcome_differs",
    "no_submission",
]
_TASK_ID = re.compile(r"[^\s.*>]+")  # one subject token
_HEX_KEY = re.compile(rf"[0-9a-f]{{{2 * PUBLIC_KEY_BYTES}}}")


class AuditError(Exception):
    """The audit cannot run; the message says which input is missing or wrong (exit 2)."""


# --------------------------------------------------------------------------- the pure part


@dataclass(frozen=True)
class TaskEvents:
    """What the TASKS stream holds of one task: its first submission, its assignments (one,
    normally) and its first outcome (the one that counts: outcomes share a message id)."""

    task_id: str
    submitted: TaskSubmitted | None = None
    assigned: tuple[TaskAssigned, ...] = ()
    outcome: Outcome | None = None


@dataclass(frozen=True)
class Finding:
    """One problem with one task's sampling."""

    task_id: str
    kind: Kind
    detail: str

    def line(self) -> str:
        return f"task {self.task_id} {self.kind}: {self.detail}"


@dataclass
class Report:
    """The findings and the counts. `selected` + `unselected` are the checked tasks whose
    proof verifies under a trusted key (with a rate in [0, 1]); `unverified` the others."""

    findings: list[Finding] = field(default_factory=list)
    keys: dict[str, float | None] = field(default_factory=dict)  # trusted key -> published rate (None: unknown)
    replication: int = DEFAULT_REPLICATION
    checked: int = 0  # tasks with an assignment
    selected: int = 0
    unselected: int = 0
    unverified: int = 0
    full: int = 0  # checked tasks the app asked `full` validation for
    unassigned: int = 0  # ended (aborted, cancelled) before any assignment: skipped
    waiting: int = 0  # neither assigned nor ended yet: skipped
    expected_selected: float = 0.0  # the sum of the published rates over selected + unselected
    sd_selected: float = 0.0  # the binomial standard deviation of the selected count
    sigmas: float = 0.0  # (selected - expected) / sd; 0 when sd is 0
    rate_flag: bool = False  # more than FLAG_SIGMAS off: a statistical flag, not proof
    since: float | None = None  # the range read (None: named tasks only)
    until: float | None = None
    not_found: list[str] = field(default_factory=list)  # named tasks (--tasks) the stream does not hold

    @property
    def clean(self) -> bool:
        return not self.findings

    def rate_line(self) -> str:
        drawn = self.selected + self.unselected
        if not drawn:
            return "selection rate: no task with a verified proof"
        rates = sorted({r for r in self.keys.values() if r is not None})
        published = "/".join(f"{r:g}" for r in rates) or "unknown"
        text = (
            f"selection rate: {self.selected} of {drawn} selected ({self.selected / drawn:.1%}); published rate "
            f"{published}, expected {self.expected_selected:.1f} ± {self.sd_selected:.1f}"
        )
        if self.rate_flag:
            return (
                f"{text}: FLAG, {self.sigmas:+.1f} standard deviations off. A statistical flag, not proof: "
                "look for tasks left out of the stream, task ids chosen to dodge the draw, "
                "or a rate not the published one"
            )
        return f"{text} ({self.sigmas:+.1f} standard deviations: within {FLAG_SIGMAS:g})"

    def summary(self) -> str:
        verdict = "no findings" if self.clean else f"{len(self.findings)} findings"
        counts = (
            f"{verdict}: {self.checked} tasks checked ({self.selected} selected, {self.unselected} not selected, "
            f"{self.unverified} without a verified proof; {self.full} full); {self.unassigned} ended unassigned and "
            f"{self.waiting} waiting, skipped"
        )
        missing = ""
        if self.not_found:
            where = "the stream in the range" if self.since is not None else "the stream"
            missing = f"\n{len(self.not_found)} named tasks not in {where}: {', '.join(self.not_found)}"
        return f"{counts}\n{self.rate_line()}{missing}"

    def to_json(self) -> bytes:
        body = asdict(self)
        body["clean"] = self.clean
        body["summary"] = self.summary()
        return msgspec.json.encode(body)


def _short(key: str) -> str:
    return f"{key[:16]}…" if len(key) > 16 else key


def _valid_rate(rate: float) -> bool:
    return math.isfinite(rate) and 0.0 <= rate <= 1.0


@dataclass(frozen=True)
class _Draw:
    """What one proof says, as far as it can be checked."""

    selected: bool | None  # what the proof implies at its rate; None: no proof; the claim when it does not verify
    verified: bool  # it verifies for the task under a trusted key, with a rate in [0, 1]
    rate: float  # the rate to expect it at (the published one when known)


def _check_proof(
    task_id: str, proof: SamplingProof, trusted: Mapping[str, float | None], findings: list[Finding]
) -> _Draw:
    try:
        public, pi = bytes.fromhex(proof.public_key), bytes.fromhex(proof.proof)
    except ValueError:
        findings.append(Finding(task_id, "bad_proof", "the proof's key or proof is not hex"))
        return _Draw(selected=proof.selected, verified=False, rate=proof.rate)
    beta = verify(public, pi, alpha_for_task(task_id))
    key = proof.public_key.lower()
    is_trusted = key in trusted
    if not is_trusted:
        made = (
            "it verifies under that key: whoever holds that key chose this draw"
            if beta is not None
            else "and does not verify under it either"
        )
        findings.append(
            Finding(
                task_id,
                "untrusted_key",
                f"the proof is made with key {_short(key)}, which is not a trusted key ({made})",
            )
        )
    elif beta is None:
        findings.append(
            Finding(
                task_id,
                "bad_proof",
                f"the proof does not verify for task id {task_id!r} under key {_short(key)}: "
                "a proof made for another task, or altered",
            )
        )
    published = trusted.get(key)
    if not _valid_rate(proof.rate):
        findings.append(Finding(task_id, "wrong_rate", f"the proof's rate {proof.rate!r} is not a rate in [0, 1]"))
        return _Draw(selected=proof.selected, verified=False, rate=proof.rate)
    if is_trusted and published is not None and proof.rate != published:
        findings.append(
            Finding(
                task_id,
                "wrong_rate",
                f"the proof's rate is {proof.rate:g}, the rate published for key {_short(key)} is {published:g}",
            )
        )
    if beta is None:
        return _Draw(selected=proof.selected, verified=False, rate=proof.rate)
    implied = sampled(beta, proof.rate)
    if proof.selected != implied:
        u = int.from_bytes(beta[:8], "big") / 2.0**64
        findings.append(
            Finding(
                task_id,
                "wrong_selected",
                f"selected={str(proof.selected).lower()}, but the proof's output (u = {u:.4f}) at rate "
                f"{proof.rate:g} implies selected={str(implied).lower()}",
            )
        )
    expect_at = published if is_trusted and published is not None else proof.rate
    return _Draw(selected=implied, verified=is_trusted, rate=expect_at)


def _check_nodes(
    task_id: str, assigned: TaskAssigned, draw: _Draw | None, validation: str | None, replication: int
) -> Finding | None:
    count, distinct = len(assigned.nodes), len(set(assigned.nodes))
    if distinct != count:
        return Finding(task_id, "wrong_nodes", f"assigned to {count} nodes, {distinct} of them distinct")
    selected = draw.selected if draw is not None else None
    if validation == "full":
        expected, why = {replication}, "validation full"
    elif selected is None:
        return None  # no proof: nothing says what the draw was (the no_proof finding stands)
    elif selected:
        expected, why = {replication}, "selected by the proof"
    elif validation == "sampled":
        expected, why = {1}, "validation sampled, not selected by the proof"
    else:  # no submission: sampled or full, unknown
        expected, why = {1, replication}, "not selected by the proof; validation unknown"
    if count in expected:
        return None
    want = " or ".join(str(n) for n in sorted(expected))
    return Finding(task_id, "wrong_nodes", f"assigned to {count} nodes; the draw implies {want} ({why})")


def _describe_difference(ours: SamplingProof | None, theirs: SamplingProof | None) -> str:
    if theirs is None:
        return "the outcome carries no proof"
    if ours is None:
        return "the outcome carries a proof, the assignment none"
    fields = [name for name in SamplingProof.__struct_fields__ if getattr(ours, name) != getattr(theirs, name)]
    return f"they differ in {', '.join(fields)}"


def audit(
    tasks: Iterable[TaskEvents], trusted: Mapping[str, float | None], *, replication: int = DEFAULT_REPLICATION
) -> Report:
    """Audit the sampling of `tasks` against the `trusted` public keys (64 hex digits each ->
    the rate published for it, None when unknown: no rate check for that key)."""
    if replication < 1:
        raise ValueError(f"replication is at least 1, not {replication}")
    keys = {key.lower(): rate for key, rate in trusted.items()}
    report = Report(keys=keys, replication=replication)
    variance = 0.0
    for task in tasks:
        if not task.assigned:
            if task.outcome is not None:
                report.unassigned += 1
            else:
                report.waiting += 1
            continue
        report.checked += 1
        findings: list[Finding] = []
        validation = task.submitted.validation if task.submitted is not None else None
        if validation == "full":
            report.full += 1
        if task.submitted is None:
            findings.append(
                Finding(
                    task.task_id,
                    "no_submission",
                    "assigned, but the TASKS stream holds no submission of it (a task nobody submitted, "
                    "or one the stream no longer keeps)",
                )
            )
        first: _Draw | None = None
        for n, assigned in enumerate(task.assigned):
            draw: _Draw | None = None
            if assigned.sampling is None:
                findings.append(
                    Finding(task.task_id, "no_proof", f"its assignment to {len(assigned.nodes)} nodes carries no proof")
                )
            else:
                draw = _check_proof(task.task_id, assigned.sampling, keys, findings)
            if found := _check_nodes(task.task_id, assigned, draw, validation, replication):
                findings.append(found)
            if n == 0:
                first = draw
        outcome = task.outcome
        if isinstance(outcome, TaskSucceeded | TaskAborted) and outcome.sampling != task.assigned[0].sampling:
            name = "succeeded" if isinstance(outcome, TaskSucceeded) else "aborted"
            difference = _describe_difference(task.assigned[0].sampling, outcome.sampling)
            findings.append(
                Finding(
                    task.task_id, "outcome_differs", f"the {name} outcome's proof is not the assignment's: {difference}"
                )
            )
        report.findings.extend(dict.fromkeys(findings))  # the same finding twice (two assignments) is one problem
        if first is not None and first.verified:
            if first.selected:
                report.selected += 1
            else:
                report.unselected += 1
            report.expected_selected += first.rate
            variance += first.rate * (1.0 - first.rate)
        else:
            report.unverified += 1
    report.sd_selected = math.sqrt(variance)
    off = report.selected - report.expected_selected
    if report.sd_selected > 0:
        report.sigmas = off / report.sd_selected
        report.rate_flag = abs(report.sigmas) > FLAG_SIGMAS
    else:  # every rate 0 or 1: the count is certain
        report.rate_flag = abs(off) > 1e-9
    return report


# --------------------------------------------------------------------------- reading NATS


async def trusted_keys(
    js: JetStreamContext, public_keys: Sequence[str] = (), rate: float | None = None
) -> dict[str, float | None]:
    """The keys to trust, with the rate to hold each proof to: `public_keys` when given (the
    bucket then only lends their rates), else every key of the `sampling` bucket. `rate`,
    when given, is the rate for every key."""
    published: dict[str, float] = {}
    try:
        kv = await js.key_value(subjects.SAMPLING_BUCKET)
    except BucketNotFoundError:
        kv = None
    if kv is not None:
        for key in await records.keys(kv):
            try:
                record = await records.get(kv, key, records.sampling_key_decoder)
            except msgspec.DecodeError as exc:
                print(
                    f"stipple audit: the {subjects.SAMPLING_BUCKET!r} bucket's {key!r} does not decode: {exc}",
                    file=sys.stderr,
                )
                continue
            except KeyNotFoundError:
                continue
            if record is not None:
                published[key.lower()] = record.rate
    if public_keys:
        return {key.lower(): rate if rate is not None else published.get(key.lower()) for key in public_keys}
    if not published:
        raise AuditError(
            f"no published key: the {subjects.SAMPLING_BUCKET!r} KV bucket is missing or empty (has a dispatcher "
            "run against this NATS?); give the key with --public-key"
        )
    return {key: rate if rate is not None else value for key, value in published.items()}


async def _read(
    js: JetStreamContext, filters: list[str], *, start: float | None = None, stop_after: float | None = None
) -> list[Msg]:
    """The TASKS messages on `filters`, in stream order, from `start` (epoch seconds; None:
    the first) until the first one stored after `stop_after`: one ephemeral consumer, read
    in batches and deleted (as bus.read_messages, with a start time and several filters)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL if start is None else DeliverPolicy.BY_START_TIME,
        opt_start_time=None if start is None else datetime.fromtimestamp(max(start, 0.0), UTC),
        ack_policy=AckPolicy.NONE,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        inactive_threshold=30.0,  # only if the delete below never happens
        mem_storage=True,
    )
    try:
        info = await js.add_consumer(subjects.TASKS_STREAM, config)
    except NotFoundError:  # no TASKS stream: no service ever declared it
        return []
    out: list[Msg] = []
    try:
        remaining = info.num_pending or 0
        if not remaining:
            return out
        sub = await js.pull_subscribe_bind(durable=info.name, stream=subjects.TASKS_STREAM)
        try:
            while remaining > 0:
                try:
                    msgs = await sub.fetch(min(remaining, 512), timeout=5.0)
                except TimeoutError:  # fewer than counted: some expired meanwhile
                    break
                remaining -= len(msgs)
                for msg in msgs:
                    if stop_after is not None and msg.metadata.timestamp.timestamp() > stop_after:
                        return out
                    out.append(msg)
        finally:
            await sub.unsubscribe()
        return out
    finally:
        try:
            await js.delete_consumer(subjects.TASKS_STREAM, info.name)
        except Exception as exc:  # it expires by itself (inactive_threshold)
            print(f"stipple audit: could not delete the reading consumer: {exc}", file=sys.stderr)


@dataclass
class _Gathered:
    submitted: TaskSubmitted | None = None
    submitted_at: float | None = None
    assigned: list[TaskAssigned] = field(default_factory=list)
    assigned_at: list[float] = field(default_factory=list)
    outcome: Outcome | None = None


def _gather(msgs: Iterable[Msg]) -> dict[str, _Gathered]:
    """Group the events by task, as the services read them: an event whose subject and
    payload disagree is left out (decode_task_event), the first submission and outcome win."""
    tasks: dict[str, _Gathered] = {}
    for msg in msgs:
        try:
            event = decode_task_event(msg.subject, msg.data)
        except Rejected:
            continue
        at = msg.metadata.timestamp.timestamp()
        task = tasks.setdefault(event.task_id, _Gathered())
        if isinstance(event, TaskSubmitted) and task.submitted is None:
            task.submitted, task.submitted_at = event, at
        elif isinstance(event, TaskAssigned):
            task.assigned.append(event)
            task.assigned_at.append(at)
        elif isinstance(event, Outcome) and task.outcome is None:
            task.outcome = event
    return tasks


async def _first_submission(js: JetStreamContext, task_id: str) -> TaskSubmitted | None:
    try:
        raw = await js.get_msg(
            subjects.TASKS_STREAM, seq=1, subject=subjects.task_subject(task_id, "submitted"), next=True
        )
    except NotFoundError:
        return None
    try:
        event = decode_task_event(raw.subject or "", raw.data or b"")
    except Rejected:
        return None
    return event if isinstance(event, TaskSubmitted) else None


async def read_tasks(
    js: JetStreamContext,
    *,
    since: float | None = None,
    until: float | None = None,
    task_ids: Sequence[str] = (),
    margin_s: float = DEFAULT_MARGIN_S,
) -> list[TaskEvents]:
    """The events of the tasks submitted or assigned within [since, until] (restricted to
    `task_ids` when given), or of `task_ids` alone when no range is given.

    A range is read with one consumer from `since - margin_s` (a task assigned in the range
    may have been submitted a little before it) up to `until + margin_s` (its outcome comes
    after); a submission still outside that is fetched for its task alone."""
    wanted = set(task_ids)
    if since is None and until is None:
        if not wanted:
            raise AuditError("give a time range or task ids")
        msgs = await _read(js, [f"tasks.{task_id}.*" for task_id in sorted(wanted)])
        gathered = _gather(msgs)
        chosen = [task_id for task_id in task_ids if task_id in gathered]
    else:
        low = since if since is not None else -math.inf
        high = until if until is not None else math.inf
        start = None if since is None else since - margin_s
        stop = None if until is None else until + margin_s
        gathered = _gather(await _read(js, [subjects.all_tasks(name) for name in EVENTS], start=start, stop_after=stop))

        def in_range(task: _Gathered) -> bool:
            times = [*task.assigned_at, *([task.submitted_at] if task.submitted_at is not None else [])]
            return any(low <= at <= high for at in times)

        chosen = [t for t, task in gathered.items() if in_range(task) and (not wanted or t in wanted)]
        for task_id in chosen:
            task = gathered[task_id]
            if task.submitted is None and task.assigned:
                task.submitted = await _first_submission(js, task_id)
    return [
        TaskEvents(task_id=t, submitted=g.submitted, assigned=tuple(g.assigned), outcome=g.outcome)
        for t in chosen
        for g in (gathered[t],)
    ]


async def audit_nats(
    js: JetStreamContext,
    *,
    public_keys: Sequence[str] = (),
    rate: float | None = None,
    since: float | None = None,
    until: float | None = None,
    task_ids: Sequence[str] = (),
    replication: int = DEFAULT_REPLICATION,
    margin_s: float = DEFAULT_MARGIN_S,
) -> Report:
    """Read the trusted keys and the tasks' events from NATS, and audit them (see `audit`)."""
    trusted = await trusted_keys(js, public_keys, rate)
    tasks = await read_tasks(js, since=since, until=until, task_ids=task_ids, margin_s=margin_s)
    report = audit(tasks, trusted, replication=replication)
    report.since, report.until = since, until
    found = {task.task_id for task in tasks}
    report.not_found = [task_id for task_id in dict.fromkeys(task_ids) if task_id not in found]
    return report


# --------------------------------------------------------------------------- the command


def _when(text: str) -> float:
    """Epoch seconds from `text`: a number of seconds, or an ISO 8601 time (UTC when it names no zone)."""
    try:
        value = float(text)
    except ValueError:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an ISO 8601 time (2025-01-31T12:00:00Z) nor epoch seconds"
            ) from None
        return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time")
    return value


def _public_key(text: str) -> str:
    key = text.strip().lower().removeprefix("0x")
    if not _HEX_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(f"{text!r} is not a VRF public key ({2 * PUBLIC_KEY_BYTES} hex digits)")
    return key


def _task_id(text: str) -> str:
    if not _TASK_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id (one subject token: no spaces, '.', '*' or '>')")
    return text


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not _valid_rate(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sampling rate in [0, 1]")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stipple audit",
        description="Check the sampled validation's proofs: every task assigned in a time range (default: the "
        "last hour) or named with --tasks, against the dispatcher's published VRF key or the keys given with "
        "--public-key. Exit 0 when nothing is found, 1 when something is, 2 when the audit cannot run.",
    )
    p.add_argument(
        "--nats-url",
        default=None,
        help="NATS server, with credentials as user:password@ (env STIPPLE_NATS_URL; default: the network "
        f"`stipple up` runs, else {DEFAULT_NATS_URL})",
    )
    p.add_argument(
        "--nats-ca-file",
        default=os.environ.get("STIPPLE_NATS_CA_FILE", ""),
        help="PEM CA bundle of the NATS servers' certificates, for tls:// (env STIPPLE_NATS_CA_FILE)",
    )
    p.add_argument(
        "--public-key",
        action="append",
        type=_public_key,
        default=[],
        metavar="HEX",
        help="a trusted VRF public key (64 hex digits; repeatable): then the only keys trusted. Take it out of band. "
        "Default: every key in the `sampling` bucket",
    )
    p.add_argument(
        "--rate",
        type=_rate,
        default=None,
        help="the sampling rate the network promises (default: the rate the `sampling` bucket records for the key)",
    )
    p.add_argument("--since", type=_when, default=None, help="ISO 8601 time (UTC unless it says) or epoch seconds")
    p.add_argument("--until", type=_when, default=None, help="ISO 8601 time or epoch seconds (default: now)")
    p.add_argument("--tasks", nargs="+", type=_task_id, default=[], metavar="ID", help="audit these tasks")
    p.add_argument(
        "--replication",
        type=_positive_int,
        default=DEFAULT_REPLICATION,
        help=f"nodes per compared task (STIPPLE_REPLICATION; default {DEFAULT_REPLICATION})",
    )
    p.add_argument(
        "--margin-s",
        type=_seconds,
        default=DEFAULT_MARGIN_S,
        help=f"read this much before and after the range, for submissions and outcomes (default {DEFAULT_MARGIN_S:g})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _range(args: argparse.Namespace, now: float) -> tuple[float | None, float | None]:
    since, until = args.since, args.until
    if since is None and until is None:
        return (None, None) if args.tasks else (now - DEFAULT_WINDOW_S, now)
    if until is None:
        until = now
    if since is None:
        since = until - DEFAULT_WINDOW_S
    if since > until:
        raise AuditError(f"--since ({_utc(since)}) is after --until ({_utc(until)})")
    return since, until


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def run(args: argparse.Namespace, out: Any = None) -> int:
    """`stipple audit` with parsed `args`; prints to `out` (stdout); returns the exit status."""
    out = out or sys.stdout
    try:
        since, until = _range(args, time.time())
    except AuditError as exc:
        print(f"stipple audit: {exc}", file=sys.stderr)
        return 2
    if not args.nats_url:  # the environment's, else the running `stipple up`'s (state.py)
        args.nats_url = state.nats_url(None, "stipple audit")
    nc = await connect("stipple audit", args.nats_url, args.nats_ca_file)
    if nc is None:
        return 2
    try:
        report = await audit_nats(
            nc.jetstream(),
            public_keys=args.public_key,
            rate=args.rate,
            since=since,
            until=until,
            task_ids=args.tasks,
            replication=args.replication,
            margin_s=args.margin_s,
        )
    except AuditError as exc:
        print(f"stipple audit: {exc}", file=sys.stderr)
        return 2
    except (OSError, nats.errors.Error) as exc:  # the connection failed mid-way, or a permission is missing
        print(f"stipple audit: reading NATS at {redact(args.nats_url)!r} failed: {redact(str(exc))}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    if args.json:
        print(report.to_json().decode(), file=out)
    else:
        where = f"{_utc(since)} to {_utc(until)}" if since is not None and until is not None else "the named tasks"
        keys = ", ".join(f"{key} (rate {'unknown' if r is None else f'{r:g}'})" for key, r in report.keys.items())
        print(f"auditing tasks of {where} against {keys}", file=out)
        for finding in report.findings:
            print(finding.line(), file=out)
        print(report.summary(), file=out)
    return 0 if report.clean else 1


def main(argv: Sequence[str]) -> int:
    """`stipple audit ...` with the words after `audit`; returns the exit status."""
    args = parser().parse_args(list(argv))
    return asyncio.run(run(args))


__all__ = ["Finding", "Report", "TaskEvents", "audit", "audit_nats", "read_tasks", "trusted_keys"]
