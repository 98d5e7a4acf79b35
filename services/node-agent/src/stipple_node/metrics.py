"""The node agent's Prometheus metrics (docs/metrics.md lists them; the dashboards and
alerts read them by these names): the agent's tasks, uploads and identity (`NodeMetrics`),
model loads and the pipeline cache (the runner's `RunnerMetrics`), the model store's
lookups, downloads and evictions (`StoreMetrics`), and the GPUs (NVML, and torch.cuda's
allocator: `GpuCollector`).

The runner and the store are built before the service opens its registry (a node loads
its models before it announces itself), so their metrics are made without a registry
and registered with the agent's (`NodeMetrics.of`, `Metrics.register`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stipple_common.metrics import Metrics

log = structlog.get_logger("stipple.node.metrics")

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
DENOISE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    """What the node agent counts (service.NodeAgent), and the GPUs, in one registry. The
    agent gives `busy` its function and sets `info`'s one series. Get it with `of`: one per
    registry, however many agents are built on it."""

    def __init__(self, registry: CollectorRegistry, device: str = "cpu") -> None:
        self.tasks = Counter("stipple_node_tasks_total", "Tasks run, by result", ["result"], registry=registry)
        self.task_seconds = Histogram(
            "stipple_node_task_seconds",
            "Assignment received to result published",
            registry=registry,
            buckets=TASK_BUCKETS,
        )
        self.upload_seconds = Histogram(
            "stipple_node_upload_seconds",
            "Time to upload one task's images to the blob store",
            registry=registry,
            buckets=UPLOAD_BUCKETS,
        )
        self.busy = Gauge("stipple_node_busy", "1 while the node runs a task, else 0", registry=registry)
        self.info = Gauge(
            "stipple_node_info",
            "1, labelled with the node's id (its address), version and device (join on instance)",
            ["node_id", "version", "device"],
            registry=registry,
        )
        self.gpus = GpuCollector(device)
        registry.register(self.gpus)

    @classmethod
    def of(
        cls, metrics: Metrics, device: str = "cpu", *, parts: Iterable[RunnerMetrics | StoreMetrics] = ()
    ) -> NodeMetrics:
        """The node agent's metrics in `metrics`' registry, with what its runner and its store
        count (`parts`, made without a registry) registered there too. Made the first time
        only (with that call's `device`): a node joins again with the same `Metrics`
        (service.keep_joined), and an agent built again on it must reuse these collectors,
        since the registry refuses a second set of the same names."""
        made = _BY_REGISTRY.get(metrics.registry)
        if made is None:
            made = _BY_REGISTRY[metrics.registry] = cls(metrics.registry, device)
        for part in parts:
            metrics.register(part.collectors())  # the same ones again are left as they are
        return made


class RunnerMetrics:
    """What a PipelineRunner counts."""

    def __init__(self, loaded: Callable[[], int] | None = None) -> None:
        self.model_loads = Counter(
            "stipple_node_model_loads_total",
            "Base pipelines loaded into memory, by result (loaded, failed)",
            ["result"],
            registry=None,
        )
        self.model_load_seconds = Histogram(
            "stipple_node_model_load_seconds",
            "Time to load one base pipeline (from disk or the store, onto the device)",
            registry=None,
            buckets=LOAD_BUCKETS,
        )
        self.pipeline_cache = Counter(
            "stipple_node_pipeline_cache_lookups_total",
            "Base pipeline lookups in the in-memory LRU, by result (hit, miss)",
            ["result"],
            registry=None,
        )
        self.denoise_seconds = Histogram(
            "stipple_node_denoise_seconds",
            "Time to generate one task's images (every image's diffusion and decoding)",
            registry=None,
            buckets=DENOISE_BUCKETS,
        )
        self.loaded_pipelines = Gauge(
            "stipple_node_loaded_pipelines", "Base pipelines held in memory now", registry=None
        )
        if loaded is not None:
            self.loaded_pipelines.set_function(loaded)

    def collectors(self) -> list[Collector]:
        return [
            self.model_loads,
            self.model_load_seconds,
            self.pipeline_cache,
            self.denoise_seconds,
            self.loaded_pipelines,
        ]


class StoreMetrics:
    """What a ModelStore counts. A lookup's result: hit (stored already), download (fetched
    now), local (an operator's own path), error."""

    def __init__(self, used_bytes: Callable[[], float] | None = None) -> None:
        self.lookups = Counter(
            "stipple_node_store_lookups_total",
            "Model store resolutions, by source (hf, url, local) and result (hit, download, local, error)",
            ["source", "result"],
            registry=None,
        )
        self.downloaded_bytes = Counter(
            "stipple_node_store_downloaded_bytes_total", "Bytes the model store downloaded", ["source"], registry=None
        )
        self.evictions = Counter(
            "stipple_node_store_evictions_total", "Entries the model store evicted to stay in budget", registry=None
        )
        self.used_bytes = Gauge(
            "stipple_node_store_used_bytes", "Bytes the model store holds (and reserves for downloads)", registry=None
        )
        if used_bytes is not None:
            self.used_bytes.set_function(used_bytes)
        self._download = threading.local()

    def collectors(self) -> list[Collector]:
        return [self.lookups, self.downloaded_bytes, self.evictions, self.used_bytes]

    # one resolution runs in one thread: whether it downloaded is kept per thread
    def begin(self) -> None:
        self._download.happened = False

    def downloaded(self, source: str, size: int) -> None:
        self._download.happened = True
        self.downloaded_bytes.labels(source).inc(max(0, size))

    def finish(self, source: str, error: bool = False) -> None:
        if error:
            result = "error"
        elif source == "local":
            result = "local"
        else:
            result = "download" if getattr(self._download, "happened", False) else "hit"
        self.lookups.labels(source, result).inc()


class GpuCollector(Collector):
    """``stipple_node_gpu_*`` from NVML (every GPU the node sees), and
    ``stipple_node_torch_cuda_memory_*`` from torch's allocator when CUDA is available.
    Without NVML (no driver, no GPU) it reports ``stipple_node_gpu_devices 0`` and no
    per-GPU series; a failing NVML call never fails a scrape."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._nvml: Any = None
        self._lock = threading.Lock()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver, no GPU: nothing to report
            log.info("nvml_unavailable", error=str(exc) or type(exc).__name__)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        with self._lock:
            try:
                self._read_nvml(*families[:6])
            except Exception as exc:
                log.warning("nvml_read_failed", error=str(exc) or type(exc).__name__)
            try:
                self._read_torch(*families[6:])
            except Exception as exc:
                log.warning("torch_cuda_memory_failed", error=str(exc) or type(exc).__name__)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        gpu = ["gpu", "name"]
        return [
            GaugeMetricFamily("stipple_node_gpu_devices", "GPUs NVML reports on this node (0 without NVML)"),
            GaugeMetricFamily("stipple_node_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=gpu),
            GaugeMetricFamily("stipple_node_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=gpu),
            GaugeMetricFamily(
                "stipple_node_gpu_utilization_ratio", "Share of the last sample period the GPU was busy", labels=gpu
            ),
            GaugeMetricFamily(
                "stipple_node_gpu_memory_utilization_ratio",
                "Share of the last sample period GPU memory was being read or written",
                labels=gpu,
            ),
            GaugeMetricFamily("stipple_node_gpu_temperature_celsius", "GPU core temperature", labels=gpu),
            GaugeMetricFamily(
                "stipple_node_torch_cuda_memory_allocated_bytes",
                "Memory torch's CUDA allocator has handed out",
                labels=["device"],
            ),
            GaugeMetricFamily(
                "stipple_node_torch_cuda_memory_reserved_bytes",
                "Memory torch's CUDA allocator holds from the driver",
                labels=["device"],
            ),
        ]

    def _read_nvml(self, devices: Any, used: Any, total: Any, util: Any, mem_util: Any, temp: Any) -> None:
        nvml = self._nvml
        if nvml is None:
            devices.add_metric([], 0)
            return
        count = nvml.nvmlDeviceGetCount()
        devices.add_metric([], count)
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            labels = [str(i), name.decode() if isinstance(name, bytes) else str(name)]
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            util.add_metric(labels, rates.gpu / 100.0)
            mem_util.add_metric(labels, rates.memory / 100.0)
            try:
                temp.add_metric(labels, float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
            except Exception:  # not every device reports it
                pass

    def _read_torch(self, allocated: Any, reserved: Any) -> None:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return  # never initialise CUDA from a scrape
        for i in range(torch.cuda.device_count()):
            allocated.add_metric([f"cuda:{i}"], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([f"cuda:{i}"], float(torch.cuda.memory_reserved(i)))


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, NodeMetrics] = weakref.WeakKeyDictionary()
"""Each registry's NodeMetrics (which hold no reference to their registry)."""
