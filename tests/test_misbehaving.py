"""Cheating and broken nodes are caught, and honest nodes are never penalized.

The real dispatcher, validator and three real node agents (in one process, on their
own nats-server and the tiny model); one node is a NodeAgent subclass with exactly one
behaviour changed. Each case checks the outcome, the reason code, every node's verdict
and QoS score.

Thresholds: on one machine honest nodes agree bit for bit (pHash distance 0), so the
validator runs here with threshold 2. The cheats are sized so the tiny model shows them
(half the steps moves the pHash by 8 bits at 8 steps); on real weights and mixed
hardware the threshold must be calibrated (bench/phash_calibration.py), and a cheat
that skips only a step or two is below what a pHash can see.
"""

from __future__ import annotations

import asyncio
import io
import secrets

import imagehash
import msgspec
import numpy as np
import pytest
import torch
from nats.aio.msg import Msg
from PIL import Image

from stipple_common import bus, checkpoints, subjects
from stipple_common.commitment import make_commitment, new_nonce
from stipple_common.identity import dev_node_id
from stipple_common.messages import (
    Assignment,
    ImageResult,
    ResultRevealed,
    TaskAborted,
    TaskCommitted,
    TaskSucceeded,
    task_event_decoder,
)
from stipple_node.pipeline import GeneratedImage, PipelineRunner, determinism_class
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HONEST = ("honest-1", "honest-2")
SUSPECT = "suspect"
COMMIT_TIMEOUT_S = 10.0  # only the silent node waits this out


# ------------------------------------------------------------------ misbehaviours


