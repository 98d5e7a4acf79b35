"""The Grafana dashboards (deploy/k8s/base/monitoring/dashboards) are what
deploy/tools/dashboards.py generates, every query in them names only metrics the services
really export (read from the services' own registries: deploy/tools/exported_metrics.py),
every panel reads the `$datasource` variable, and the kustomization ships each one in a
ConfigMap Grafana's sidecar picks up. docs/metrics.md lists exactly the exported metrics.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "deploy" / "tools"
MONITORING = ROOT / "deploy" / "k8s" / "base" / "monitoring"
DASHBOARDS = MONITORING / "dashboards"
SERVICE_PREFIXES = {
    "gateway": "stipple_gateway_",
    "dispatcher": "stipple_dispatcher_",
    "validator": "stipple_validator_",
    "chain-indexer": "stipple_chain_indexer_",
    "gatekeeper": "stipple_gatekeeper_",
    "node-agent": "stipple_node_",
}


def tool(name: str) -> ModuleType:
    """A module of deploy/tools (not a package: loaded by path)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


promql = tool("promql_names")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return tool("exported_metrics").series_names()


@pytest.fixture(scope="module")
def families() -> list:
    return tool("exported_metrics").families()


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out += all_panels(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query variables
    (``label_values(metric, label)`` names a metric too)."""
    exprs = [t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", query)
        m = m or re.fullmatch(r"\s*query_result\((.*)\)\s*", query)
        assert m, f"variable {variable['name']}: cannot read its query {query!r}"
        exprs.append(m.group(1))
    return exprs


def check_dashboard(dashboard: dict, exported: set[str]) -> dict[str, set[str]]:
    """Each query naming a metric nobody exports, with those names."""
    return promql.unknown_metrics(queries(dashboard), exported)


# ---------------------------------------------------------------------- the dashboards


def test_the_five_dashboards_exist():
    assert [p.stem for p in dashboard_files()] == ["chain", "nodes", "overview", "tasks", "validation"]


def test_committed_json_is_what_the_generator_writes():
    generated = tool("dashboards").generate()
    assert sorted(generated) == [p.name for p in dashboard_files()]
    for name, text in generated.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run deploy/tools/dashboards.py"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_every_query_names_only_exported_metrics(path, exported):
    dashboard = json.loads(path.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 10
    assert check_dashboard(dashboard, exported) == {}
    named = set().union(*(promql.metric_names(e) for e in exprs))
    assert named, "no metric named at all: the parser is broken"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_every_panel_reads_the_datasource_variable(path):
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_the_dashboards_cover_every_part_of_the_network(exported):
    """Each service's metrics appear on some dashboard; every stage latency is plotted."""
    named = set()
    for path in dashboard_files():
        for expr in queries(json.loads(path.read_text())):
            named |= promql.metric_names(expr)
    for prefix in SERVICE_PREFIXES.values():
        assert any(n.startswith(prefix) for n in named), prefix
    for histogram in (
        "stipple_dispatcher_queue_wait_seconds",
        "stipple_dispatcher_decision_seconds",
        "stipple_node_model_load_seconds",
        "stipple_node_denoise_seconds",
        "stipple_node_upload_seconds",
        "stipple_validator_validation_seconds",
        "stipple_gateway_task_seconds",
    ):
        assert f"{histogram}_bucket" in named, histogram


def test_kustomization_ships_each_dashboard_to_the_grafana_sidecar():
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "prometheus-rules.yaml" in kustomization["resources"]
    assert kustomization["generatorOptions"]["labels"]["grafana_dashboard"] == "1"
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    shipped = sorted(f for g in kustomization["configMapGenerator"] for f in g["files"])
    assert shipped == sorted(f"dashboards/{p.name}" for p in dashboard_files())
    for generator in kustomization["configMapGenerator"]:
        assert len(generator["name"]) <= 63
        assert re.fullmatch(r"[a-z0-9-]+", generator["name"])


# ---------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("stipple_a_total", {"stipple_a_total"}),
        ('sum by (le, node_id) (rate(stipple_x_bucket{node_id=~"$node"}[$__rate_interval]))', {"stipple_x_bucket"}),
        ("histogram_quantile(0.95, sum(rate(a_bucket[5m])) by (le))", {"a_bucket"}),
        ('a{status=~"5..", route!="/x"} / ignoring(status) group_left(route) b', {"a", "b"}),
        ("rate(a[5m] offset 1h) and on (instance) b > 0.5 unless c", {"a", "b", "c"}),
        ('label_replace(absent(up_ish), "service", "$1", "job", "(.*)")', {"up_ish"}),
        ('{__name__="named_by_matcher", job="x"}', {"named_by_matcher"}),
        ("time() - max(ts_seconds) > 120 or max(lag) > 5e1", {"ts_seconds", "lag"}),
        ("max_over_time(a[1h:5m]) * 1e3 + Inf - NaN", {"a"}),
        ("sum without (state) (a) < 3 > 0 # a comment naming fake_metric", {"a"}),
        ("count by (version) (sum by (version, instance) (stipple_node_info))", {"stipple_node_info"}),
        ("topk(5, a) bool == 1 and b @ 1609746000 and c @ start()", {"a", "b", "c"}),
    ],
)
def test_parser_finds_the_metric_names(expr, names):
    assert promql.metric_names(expr) == names


