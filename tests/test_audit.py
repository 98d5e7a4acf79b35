"""`stipple audit`: the auditor's check of the secret sampled validation.

The pure part with real RFC 9381 proofs: an honest set of tasks yields no finding, and each
forgery (no proof, a proof copied from another task, another key, `selected` flipped, another
rate, too many or too few nodes, an outcome with another proof, an assignment nobody
submitted) yields its finding, naming the task. Then the whole command against a real
nats-server and the real dispatcher sampling at rate 0.5: its assignments pass, and forged
ones published as a control-plane user would are reported (exit 1)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
import uuid
from collections.abc import Iterator

import pytest
from nats.js.api import KeyValueConfig

from stipple_cli import audit as au
from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    IndexedStake,
    NodeHeartbeat,
    TaskAborted,
    TaskAssigned,
    TaskCancelled,
    TaskSubmitted,
    TaskSucceeded,
    encode,
)
from stipple_common.taskspec import parse_task
from stipple_common.vrf import SamplingProof, VrfKey
from stipple_testkit.waits import until

SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})
RATE = 0.5
KEY = VrfKey.generate()
PUBLIC = KEY.public.hex()
TRUSTED = {PUBLIC: RATE}
NODES = ["n0", "n1", "n2"]


def task_ids() -> Iterator[str]:
    while True:
        yield uuid.uuid4().hex


def draw_id(selected: bool, key: VrfKey = KEY, rate: float = RATE) -> str:
    """A task id that `key` selects (or not) at `rate`."""
    return next(t for t in task_ids() if SamplingProof.make(key, t, rate).selected == selected)


def submitted(task_id: str, validation: str = "sampled") -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), validation=validation)  # type: ignore[arg-type]


def honest(task_id: str, validation: str = "sampled", *, outcome: str = "succeeded") -> au.TaskEvents:
    """A task as an honest dispatcher and validator leave it in the stream."""
    proof = SamplingProof.make(KEY, task_id, RATE)
    copies = 3 if proof.selected or validation == "full" else 1
    return forged(task_id, proof, NODES[:copies], validation, outcome=outcome)


def forged(
    task_id: str,
    proof: SamplingProof | None,
    nodes: list[str],
    validation: str | None = "sampled",
    *,
    outcome: str = "succeeded",
    outcome_proof: SamplingProof | str | None = "same",
) -> au.TaskEvents:
    sampling = proof if outcome_proof == "same" else outcome_proof
    assert not isinstance(sampling, str)
    ended: au.Outcome | None = None
    if outcome == "succeeded":
        ended = TaskSucceeded(task_id=task_id, reason="unanimous", images=[], verdicts={}, sampling=sampling)
    elif outcome == "aborted":
        ended = TaskAborted(task_id=task_id, reason="too_few_results", sampling=sampling)
    elif outcome == "cancelled":
        ended = TaskCancelled(task_id=task_id)
    return au.TaskEvents(
        task_id=task_id,
        submitted=submitted(task_id, validation) if validation else None,
        assigned=(TaskAssigned(task_id=task_id, nodes=nodes, deadline=0.0, sampling=proof),),
        outcome=ended,
    )


def findings(
    *tasks: au.TaskEvents, trusted: dict[str, float | None] = TRUSTED, replication: int = 3
) -> list[au.Finding]:
    return au.audit(tasks, trusted, replication=replication).findings


def kinds(found: list[au.Finding]) -> list[str]:
    return [f.kind for f in found]


# --------------------------------------------------------------------------- the pure part


def test_an_honest_set_yields_no_findings_and_counts_every_kind_of_task():
    tasks = [honest(f"t{i}", "full" if i % 5 == 0 else "sampled") for i in range(60)]
    tasks += [honest("ab", outcome="aborted"), honest("cx", outcome="cancelled"), honest("running", outcome="")]
    never = au.TaskEvents(
        task_id="never", submitted=submitted("never"), outcome=TaskAborted(task_id="never", reason="no_nodes")
    )
    queued = au.TaskEvents(task_id="queued", submitted=submitted("queued"))
    report = au.audit([*tasks, never, queued], TRUSTED)

    assert report.findings == []
    assert report.clean
    assert report.checked == 63
    assert report.full == 12
    assert report.unassigned == 1
    assert report.waiting == 1
    expected = sum(SamplingProof.make(KEY, t.task_id, RATE).selected for t in tasks)
    assert report.selected == expected
    assert report.selected + report.unselected == report.checked
    assert report.unverified == 0
    assert report.expected_selected == pytest.approx(63 * RATE)
    assert report.sd_selected == pytest.approx(math.sqrt(63 * RATE * (1 - RATE)))
    assert not report.rate_flag
    assert "no findings: 63 tasks checked" in report.summary()
    assert "within 4" in report.summary()


def test_every_task_with_its_own_honest_draw_passes_at_rates_zero_and_one():
    for rate, copies in ((0.0, 1), (1.0, 3)):
        tasks = []
        for i in range(10):
            proof = SamplingProof.make(KEY, f"r{i}", rate)
            tasks.append(forged(f"r{i}", proof, NODES[:copies]))
        report = au.audit(tasks, {PUBLIC: rate})
        assert report.findings == []
        assert not report.rate_flag
        assert report.selected == (10 if rate == 1.0 else 0)


def test_a_missing_proof_is_reported():
    task_id = draw_id(False)
    found = findings(forged(task_id, None, ["n0"]))
    assert kinds(found) == ["no_proof"]
    assert found[0].task_id == task_id
    assert task_id in found[0].line()


def test_a_proof_copied_from_another_task_does_not_verify():
    task_id, other = draw_id(False), draw_id(False)
    copied = SamplingProof.make(KEY, other, RATE)
    found = findings(forged(task_id, copied, ["n0"]))
    assert kinds(found) == ["bad_proof"]
    assert repr(task_id) in found[0].detail
    assert "another task" in found[0].detail


def test_an_altered_or_undecodable_proof_does_not_verify():
    task_id = draw_id(False)
    proof = SamplingProof.make(KEY, task_id, RATE)
    flipped_bit = proof.proof[:10] + ("0" if proof.proof[10] != "0" else "1") + proof.proof[11:]
    altered = SamplingProof(public_key=PUBLIC, proof=flipped_bit, rate=RATE, selected=False)
    assert kinds(findings(forged(task_id, altered, ["n0"]))) == ["bad_proof"]
    garbage = SamplingProof(public_key=PUBLIC, proof="zz", rate=RATE, selected=False)
    found = findings(forged(task_id, garbage, ["n0"]))
    assert kinds(found) == ["bad_proof"]
    assert "not hex" in found[0].detail


def test_a_proof_made_with_another_key_is_not_trusted():
    other = VrfKey.generate()
    task_id = draw_id(False, other)
    proof = SamplingProof.make(other, task_id, RATE)  # valid, under a key nobody published
    assert proof.check(task_id)
    found = findings(forged(task_id, proof, ["n0"]))
    assert kinds(found) == ["untrusted_key"]
    assert other.public.hex()[:16] in found[0].detail
    assert "it verifies under that key" in found[0].detail
    report = au.audit([forged(task_id, proof, ["n0"])], TRUSTED)
    assert report.unverified == 1
    assert report.selected + report.unselected == 0


def test_a_key_trusted_by_the_auditor_alone_is_the_only_one():
    other = VrfKey.generate()
    task_id = draw_id(False)
    # the dispatcher's own, honest proof, but the auditor was told (out of band) of `other` only
    found = findings(honest(task_id), trusted={other.public.hex(): RATE})
    assert kinds(found) == ["untrusted_key"]


def test_a_flipped_selected_flag_is_reported_with_and_without_the_nodes_it_claims():
    task_id = draw_id(False)
    proof = SamplingProof.make(KEY, task_id, RATE)
    flipped = SamplingProof(public_key=proof.public_key, proof=proof.proof, rate=proof.rate, selected=True)
    # the claim alone, one node as the real draw says
    found = findings(forged(task_id, flipped, ["n0"]))
    assert kinds(found) == ["wrong_selected"]
    assert "selected=true" in found[0].detail
    assert "implies selected=false" in found[0].detail
    # and the claim acted on: three nodes where the draw says one
    assert kinds(findings(forged(task_id, flipped, NODES))) == ["wrong_selected", "wrong_nodes"]
    # a selected task claimed unselected, run on one node: compared less than promised
    chosen = draw_id(True)
    real = SamplingProof.make(KEY, chosen, RATE)
    hidden = SamplingProof(public_key=real.public_key, proof=real.proof, rate=real.rate, selected=False)
    assert kinds(findings(forged(chosen, hidden, ["n0"]))) == ["wrong_selected", "wrong_nodes"]


def test_a_rate_other_than_the_published_one_is_reported():
    task_id = draw_id(False, rate=RATE)
    at_zero = SamplingProof.make(KEY, task_id, 0.0)  # valid at rate 0: never selected
    found = findings(forged(task_id, at_zero, ["n0"]))
    assert kinds(found) == ["wrong_rate"]
    assert "0" in found[0].detail
    assert f"is {RATE:g}" in found[0].detail
    nan = SamplingProof(public_key=PUBLIC, proof=at_zero.proof, rate=math.nan, selected=False)
    found = findings(forged(task_id, nan, ["n0"]))
    assert kinds(found) == ["wrong_rate"]
    assert "not a rate" in found[0].detail
    # a key whose rate the auditor does not know: no rate check, the proof still is
    assert findings(forged(task_id, at_zero, ["n0"]), trusted={PUBLIC: None}) == []


def test_the_number_of_nodes_must_be_what_the_draw_implies():
    unselected, selected = draw_id(False), draw_id(True)
    three_for_one = findings(forged(unselected, SamplingProof.make(KEY, unselected, RATE), NODES))
    assert kinds(three_for_one) == ["wrong_nodes"]
    assert "assigned to 3 nodes; the draw implies 1" in three_for_one[0].detail
    one_for_full = findings(forged(unselected, SamplingProof.make(KEY, unselected, RATE), ["n0"], "full"))
    assert kinds(one_for_full) == ["wrong_nodes"]
    assert "implies 3 (validation full)" in one_for_full[0].detail
    one_for_selected = findings(forged(selected, SamplingProof.make(KEY, selected, RATE), ["n0"]))
    assert kinds(one_for_selected) == ["wrong_nodes"]
    assert "selected by the proof" in one_for_selected[0].detail
    twice = findings(forged(selected, SamplingProof.make(KEY, selected, RATE), ["n0", "n0", "n1"]))
    assert kinds(twice) == ["wrong_nodes"]
    assert "2 of them distinct" in twice[0].detail
    # replication is the auditor's argument
    five = findings(honest(selected), replication=5)
    assert kinds(five) == ["wrong_nodes"]
    assert "implies 5" in five[0].detail
    with pytest.raises(ValueError, match="replication is at least 1, not 0"):
        au.audit([], TRUSTED, replication=0)


def test_an_outcome_with_another_proof_than_the_assignment_is_reported():
    task_id, other = draw_id(False), draw_id(False)
    proof = SamplingProof.make(KEY, task_id, RATE)
    none = findings(forged(task_id, proof, ["n0"], outcome_proof=None))
    assert kinds(none) == ["outcome_differs"]
    assert "carries no proof" in none[0].detail
    swapped = findings(
        forged(task_id, proof, ["n0"], outcome="aborted", outcome_proof=SamplingProof.make(KEY, other, RATE))
    )
    assert kinds(swapped) == ["outcome_differs"]
    assert "aborted outcome" in swapped[0].detail
    assert "differ in proof" in swapped[0].detail
    # a cancelled task carries no proof: nothing to compare
    assert findings(forged(task_id, proof, ["n0"], outcome="cancelled")) == []


def test_an_assignment_nobody_submitted_is_reported():
    task_id = draw_id(False)
    found = findings(forged(task_id, SamplingProof.make(KEY, task_id, RATE), ["n0"], validation=None))
    assert kinds(found) == ["no_submission"]
    # validation unknown: one node or `replication` both fit an unselected draw
    assert kinds(findings(forged(task_id, SamplingProof.make(KEY, task_id, RATE), NODES, validation=None))) == [
        "no_submission"
    ]


def test_tasks_that_dodge_the_draw_raise_the_statistical_flag_only():
    """Every proof valid, but only unselected tasks in the stream (task ids ground until the
    draw said no, or the selected ones left out): no finding, the rate is flagged."""
    tasks = [honest(draw_id(False)) for _ in range(100)]
    report = au.audit(tasks, TRUSTED)
    assert report.findings == []
    assert report.clean
    assert report.selected == 0
    assert report.unselected == 100
    assert report.rate_flag
    assert report.sigmas == pytest.approx(-10.0)
    assert "FLAG" in report.rate_line()
    assert "not proof" in report.rate_line()


def test_the_report_as_json_names_each_finding():
    task_id = draw_id(False)
    report = au.audit([forged(task_id, None, ["n0"]), honest("fine")], TRUSTED)
    body = json.loads(report.to_json())
    assert body["clean"] is False
    assert body["checked"] == 2
    assert body["findings"] == [{"task_id": task_id, "kind": "no_proof", "detail": report.findings[0].detail}]
    assert body["keys"] == {PUBLIC: RATE}


# --------------------------------------------------------------------------- the command's input


def test_times_are_iso_or_epoch_seconds():
    assert au._when("1700000000") == 1_700_000_000.0
    assert au._when("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert au._when("2023-11-14T22:13:20") == 1_700_000_000.0  # no zone: UTC
    assert au._when("2023-11-14T23:13:20+01:00") == 1_700_000_000.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "yesterday"], "argument --since: 'yesterday' is neither an ISO 8601 time"),
        (["--public-key", "abc"], "argument --public-key: 'abc' is not a VRF public key"),
        (["--tasks", "a.b"], "argument --tasks: 'a.b' is not a task id"),
        (["--rate", "1.5"], "argument --rate: '1.5' is not a sampling rate in [0, 1]"),
        (["--replication", "0"], "argument --replication: '0' is not a positive integer"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        au.parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


async def test_a_range_that_ends_before_it_starts_exits_2(capsys):
    args = au.parser().parse_args(["--since", "2000", "--until", "1000", "--nats-url", "nats://127.0.0.1:1"])
    assert await au.run(args) == 2
    assert "--since (1970-01-01 00:33:20 UTC) is after --until" in capsys.readouterr().err


async def test_a_nats_server_that_does_not_answer_exits_2(capsys):
    args = au.parser().parse_args(["--nats-url", "nats://127.0.0.1:1"])
    assert await au.run(args) == 2
    assert "does not answer" in capsys.readouterr().err


def test_the_default_range_is_the_last_hour_and_tasks_alone_have_none():
    parse = au.parser().parse_args
    assert au._range(parse([]), 10_000.0) == (6_400.0, 10_000.0)
    assert au._range(parse(["--tasks", "x"]), 10_000.0) == (None, None)
    assert au._range(parse(["--since", "9000"]), 10_000.0) == (9_000.0, 10_000.0)
    assert au._range(parse(["--until", "5000"]), 10_000.0) == (1_400.0, 5_000.0)


# --------------------------------------------------------------------------- against the dispatcher


SEED = "5a" * 32  # the dispatcher's STIPPLE_SAMPLING_KEY


async def announce(js, name: str) -> None:
    """Node `name`, staked by an operator of its own, joins and beats once."""
    from stipple_testkit.nodes import joined

    node_id = dev_node_id(name)
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.STAKES_BUCKET, history=1))
    await kv.put(node_id, encode(IndexedStake(stake=1000, owner=dev_node_id(f"op-{name}"))))
    await bus.publish(js, subjects.node_subject(node_id, "joined"), joined(node_id), msg_id=f"{node_id}:j")
    beat = NodeHeartbeat(node_id=node_id, at=time.time())
    await bus.publish(js, subjects.node_subject(node_id, "heartbeat"), beat, msg_id=f"{node_id}:hb")


async def assigned_count(js) -> int:
    return len(await bus.read_messages(js, subjects.TASKS_STREAM, subjects.all_tasks("assigned")))


async def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = await au.run(au.parser().parse_args(list(argv)), out=out)
    return status, out.getvalue()


@pytest.mark.integration
async def test_the_dispatchers_draws_pass_and_forged_assignments_are_reported(fresh_nats_url):
    from stipple_common.service import open_service
    from stipple_dispatcher.service import DispatcherSettings, serve

    settings = DispatcherSettings(
        nats_url=fresh_nats_url, validation_rate=0.5, sampling_key=SEED, node_slots=64, task_timeout_s=60
    )
    key = VrfKey(bytes.fromhex(SEED))
    stop = asyncio.Event()
    async with open_service("dispatcher", settings, stop=stop) as ctx:
        js = ctx.js
        for name in ("a", "b", "c"):
            await announce(js, name)
        runner = asyncio.create_task(serve(ctx, settings))
        try:
            ids = [uuid.uuid4().hex for _ in range(20)]
            for n, task_id in enumerate(ids):
                await bus.publish_event(js, submitted(task_id, "full" if n == 0 else "sampled"))
            await until("20 tasks assigned", lambda: _at_least(js, 20), timeout=30.0)

            status, text = await cli("--nats-url", fresh_nats_url, "--json")
            report = json.loads(text)
            assert status == 0, text
            assert report["findings"] == []
            assert report["keys"] == {key.public.hex(): 0.5}
            assert report["checked"] == 20
            assert report["full"] == 1
            assert report["selected"] + report["unselected"] == report["checked"]
            drawn = sum(SamplingProof.make(key, t, 0.5).selected for t in ids)
            assert report["selected"] == drawn

            # the auditor's own copy of the key, and a range, in text
            status, text = await cli(
                "--nats-url", fresh_nats_url, "--public-key", key.public.hex(), "--since", str(time.time() - 120)
            )
            assert status == 0, text
            assert "no findings: 20 tasks checked" in text

            # a control-plane user assigns two new tasks before the dispatcher does (its own
            # `assigned`, with the same message id, is then dropped as a duplicate)
            flipped_id, foreign_id = draw_id(False, key, 0.5), uuid.uuid4().hex
            real = SamplingProof.make(key, flipped_id, 0.5)
            flipped = SamplingProof(public_key=real.public_key, proof=real.proof, rate=0.5, selected=True)
            foreign = SamplingProof.make(VrfKey.generate(), foreign_id, 0.0)
            nodes = [dev_node_id(name) for name in ("a", "b", "c")]
            await bus.publish_event(js, TaskAssigned(task_id=flipped_id, nodes=nodes, deadline=0.0, sampling=flipped))
            await bus.publish_event(
                js, TaskAssigned(task_id=foreign_id, nodes=nodes[:1], deadline=0.0, sampling=foreign)
            )
            for task_id in (flipped_id, foreign_id):
                await bus.publish_event(js, submitted(task_id))

            status, text = await cli("--nats-url", fresh_nats_url)
            assert status == 1, text
            found = [line.split(":")[0].split()[1:] for line in text.splitlines() if line.startswith("task ")]
            assert sorted(found) == sorted(
                [[flipped_id, "wrong_selected"], [flipped_id, "wrong_nodes"], [foreign_id, "untrusted_key"]]
            )
            assert "3 findings: 22 tasks checked" in text

            absent = uuid.uuid4().hex
            status, text = await cli("--nats-url", fresh_nats_url, "--tasks", foreign_id, ids[0], absent, "--json")
            report = json.loads(text)
            assert report["not_found"] == [absent]
            assert status == 1
            assert report["checked"] == 2
            assert [(f["task_id"], f["kind"]) for f in report["findings"]] == [(foreign_id, "untrusted_key")]
        finally:
            stop.set()
            await asyncio.wait_for(runner, 10)


async def _at_least(js, n: int) -> bool:
    return await assigned_count(js) >= n