class RandomImage(NodeAgent):
    """Skips the work and returns noise, with made-up checkpoints of the honest nodes' class
    (a reveal without them would be turned away as malformed before any comparison)."""

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        rng = np.random.default_rng()
        config = work.spec.task_config
        images = []
        for index in range(config.num_images):
            pixels = rng.integers(0, 256, (config.image_height, config.image_width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            png = io.BytesIO()
            image.save(png, format="PNG")
            images.append(
                GeneratedImage(
                    png=png.getvalue(),
                    phash=str(imagehash.phash(image, hash_size=8)),
                    seed=config.seed + index,
                    width=image.width,
                    height=image.height,
                    checkpoints=[secrets.token_hex(16) for _ in checkpoints.FRACTIONS],
                    determinism=determinism_class("cpu", torch.float32),
                )
            )
        return images


def _changed(work: Assignment, **config: int) -> Assignment:
    task_config = msgspec.structs.replace(work.spec.task_config, **config)
    return msgspec.structs.replace(work, spec=msgspec.structs.replace(work.spec, task_config=task_config))


class FewerSteps(NodeAgent):
    """Saves half the GPU time."""

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        return await super()._generate(_changed(work, steps=work.spec.task_config.steps // 2))


class OtherSeed(NodeAgent):
    """Ignores the task's seed."""

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        return await super()._generate(_changed(work, seed=work.spec.task_config.seed + 1))


class NeverAnswers(NodeAgent):
    """Takes the work and goes silent."""

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        return None


class CrashesLoudly(NodeAgent):
    """Fails every task with an exception whose message (about 50,000 characters) is far past
    what `errored` may carry: an honest failure, so it must reach the network cut to the
    bound, not be refused as undecodable (which would leave the node a `timeout`)."""

    async def _generate(self, work: Assignment) -> list[GeneratedImage]:
        raise RuntimeError("shapes " + "(1, 4, 64, 64) " * 3400)


class AnswersTwice(NodeAgent):
    """Does the work honestly, then commits and reveals a second, different result."""

    async def handle_control(self, msg: Msg) -> bus.Redeliver | None:
        await super().handle_control(msg)
        task_id = msgspec.json.decode(msg.data)["task_id"]
        other = [ImageResult(index=0, key="elsewhere", phash="f" * 16, seed=0, width=64, height=64)]
        nonce = new_nonce()
        value = make_commitment(task_id, self.node_id, other, nonce)
        second = TaskCommitted(task_id=task_id, node_id=self.node_id, commitment=value, signature="0x")
        await bus.publish(
            self.js, subjects.task_subject(task_id, "committed", self.node_id), second, msg_id=f"{task_id}:2c"
        )
        again = ResultRevealed(task_id=task_id, node_id=self.node_id, images=other, nonce=nonce)
        await bus.publish(
            self.js, subjects.task_subject(task_id, "revealed", self.node_id), again, msg_id=f"{task_id}:2r"
        )
        return None


class Replays(NodeAgent):
    """Commits to nothing it computed, waits for an honest node's reveal and reveals a
    copy of it: the copy cannot open its own commitment."""

    async def handle(self, msg: Msg) -> bus.Redeliver | None:
        task_id = msgspec.json.decode(msg.data)["task_id"]
        placeholder = [GeneratedImage(png=b"", phash="0" * 16, seed=0, width=64, height=64)]
        pending = self.prepare(task_id, placeholder, 0.01)
        await self._publish_event(pending.event)  # and uploads nothing
        return None

    async def handle_control(self, msg: Msg) -> bus.Redeliver | None:
        task_id = msgspec.json.decode(msg.data)["task_id"]
        pending = self.committed.pop(task_id, None)
        if pending is None:
            return None
        for _ in range(200):
            events = await bus.read_subject(
                self.js, subjects.TASKS_STREAM, subjects.task_events(task_id), task_event_decoder
            )
            honest = [e for e in events if isinstance(e, ResultRevealed) and e.node_id != self.node_id]
            if honest:
                copy = ResultRevealed(
                    task_id=task_id, node_id=self.node_id, images=honest[0].images, nonce=pending.nonce
                )
                await self._publish_event(copy)
                return None
            await asyncio.sleep(0.05)
        return None


# ------------------------------------------------------------------ the network


async def run_network(nats_url: str, runner: PipelineRunner, suspect: type[NodeAgent]) -> TaskSucceeded | TaskAborted:
    """Start the services, submit one task, return its outcome."""
    async with Network.plain(nats_url) as net:
        agents = [(HONEST[0], NodeAgent), (SUSPECT, suspect), (HONEST[1], NodeAgent)]
        await net.control_plane_and_nodes(
            runner,
            agents,
            dispatcher={"task_timeout_s": COMMIT_TIMEOUT_S},
            validator={"phash_threshold": 2, "reveal_timeout_s": 3.0, "deadline_grace_s": 0.1},
        )
        await asyncio.sleep(1.0)  # nodes announce themselves
        return await net.run_task(seed=5, steps=8, prompt="a red fox in the snow")


# ------------------------------------------------------------------ the cases


@pytest.mark.parametrize(
    ("suspect", "verdict"),
    [
        pytest.param(NodeAgent, "agree", id="control: three honest nodes"),
        pytest.param(RandomImage, "mismatch", id="returns a random image"),
        pytest.param(FewerSteps, "mismatch", id="uses fewer steps"),
        pytest.param(OtherSeed, "bad_result", id="uses another seed (and says so: the seed is checked)"),
        pytest.param(Replays, "bad_commitment", id="replays another node's result"),
        pytest.param(NeverAnswers, "timeout", id="never answers"),
        pytest.param(CrashesLoudly, "error", id="fails with a 50 KB message: cut, an honest error"),
        pytest.param(AnswersTwice, "agree", id="answers twice: the second answer is ignored"),
    ],
)
async def test_a_misbehaving_node_is_caught_and_honest_nodes_are_not_penalized(
    fresh_nats_url: str, runner: PipelineRunner, suspect: type[NodeAgent], verdict: str
) -> None:
    outcome = await run_network(fresh_nats_url, runner, suspect)
    honest = [dev_node_id(name) for name in HONEST]
    suspect_id = dev_node_id(SUSPECT)
    assert isinstance(outcome, TaskSucceeded), outcome
    assert outcome.reason == ("unanimous" if verdict == "agree" else "majority")
    assert outcome.verdicts == {honest[0]: "agree", suspect_id: verdict, honest[1]: "agree"}
    assert {outcome.qos[node] for node in honest} <= {10, 5, 2}
    assert all(outcome.qos[node] > 0 for node in honest)
    if verdict != "agree":
        assert outcome.qos[suspect_id] == 0
    paid = [*honest, *((suspect_id,) if verdict == "agree" else ())]
    assert all(image.key.split("/")[2] in paid for image in outcome.images)


async def test_two_cheats_against_one_honest_node_draw_more_nodes_and_only_the_outvoted_pay(
    fresh_nats_url: str, runner: PipelineRunner
) -> None:
    """One honest node and two that return noise (each its own): three ways apart, no one
    can be slashed on one against one. The validator escalates; the real dispatcher draws
    two nodes that joined since, which side with the honest one; the five-node decision
    slashes the two cheats, each with the agreeing nodes named."""
    async with Network.plain(fresh_nats_url) as net:
        agents = [(HONEST[0], NodeAgent), ("cheat-1", RandomImage), ("cheat-2", RandomImage)]
        await net.control_plane_and_nodes(
            runner,
            agents,
            dispatcher={"task_timeout_s": COMMIT_TIMEOUT_S},
            validator={
                "phash_threshold": 2,
                "reveal_timeout_s": 3.0,
                "deadline_grace_s": 0.1,
                "escalation_timeout_s": 30.0,
            },
        )
        await asyncio.sleep(1.0)  # nodes announce themselves
        task = asyncio.create_task(net.run_task(seed=5, steps=8, prompt="a red fox in the snow"))
        await asyncio.sleep(0.5)  # assigned to the three there are
        for name in ("late-1", "late-2"):
            await net.node(runner, name, NodeAgent)
        outcome = await task
    honest = [dev_node_id(name) for name in (HONEST[0], "late-1", "late-2")]
    cheats = [dev_node_id(name) for name in ("cheat-1", "cheat-2")]
    assert isinstance(outcome, TaskSucceeded), outcome
    assert outcome.reason == "majority"
    assert outcome.verdicts == {**dict.fromkeys(honest, "agree"), **dict.fromkeys(cheats, "mismatch")}
    for cheat in cheats:
        assert "outvoted by 3 agreeing nodes" in outcome.verdict_details[cheat]
    assert all(image.key.split("/")[2] in honest for image in outcome.images)