@pytest.mark.parametrize(
    "expr",
    [
        "rat(stipple_a_total[5m])",  # a typo'd function is not silently a metric
        'a{job="x"',  # unbalanced
        '{__name__=~"stipple_.*"}',  # a pattern cannot be checked
    ],
)
def test_parser_refuses_what_it_cannot_check(expr):
    with pytest.raises(promql.PromQLError):
        promql.metric_names(expr)


def test_checker_fails_a_dashboard_naming_an_unexported_metric(exported):
    dashboard = json.loads((DASHBOARDS / "overview.json").read_text())
    panel = next(p for p in dashboard["panels"] if p.get("targets"))
    panel["targets"].append({"refId": "Z", "expr": "sum(rate(stipple_gateway_made_up_total[5m]))"})
    assert check_dashboard(dashboard, exported) == {
        "sum(rate(stipple_gateway_made_up_total[5m]))": {"stipple_gateway_made_up_total"}
    }
    # a histogram selected without its _bucket suffix is no series at all
    bare = {"panels": [{"targets": [{"expr": "stipple_gateway_task_seconds"}]}]}
    assert check_dashboard(bare, exported) == {"stipple_gateway_task_seconds": {"stipple_gateway_task_seconds"}}
    # so is a counter without _total, and a variable's metric counts too
    variable = {
        "panels": [],
        "templating": {"list": [{"name": "v", "type": "query", "query": "label_values(nope, a)"}]},
    }
    assert check_dashboard(variable, exported) == {"nope": {"nope"}}


# ---------------------------------------------------------------------- the exported metrics


def test_exported_metrics_follow_the_naming_convention(families):
    assert {f.service for f in families} == set(SERVICE_PREFIXES)
    for family in families:
        assert family.name.startswith(SERVICE_PREFIXES[family.service]), family
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes")), family
        assert family.help, family
    names = [(f.service, f.name) for f in families]
    assert len(names) == len(set(names))


def test_the_sre_signals_are_exported(exported):
    for name in (
        "stipple_dispatcher_nodes",
        "stipple_dispatcher_node_qos",
        "stipple_dispatcher_queue_depth",
        "stipple_node_gpu_devices",
        "stipple_node_gpu_memory_used_bytes",
        "stipple_node_gpu_utilization_ratio",
        "stipple_node_torch_cuda_memory_allocated_bytes",
        "stipple_node_model_loads_total",
        "stipple_node_pipeline_cache_lookups_total",
        "stipple_node_store_lookups_total",
        "stipple_validator_verdicts_total",
        "stipple_validator_slashes_total",
        "stipple_chain_indexer_slashes_total",
        "stipple_chain_indexer_lag_blocks",
        "stipple_chain_indexer_settlement_backlog",
        *(f"{p}consumer_pending_messages" for p in SERVICE_PREFIXES.values()),
        *(f"{p}consumer_ack_pending_messages" for p in SERVICE_PREFIXES.values()),
    ):
        assert name in exported, name


def test_docs_list_exactly_the_exported_metrics(families):
    text = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(stipple_(?:<service>_)?[a-z0-9_]+)`", text, re.M))
    assert documented, "docs/metrics.md has no metric table rows"
    # the consumer loop's metrics (every service has them) are documented once as stipple_<service>_...
    common = {"messages_total", "handle_seconds", "consumer_pending_messages", "consumer_ack_pending_messages"}
    common |= {"consumer_redelivered_messages", "consumer_info_errors_total", "rejected_messages_total"}
    common |= {"consumer_restarts_total"}
    exported = set()
    for family in families:
        series = family.name + ("_total" if family.type == "counter" else "")
        suffix = series.removeprefix(SERVICE_PREFIXES[family.service])
        exported.add(f"stipple_<service>_{suffix}" if suffix in common else series)
    assert documented == exported
