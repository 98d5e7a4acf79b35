"""The node agent's metrics: GPUs through NVML (none here: a stand-in NVML shows the
series, and failures never break a scrape), the model store's lookups, downloads and
evictions, and the runner's model loads and pipeline cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stipple_common.metrics import Metrics
from stipple_node.metrics import GpuCollector
from stipple_node.pipeline import ModelNotFound, PipelineRunner
from stipple_node.service import NodeSettings, make_agent
from stipple_node.store import ModelNotAvailable, ModelStore
from stipple_testkit.fileserver import FileServer, Served


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def gpu_registry(collector: GpuCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


class FakeNvml:
    """pynvml's functions for two GPUs; `broken` makes every read fail."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        if self.broken:
            raise self.NVMLError("GPU is lost")
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=141 * 2**30, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=50 + handle, memory=20)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if handle == 1:
            raise self.NVMLError("not supported")
        return 40


def test_without_nvml_only_zero_devices_is_reported(monkeypatch):
    class Missing:
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Missing())
    values = samples(gpu_registry(GpuCollector()))
    assert values[("stipple_node_gpu_devices", ())] == 0
    assert not [
        name for name, _ in values if name.startswith("stipple_node_gpu_") and name != "stipple_node_gpu_devices"
    ]
    assert not [name for name, _ in values if name.startswith("stipple_node_torch_")]


def test_the_real_pynvml_without_a_gpu_does_not_crash():
    text = generate_latest(gpu_registry(GpuCollector())).decode()
    assert "stipple_node_gpu_devices" in text  # 0 here; on a GPU machine its count


def test_nvml_series_per_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    values = samples(gpu_registry(GpuCollector("cuda")))
    gpu0 = (("gpu", "0"), ("name", "NVIDIA H200"))
    gpu1 = (("gpu", "1"), ("name", "NVIDIA H200"))
    assert values[("stipple_node_gpu_devices", ())] == 2
    assert values[("stipple_node_gpu_memory_used_bytes", gpu0)] == 2**30
    assert values[("stipple_node_gpu_memory_used_bytes", gpu1)] == 2 * 2**30
    assert values[("stipple_node_gpu_memory_total_bytes", gpu1)] == 141 * 2**30
    assert values[("stipple_node_gpu_utilization_ratio", gpu1)] == pytest.approx(0.51)
    assert values[("stipple_node_gpu_memory_utilization_ratio", gpu0)] == pytest.approx(0.2)
    assert values[("stipple_node_gpu_temperature_celsius", gpu0)] == 40
    assert ("stipple_node_gpu_temperature_celsius", gpu1) not in values  # unsupported: left out


def test_a_failing_nvml_never_fails_the_scrape(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(broken=True))
    text = generate_latest(gpu_registry(GpuCollector())).decode()
    assert "# TYPE stipple_node_gpu_devices gauge" in text


def test_store_counts_local_paths_hits_downloads_and_errors(tmp_path: Path):
    with FileServer() as server, ModelStore(tmp_path / "store", budget_bytes=2500) as store:
        metrics = Metrics("node-agent")
        metrics.register(store.metrics.collectors())
        urls = [server.add(f"/{n}", Served(os.urandom(1000), filename=f"{n}.safetensors")) for n in "abc"]
        store.resolve(urls[0])
        store.resolve(urls[0])
        store.resolve(urls[1])
        store.resolve(urls[2])  # 3000 bytes > 2500: evicts a
        store.resolve(str(tmp_path))
        with pytest.raises(ModelNotAvailable):
            store.resolve(str(tmp_path / "missing"))
        values = samples(metrics.registry)
    lookups = {labels: v for (name, labels), v in values.items() if name == "stipple_node_store_lookups_total"}
    assert lookups == {
        (("result", "download"), ("source", "url")): 3,
        (("result", "hit"), ("source", "url")): 1,
        (("result", "local"), ("source", "local")): 1,
        (("result", "error"), ("source", "local")): 1,
    }
    assert values[("stipple_node_store_downloaded_bytes_total", (("source", "url"),))] == 3000
    assert values[("stipple_node_store_evictions_total", ())] == 1
    assert values[("stipple_node_store_used_bytes", ())] == 2000


def test_runner_counts_loads_and_cache_hits(tiny_model_dir: Path):
    runner = PipelineRunner({"tiny-sd": tiny_model_dir})
    metrics = Metrics("node-agent")
    metrics.register(runner.metrics.collectors())
    runner.load("tiny-sd")
    runner.load("tiny-sd")
    runner.load("tiny-sd")
    with pytest.raises(ModelNotFound):
        runner.load("nope")
    values = samples(metrics.registry)
    assert values[("stipple_node_model_loads_total", (("result", "loaded"),))] == 1
    assert values[("stipple_node_pipeline_cache_lookups_total", (("result", "miss"),))] == 2
    assert values[("stipple_node_pipeline_cache_lookups_total", (("result", "hit"),))] == 2
    assert values[("stipple_node_model_load_seconds_count", ())] == 1
    assert values[("stipple_node_loaded_pipelines", ())] == 1


def test_an_agent_built_again_on_one_registry_reuses_its_collectors(tmp_path: Path):
    """A node joins again with the same Metrics (service.keep_joined): an agent built on them
    again gets the same collectors, not a second set the registry would refuse."""
    metrics = Metrics("node-agent")
    ctx = SimpleNamespace(nc=None, js=None, metrics=metrics)
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        runner = PipelineRunner({}, store=store)
        first = make_agent(ctx, NodeSettings(), runner, store)  # type: ignore[arg-type]
        again = make_agent(ctx, NodeSettings(), runner, store)  # type: ignore[arg-type]
        assert again.metrics is first.metrics
        again.busy = True
        values = samples(metrics.registry)
    assert values[("stipple_node_busy", ())] == 1  # the agent built last
    assert values[("stipple_node_store_used_bytes", ())] == 0
    assert ("stipple_node_loaded_pipelines", ()) in values
    assert values[("stipple_node_gpu_devices", ())] >= 0
