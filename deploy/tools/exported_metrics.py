"""Every metric the services export, read from their real registries.

Each service's metric holders are built as the service builds them (the consumer loop's
`Metrics`, the gateway, its webhooks, the dispatcher, the validator, the chain-indexer's
follower and settler, a node agent with its runner and model store) on a registry of its
own, without NATS or a chain: the holders only store those. Then every registry is
walked with ``collect()``: a family is there even before it has a sample.

    .venv/bin/python deploy/tools/exported_metrics.py   # prints name, type, service
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

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
    from stipple_common.nodes import NodeDirectory
    from stipple_gateway.app import Gateway, GatewaySettings

    metrics = Metrics("gateway")
    Gateway(None, None, None, NodeDirectory(ttl_s=10), GatewaySettings(webhook_secret="x"), metrics)  # type: ignore[arg-type]
    out["gateway"] = metrics.registry

    from stipple_dispatcher.selection import NodeIndex
    from stipple_dispatcher.service import Dispatcher, DispatcherSettings

    metrics = Metrics("dispatcher")
    Dispatcher(None, NodeIndex(), DispatcherSettings(), metrics)  # type: ignore[arg-type]
    out["dispatcher"] = metrics.registry

    from stipple_validator.probes import Prober
    from stipple_validator.service import Validator, ValidatorSettings

    metrics = Metrics("validator")
    directory = NodeDirectory(ttl_s=10)
    prober = Prober(None, directory, None, every_s=5, timeout_s=60)  # type: ignore[arg-type]
    from stipple_validator.sentinel import Sentinel

    sentinel = Sentinel(None, None, metrics, strikes=1, window_s=1, ban_s=1)  # type: ignore[arg-type]
    Validator(None, directory, None, prober, ValidatorSettings(), metrics, None, sentinel)  # type: ignore[arg-type]
    out["validator"] = metrics.registry

    from stipple_chain_indexer.follower import ChainFollower
    from stipple_chain_indexer.settler import Settler

    metrics = Metrics("chain-indexer")
    chain = SimpleNamespace(deployment=SimpleNamespace(token="0x0", staking="0x0", payment="0x0"))
    ChainFollower(chain, None, None, None, 2, metrics)  # type: ignore[arg-type]
    Settler(chain, None, None, None, "", metrics)  # type: ignore[arg-type]
    from stipple_chain_indexer.relay import Relay

    Relay(chain, None, None, False, 0, metrics)  # type: ignore[arg-type]
    out["chain-indexer"] = metrics.registry

    from stipple_gatekeeper.admission import Registry
    from stipple_gatekeeper.callout import Callout
    from stipple_gatekeeper.enforcer import Enforcer
    from stipple_gatekeeper.intake import Intake

    metrics = Metrics("gatekeeper")
    registry = Registry(min_stake=0)
    Callout(js=None, registry=registry, issuer=None, metrics=metrics, node_ttl_s=1, applicant_ttl_s=1)  # type: ignore[arg-type]
    Intake(nc=None, js=None, blobs=None, metrics=metrics, max_blob_bytes=1)  # type: ignore[arg-type]
    Enforcer(None, registry, metrics)  # type: ignore[arg-type]
    out["gatekeeper"] = metrics.registry

    from stipple_node.pipeline import PipelineRunner
    from stipple_node.service import NodeAgent, NodeSettings
    from stipple_node.store import ModelStore

    metrics = Metrics("node-agent")
    with tempfile.TemporaryDirectory() as tmp, ModelStore(Path(tmp), budget_bytes=None) as store:
        NodeAgent(
            nc=None,  # type: ignore[arg-type]
            js=None,  # type: ignore[arg-type]
            runner=PipelineRunner({}, store=store),
            settings=NodeSettings(),
            metrics=metrics,
            store=store,
        )
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
