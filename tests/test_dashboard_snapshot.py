"""deploy/tools/dashboard_snapshot.py: the parts that turn dashboards into plain PromQL and
`stipple up`'s endpoints into a Prometheus configuration (the drawing itself is run by
`just dashboard-pictures`, against a real Prometheus)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("dashboard_snapshot", ROOT / "deploy/tools/dashboard_snapshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


snapshot = load_tool()


def test_grafana_variables_become_plain_promql():
    expr = 'sum by (instance) (rate(stipple_node_tasks_total{instance=~"$instance",pod=~"${node}"}[$__rate_interval]))'
    assert snapshot.grafana_expr(expr, "30s") == (
        'sum by (instance) (rate(stipple_node_tasks_total{instance=~".*",pod=~".*"}[30s]))'
    )


def test_every_dashboard_query_is_left_without_a_variable():
    dashboards = sorted((snapshot.MONITORING / "dashboards").glob("*.json"))
    assert len(dashboards) == 5
    for path in dashboards:
        panels = snapshot.panels_of(json.loads(path.read_text()))
        assert panels, path
        for panel in panels:
            for target in panel["targets"]:
                assert "$" not in snapshot.grafana_expr(target["expr"], "30s"), (path.name, panel["title"])


def test_legend_fills_labels_and_falls_back_to_them():
    assert snapshot.legend("{{outcome}} {{reason}}", {"outcome": "succeeded", "reason": "unanimous"}) == (
        "succeeded unanimous"
    )
    assert snapshot.legend("", {"__name__": "x", "b": "2", "a": "1"}) == "a=1, b=2"
    assert snapshot.legend("", {}) == "value"


def test_prometheus_config_has_a_job_per_service_and_a_pod_per_process():
    metrics = {
        "gateway": "http://127.0.0.1:8080/metrics",
        "node-1": "http://127.0.0.1:4001/metrics",
        "node-2": "http://127.0.0.1:4002/metrics",
    }
    config = snapshot.prometheus_config(metrics, None, "2s")
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert set(jobs) == {"stipple/gateway", "stipple/node-agent"}
    assert [c["labels"]["pod"] for c in jobs["stipple/node-agent"]] == ["node-1", "node-2"]
    assert jobs["stipple/gateway"][0]["targets"] == ["127.0.0.1:8080"]
    assert "rule_files" not in config


def test_alert_rules_are_the_prometheus_rule_groups(tmp_path):
    path = snapshot.alert_rules(tmp_path / "rules.yml")
    assert path is not None
    groups = yaml.safe_load(path.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert {"StippleNoLiveNodes", "StippleQueueGrowing", "StippleChainIndexerStalled"} <= alerts
