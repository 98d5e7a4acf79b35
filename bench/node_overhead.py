"""Node-agent overhead against bare diffusers, and model load / LoRA switch times.

The same txt2img task (one image, fixed seed, one torch thread) is run
- bare: `StableDiffusionPipeline.from_pretrained(folder)(...)` in this process, and
- node: through the real node agent (its service code on a real nats-server), from
  publishing the assignment to receiving the node's `committed` event (its last word
  before the validator asks it to reveal), which includes compel prompt encoding, PNG
  encoding, pHash, the upload through the gatekeeper's blob intake (in this process) to
  the JetStream object store, the signed commitment and the events.
Runs alternate (bare, node, bare, node, ...) so that machine noise hits both alike; the
medians and their ratio are printed. Goal: ratio <= 1.03 on a task that takes >= 1 s.

    python bench/node_overhead.py [--size 512] [--steps 12] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from eth_account import Account

from stipple_common import bus, subjects
from stipple_common.identity import dev_node_id, key_for
from stipple_common.messages import Assignment, TaskAssigned, task_event_decoder
from stipple_common.natsserver import NatsServer
from stipple_common.service import open_service
from stipple_common.taskspec import parse_task
from stipple_gatekeeper.service import GatekeeperSettings
from stipple_gatekeeper.service import serve as serve_gatekeeper
from stipple_node.pipeline import PipelineRunner, configure_determinism
from stipple_node.service import NodeSettings, join_network, serve
from stipple_node.tinymodel import make_tiny_model
from stipple_testkit.tinyzoo import build_zoo


def bare_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_bare(pipe, size: int, steps: int, seed: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt="a lighthouse at dusk",
            negative_prompt="",
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
    return time.perf_counter() - started


async def node_runs(folder: Path, size: int, steps: int, seeds: list[int], bare, out: list[float]) -> list[float]:
    node_times: list[float] = []
    key, node_id = key_for("bench"), dev_node_id("bench")
    with NatsServer.start() as server:
        control_settings = GatekeeperSettings(nats_url=server.url, callout=False)  # the blob intake only
        settings = NodeSettings(nats_url=server.url, torch_threads=1)
        runner = PipelineRunner({"m": folder})
        runner.load("m")
        stop = asyncio.Event()
        async with (
            open_service("gatekeeper", control_settings, blobs=True, stop=stop) as control,
            join_network(settings, Account.from_key(key), stop=stop) as ctx,
        ):
            gatekeeper = asyncio.create_task(serve_gatekeeper(control, control_settings))
            task = asyncio.create_task(serve(ctx, settings, runner, key=key))
            await asyncio.sleep(0.5)
            for seed in seeds:
                out.append(run_bare(bare, size, steps, seed))  # interleaved with the node runs
                spec = parse_task(
                    {
                        "base_model": "m",
                        "prompt": "a lighthouse at dusk",
                        "task_config": {"image_width": size, "image_height": size, "steps": steps, "seed": seed},
                    }
                )
                task_id = uuid.uuid4().hex
                done = asyncio.get_running_loop().create_future()

                async def on_event(msg, done=done) -> None:
                    if not done.done():
                        done.set_result(task_event_decoder.decode(msg.data))

                sub = await control.nc.subscribe(subjects.task_subject(task_id, "committed", node_id), cb=on_event)
                started = time.perf_counter()
                deadline = time.time() + 600
                # as the dispatcher: the assignment (the intake takes an assigned node's uploads only), the work
                assigned = TaskAssigned(task_id=task_id, nodes=[node_id], deadline=deadline)
                await bus.publish(control.js, subjects.task_subject(task_id, "assigned"), assigned, msg_id=task_id)
                work = Assignment(task_id=task_id, spec=spec, deadline=deadline)
                await bus.publish(control.js, subjects.work_subject(node_id), work, msg_id=task_id)
                await asyncio.wait_for(done, 600)
                node_times.append(time.perf_counter() - started)
                await sub.unsubscribe()
            stop.set()
            await task
            await gatekeeper
    return node_times


def load_and_lora_times(root: Path) -> dict[str, float]:
    zoo = build_zoo(root / "zoo")
    from stipple_node.store import ModelStore

    with ModelStore(root / "store", budget_bytes=None) as store:
        runner = PipelineRunner({"tiny-sd": zoo["tiny-sd"]}, store=store)
        started = time.perf_counter()
        runner.load("tiny-sd")
        cold = time.perf_counter() - started
        started = time.perf_counter()
        runner.load("tiny-sd")
        warm = time.perf_counter() - started
        base = {
            "base_model": "tiny-sd",
            "prompt": "a cat",
            "task_config": {"image_width": 64, "image_height": 64, "steps": 2, "seed": 1},
        }
        runner.run(parse_task(base))
        plain = min(_timed(runner, base) for _ in range(3))
        lora = {**base, "loras": [{"model": str(zoo["tiny-lora-sd15.safetensors"]), "weight": 0.8}]}
        with_lora = min(_timed(runner, lora) for _ in range(3))
    return {
        "cold load": cold,
        "warm hit": warm,
        "task without LoRA": plain,
        "LoRA switch (load + unload)": with_lora - plain,
    }


def _timed(runner: PipelineRunner, task: dict) -> float:
    started = time.perf_counter()
    runner.run(parse_task(task))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    configure_determinism(1)
    root = Path(tempfile.mkdtemp(prefix="stipple-bench-"))
    folder = make_tiny_model(root / "tiny-sd")
    bare = bare_pipeline(folder)
    run_bare(bare, args.size, args.steps, 0)  # warm-up
    bare_times: list[float] = []
    seeds = list(range(1, args.runs + 1))
    node_times = asyncio.run(node_runs(folder, args.size, args.steps, [0, *seeds], bare, bare_times))
    node_times, bare_times = node_times[1:], bare_times[1:]  # first of each is warm-up
    bare_median, node_median = statistics.median(bare_times), statistics.median(node_times)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 1 thread")
    print(f"task: tiny-sd txt2img {args.size}x{args.size}, {args.steps} steps, {args.runs} runs each, interleaved")
    print(f"bare diffusers  median {bare_median:.3f} s  (min {min(bare_times):.3f}, max {max(bare_times):.3f})")
    print(f"node agent      median {node_median:.3f} s  (min {min(node_times):.3f}, max {max(node_times):.3f})")
    print(f"ratio node/bare {node_median / bare_median:.3f}  (goal <= 1.03)")
    for name, seconds in load_and_lora_times(root).items():
        print(f"{name:<28} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
