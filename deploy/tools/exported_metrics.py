"""Every metric the services export, read from their real registries.

Each service's collectors are declared in its own metrics module (`stipple_<service>.metrics`),
which is built here as the service builds it, on a registry of its own with the common
`Metrics` (the consumer loop's), without NATS or a chain: the gateway's (webhooks on, as
production runs it), the dispatcher's, the validator's, the chain-indexer's follower, settler
and relay, the gatekeeper's callout, intake and enforcer, a node agent's with its runner's
and model store's. Then every registry is walked with ``collect()``: a family is there even
before it has a sample.

    .venv/bin/python deploy/tools/exported_metrics.py   # prints name, type, service
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}

SERVICES = ("gateway", "dispatcher", "validator", "chain-indexer", "gatekeeper", "node-agent")


@dataclass(frozen=True)
class Family:
    name: str  # as the family is named (a counter without _total)
    type: str
    service: str
    help: str

    @property
    def series(self) -> tuple[str, ...]:
        """The names PromQL can select (a histogram's _bucket/_sum/_count, a counter's _total)."""
        return tuple(self.name + suffix for suffix in SUFFIXES[self.type])


def registries() -> dict[str, CollectorRegistry]:
    """One registry per service, holding everything that service registers."""
    from stipple_common.metrics import Metrics

    out = {}

    # gateway (with webhooks on, as production runs it)
    from stipple_gateway.limits import LimitMetrics
    from stipple_gateway.metrics import GatewayMetrics

    metrics = Metrics("gateway")
    GatewayMetrics(metrics.registry, webhooks=True)
    LimitMetrics(metrics.registry)  # the shared rate limits' (STIPPLE_SHARED_LIMITS, on by default)
    out["gateway"] = metrics.registry

    from stipple_dispatcher.metrics import DispatcherMetrics
    from stipple_dispatcher.queue import TaskQueue
    from stipple_dispatcher.selection import NodeIndex
    from stipple_dispatcher.settings import DispatcherSettings

    metrics = Metrics("dispatcher")
    DispatcherMetrics(metrics.registry, TaskQueue(NodeIndex(), DispatcherSettings()))
    out["dispatcher"] = metrics.registry

    from stipple_validator.metrics import ValidatorMetrics

    metrics = Metrics("validator")
    ValidatorMetrics(metrics.registry)
    out["validator"] = metrics.registry

    from stipple_chain_indexer.metrics import FollowerMetrics, RelayMetrics, SettlerMetrics

    metrics = Metrics("chain-indexer")
    FollowerMetrics(metrics.registry)
    SettlerMetrics(metrics.registry)
    RelayMetrics(metrics.registry)
    out["chain-indexer"] = metrics.registry

    from stipple_gatekeeper.metrics import CalloutMetrics, EnforcerMetrics, IntakeMetrics

    metrics = Metrics("gatekeeper")  # with each component on
    CalloutMetrics(metrics.registry)
    IntakeMetrics(metrics.registry)
    EnforcerMetrics(metrics.registry)
    out["gatekeeper"] = metrics.registry

    from stipple_node.metrics import NodeMetrics, RunnerMetrics, StoreMetrics

    metrics = Metrics("node-agent")
    NodeMetrics.of(metrics, parts=[RunnerMetrics(), StoreMetrics()])
    out["node-agent"] = metrics.registry
    return out


def families() -> list[Family]:
    found = []
    for service, registry in registries().items():
        for family in registry.collect():
            if family.name.endswith("_created"):
                continue  # prometheus_client's creation-time gauges of histograms
            found.append(Family(family.name, family.type, service, family.documentation))
    return found


def series_names() -> set[str]:
    """Every name a PromQL selector may use."""
    return {name for family in families() for name in family.series}


if __name__ == "__main__":
    for f in sorted(families(), key=lambda f: (f.service, f.name)):
        print(f"{f.service:<14} {f.type:<10} {', '.join(f.series)}")
