"""The Grafana dashboards, as code: writes deploy/k8s/base/monitoring/dashboards/*.json.

Generated rather than hand-written: five dashboards of some sixty panels share one
layout, one datasource variable and a handful of query shapes (a rate by label, a
histogram's quantiles), and Grafana's JSON model repeats all of that in every panel. Here
each panel is one line of PromQL; tests/test_dashboards.py checks that the committed JSON
is what this script writes, and that every query names only metrics the services export.

    .venv/bin/python deploy/tools/dashboards.py          # write the JSON
    .venv/bin/python deploy/tools/dashboards.py --check  # exit 1 if the committed JSON differs

Metrics: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy" / "k8s" / "base" / "monitoring" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


# ---------------------------------------------------------------------- query shapes


def rate(metric: str, by: str = "", matchers: str = "") -> str:
    selector = f"{metric}{{{matchers}}}" if matchers else metric
    inner = f"rate({selector}[{RATE}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantile(q: float, histogram: str, by: str = "", matchers: str = "") -> str:
    selector = f"{histogram}_bucket{{{matchers}}}" if matchers else f"{histogram}_bucket"
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({selector}[{RATE}])))"


def ratio(numerator: str, denominator: str, *, none_is_zero: bool = False) -> str:
    """numerator / denominator; with `none_is_zero` (label-less sums only) a numerator with
    no series (no 5xx, no mismatch yet) counts as 0, so the share reads 0 rather than
    "no data" while there is traffic (no traffic still reads "no data")."""
    if none_is_zero:
        numerator = f"{numerator} or vector(0)"
    return f"({numerator}) / clamp_min({denominator}, 1e-9)"


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"  # or stat
    description: str = ""
    width: int = 12
    height: int = 8
    stack: bool = False
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)


def ts(title: str, *targets: tuple[str, str] | str, unit: str = "short", **kw: Any) -> Panel:
    return Panel(title, [Target(*t) if isinstance(t, tuple) else Target(t) for t in targets], unit=unit, **kw)


def stat(title: str, expr: str, unit: str = "short", **kw: Any) -> Panel:
    return Panel(title, [Target(expr)], unit=unit, kind="stat", width=4, height=4, **kw)


def quantiles(title: str, histogram: str, matchers: str = "", by: str = "", legend_by: str = "") -> Panel:
    suffix = f" {{{{{legend_by}}}}}" if legend_by else ""
    return ts(
        title,
        *[(quantile(q, histogram, by, matchers), f"p{round(q * 100)}{suffix}") for q in (0.5, 0.95, 0.99)],
        unit="s",
    )


# ---------------------------------------------------------------------- rendering


def variable_datasource() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def variable_query(name: str, label: str, metric: str, label_name: str) -> dict[str, Any]:
    query = f"label_values({metric}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def render_panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for value, color in panel.thresholds],
        }
        defaults["color"] = {"mode": "thresholds"}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 10,
            "showPoints": "never",
            "spanNulls": True,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend or "__auto",
                "range": True,
                "instant": False,
            }
            for i, target in enumerate(panel.targets)
        ],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def render(uid: str, title: str, description: str, rows: list[tuple[str, list[Panel]]], variables=()) -> dict:
    panels: list[dict[str, Any]] = []
    y, panel_id = 0, 1
    for row_title, row in rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x, row_height = 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(render_panel(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["stipple"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [{"title": "Stipple", "type": "dashboards", "tags": ["stipple"], "asDropdown": True}],
        "templating": {"list": [variable_datasource(), *variables]},
        "panels": panels,
    }


# ---------------------------------------------------------------------- the dashboards

LIVE = 'sum(stipple_dispatcher_nodes{state=~"idle|busy"})'
CONSUMER_SERVICES = ("gateway", "dispatcher", "validator", "chain_indexer")


def consumer_lag(kind: str) -> list[tuple[str, str]]:
    return [
        (f"sum by (consumer) (stipple_{svc}_consumer_{kind}_messages)", f"{svc.replace('_', '-')} {{{{consumer}}}}")
        for svc in CONSUMER_SERVICES
    ]


def overview() -> dict:
    outcomes = "stipple_validator_outcomes_total"
    requests = "stipple_gateway_requests_total"
    return render(
        "stipple-overview",
        "Stipple / Overview",
        "The network at a glance: live nodes, the queue, task outcomes, end-to-end latency, errors, the chain.",
        [
            (
                "Now",
                [
                    stat(
                        "Live nodes",
                        LIVE,
                        thresholds=[(None, "red"), (3, "orange"), (6, "green")],
                        description="idle + busy nodes the dispatcher can use (a task needs 3 of distinct operators)",
                    ),
                    stat(
                        "Queue depth",
                        "sum(stipple_dispatcher_queue_depth)",
                        thresholds=[(None, "green"), (50, "orange")],
                    ),
                    stat("Tasks accepted / s", rate("stipple_gateway_tasks_submitted_total"), unit="reqps"),
                    stat(
                        "Succeeded (share)",
                        ratio(rate(outcomes, matchers='outcome="succeeded"'), rate(outcomes), none_is_zero=True),
                        unit="percentunit",
                        thresholds=[(None, "red"), (0.9, "orange"), (0.98, "green")],
                    ),
                    stat(
                        "Gateway 5xx (share)",
                        ratio(rate(requests, matchers='status=~"5.."'), rate(requests), none_is_zero=True),
                        unit="percentunit",
                        thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
                    ),
                    stat(
                        "Chain lag",
                        "max(stipple_chain_indexer_lag_blocks)",
                        unit="none",
                        thresholds=[(None, "green"), (10, "orange"), (50, "red")],
                    ),
                ],
            ),
            (
                "Tasks",
                [
                    ts(
                        "Outcomes / s",
                        (rate(outcomes, "outcome, reason"), "{{outcome}} {{reason}}"),
                        unit="ops",
                        stack=True,
                    ),
                    quantiles("End-to-end latency (gateway: submitted to outcome)", "stipple_gateway_task_seconds"),
                    ts(
                        "Queue",
                        ("sum(stipple_dispatcher_queue_depth)", "queued"),
                        ('sum(stipple_dispatcher_held_tasks{state="running"})', "running"),
                    ),
                    ts("Nodes by state", ("sum by (state) (stipple_dispatcher_nodes)", "{{state}}"), stack=True),
                ],
            ),
            (
                "Health",
                [
                    ts(
                        "HTTP requests / s by status",
                        (rate(requests, "status"), "{{status}}"),
                        unit="reqps",
                        stack=True,
                    ),
                    ts("Consumer lag: messages not yet delivered", *consumer_lag("pending")),
                    ts(
                        "Messages nak'd or terminated / s",
                        *[
                            (
                                rate(f"stipple_{svc}_messages_total", "outcome", 'outcome=~"nak|term"'),
                                f"{svc} {{{{outcome}}}}",
                            )
                            for svc in (*CONSUMER_SERVICES, "node")
                        ],
                        unit="ops",
                    ),
                    ts(
                        "Chain: head and indexed block",
                        ("max(stipple_chain_indexer_head_block)", "head"),
                        ("max(stipple_chain_indexer_indexed_block)", "indexed"),
                        unit="none",
                    ),
                ],
            ),
        ],
    )


def tasks() -> dict:
    return render(
        "stipple-tasks",
        "Stipple / Tasks",
        "A task's way through the network, stage by stage: accepted, queued, assigned, run, validated, settled.",
        [
            (
                "Flow",
                [
                    ts(
                        "Accepted / s by source",
                        (rate("stipple_gateway_tasks_submitted_total", "source"), "{{source}}"),
                        unit="ops",
                    ),
                    ts(
                        "Dispatcher results / s",
                        (rate("stipple_dispatcher_tasks_total", "result"), "{{result}}"),
                        unit="ops",
                    ),
                    ts(
                        "Outcomes / s",
                        (rate("stipple_validator_outcomes_total", "outcome, reason"), "{{outcome}} {{reason}}"),
                        unit="ops",
                        stack=True,
                    ),
                    ts(
                        "Cancelled / s and webhooks / s",
                        (rate("stipple_gateway_tasks_cancelled_total"), "cancelled"),
                        (rate("stipple_gateway_webhooks_total", "result"), "webhook {{result}}"),
                        unit="ops",
                    ),
                    ts(
                        "Queue depth and tasks held",
                        ("sum(stipple_dispatcher_queue_depth)", "queue depth"),
                        ("sum by (state) (stipple_dispatcher_held_tasks)", "{{state}}"),
                    ),
                    ts(
                        "Node results / s",
                        (rate("stipple_node_tasks_total", "result"), "{{result}}"),
                        unit="ops",
                        stack=True,
                    ),
                ],
            ),
            (
                "Stage latency",
                [
                    quantiles("Queue wait (submitted to assigned)", "stipple_dispatcher_queue_wait_seconds"),
                    quantiles("Dispatch decision (picking a task's nodes)", "stipple_dispatcher_decision_seconds"),
                    quantiles("Node: model load", "stipple_node_model_load_seconds"),
                    quantiles("Node: denoise (all images of a task)", "stipple_node_denoise_seconds"),
                    quantiles("Node: upload", "stipple_node_upload_seconds"),
                    quantiles("Node: assignment to commitment", "stipple_node_task_seconds"),
                    quantiles("Validation (reveal opened to decision)", "stipple_validator_validation_seconds"),
                    quantiles("Submitted to decided (validator)", "stipple_validator_task_seconds"),
                    quantiles(
                        "End to end (gateway), by outcome",
                        "stipple_gateway_task_seconds",
                        by="outcome",
                        legend_by="outcome",
                    ),
                    quantiles("Settlement (outcome to receipt)", "stipple_chain_indexer_settlement_seconds"),
                ],
            ),
            (
                "HTTP",
                [
                    ts(
                        "Requests / s by route",
                        (rate("stipple_gateway_requests_total", "route"), "{{route}}"),
                        unit="reqps",
                    ),
                    ts(
                        "p95 latency by route",
                        (quantile(0.95, "stipple_gateway_request_seconds", "route"), "{{route}}"),
                        unit="s",
                    ),
                ],
            ),
            (
                "Consumers",
                [
                    ts("Pending (not yet delivered)", *consumer_lag("pending")),
                    ts("Delivered, not yet acknowledged", *consumer_lag("ack_pending")),
                    ts(
                        "Handle time p95 by service",
                        *[
                            (quantile(0.95, f"stipple_{svc}_handle_seconds", "stream"), f"{svc} {{{{stream}}}}")
                            for svc in (*CONSUMER_SERVICES, "node")
                        ],
                        unit="s",
                    ),
                ],
            ),
        ],
    )


def nodes() -> dict:
    node = 'node_id=~"$node"'
    inst = 'instance=~"$instance"'
    return render(
        "stipple-nodes",
        "Stipple / Nodes",
        "Nodes as the dispatcher sees them (state, QoS, slots) and as they report themselves (GPU, models, store).",
        [
            (
                "Network",
                [
                    ts("Nodes by state", ("sum by (state) (stipple_dispatcher_nodes)", "{{state}}"), stack=True),
                    ts(
                        "Busy nodes, paused nodes",
                        ("sum(stipple_node_busy)", "busy (reported by nodes)"),
                        ("max(stipple_validator_paused_nodes)", "paused (validator)"),
                    ),
                    ts(
                        "QoS by node",
                        (f"max by (node_id) (stipple_dispatcher_node_qos{{{node}}})", "{{node_id}}"),
                        unit="none",
                    ),
                    ts(
                        "Tasks in flight by node",
                        (f"max by (node_id) (stipple_dispatcher_node_inflight_tasks{{{node}}})", "{{node_id}}"),
                    ),
                ],
            ),
            (
                "Joining and trust",
                [
                    ts(
                        "Connections admitted / s (gatekeeper)",
                        (rate("stipple_gatekeeper_admissions_total", "level, reason"), "{{level}} {{reason}}"),
                        (rate("stipple_gatekeeper_refusals_total", "reason"), "refused: {{reason}}"),
                        unit="ops",
                        stack=True,
                    ),
                    ts(
                        "Refused messages / s (the sentinel's strikes)",
                        (rate("stipple_validator_strikes_total", "reason"), "{{reason}}"),
                        unit="ops",
                        stack=True,
                    ),
                    ts(
                        "Bans and closed connections (1 h)",
                        ("sum by (reason) (increase(stipple_validator_bans_total[1h]))", "banned: {{reason}}"),
                        ("sum by (reason) (increase(stipple_gatekeeper_kicks_total[1h]))", "closed: {{reason}}"),
                        unit="none",
                    ),
                    ts(
                        "Uploads / s through the blob intake",
                        (rate("stipple_gatekeeper_uploads_total", "outcome"), "{{outcome}}"),
                        unit="ops",
                        stack=True,
                    ),
                ],
            ),
            (
                "Work",
                [
                    ts(
                        "Results / s by node",
                        (rate("stipple_node_tasks_total", "instance, result", inst), "{{instance}} {{result}}"),
                        unit="ops",
                    ),
                    quantiles("Denoise time", "stipple_node_denoise_seconds", matchers=inst),
                    ts(
                        "Work consumer: pending and unacknowledged",
                        (
                            f"sum by (instance) (stipple_node_consumer_pending_messages{{{inst}}})",
                            "{{instance}} pending",
                        ),
                        (
                            f"sum by (instance) (stipple_node_consumer_ack_pending_messages{{{inst}}})",
                            "{{instance}} unacknowledged",
                        ),
                    ),
                    ts(
                        "Node versions and devices",
                        (
                            f"sum by (version, device) (stipple_node_info{{{inst}}})",
                            "{{version}} on {{device}}",
                        ),
                    ),
                ],
            ),
            (
                "GPU",
                [
                    ts(
                        "GPU memory used",
                        (
                            f"sum by (instance, gpu) (stipple_node_gpu_memory_used_bytes{{{inst}}})",
                            "{{instance}} gpu {{gpu}}",
                        ),
                        unit="bytes",
                    ),
                    ts(
                        "GPU memory used (share)",
                        (
                            f"sum by (instance, gpu) (stipple_node_gpu_memory_used_bytes{{{inst}}})"
                            f" / sum by (instance, gpu) (stipple_node_gpu_memory_total_bytes{{{inst}}})",
                            "{{instance}} gpu {{gpu}}",
                        ),
                        unit="percentunit",
                    ),
                    ts(
                        "GPU utilisation",
                        (
                            f"max by (instance, gpu) (stipple_node_gpu_utilization_ratio{{{inst}}})",
                            "{{instance}} gpu {{gpu}}",
                        ),
                        unit="percentunit",
                    ),
                    ts(
                        "torch CUDA allocator",
                        (
                            f"sum by (instance) (stipple_node_torch_cuda_memory_allocated_bytes{{{inst}}})",
                            "{{instance}} allocated",
                        ),
                        (
                            f"sum by (instance) (stipple_node_torch_cuda_memory_reserved_bytes{{{inst}}})",
                            "{{instance}} reserved",
                        ),
                        unit="bytes",
                    ),
                    ts(
                        "GPUs per node, temperature",
                        (f"sum by (instance) (stipple_node_gpu_devices{{{inst}}})", "{{instance}} GPUs"),
                        (f"max by (instance) (stipple_node_gpu_temperature_celsius{{{inst}}})", "{{instance}} °C"),
                    ),
                ],
            ),
            (
                "Models",
                [
                    ts(
                        "Model loads / s",
                        (rate("stipple_node_model_loads_total", "instance, result", inst), "{{instance}} {{result}}"),
                        unit="ops",
                    ),
                    quantiles("Model load time", "stipple_node_model_load_seconds", matchers=inst),
                    ts(
                        "Pipeline cache hit share",
                        (
                            ratio(
                                rate("stipple_node_pipeline_cache_lookups_total", "instance", f'result="hit",{inst}'),
                                rate("stipple_node_pipeline_cache_lookups_total", "instance", inst),
                            ),
                            "{{instance}}",
                        ),
                        unit="percentunit",
                    ),
                    ts(
                        "Pipelines in memory",
                        (f"max by (instance) (stipple_node_loaded_pipelines{{{inst}}})", "{{instance}}"),
                    ),
                    ts(
                        "Store lookups / s",
                        (rate("stipple_node_store_lookups_total", "source, result", inst), "{{source}} {{result}}"),
                        unit="ops",
                    ),
                    ts(
                        "Store: bytes held, downloaded / s, evictions / s",
                        (f"sum by (instance) (stipple_node_store_used_bytes{{{inst}}})", "{{instance}} held"),
                        (
                            rate("stipple_node_store_downloaded_bytes_total", "instance", inst),
                            "{{instance}} downloaded / s",
                        ),
                        (rate("stipple_node_store_evictions_total", "instance", inst), "{{instance}} evictions / s"),
                        unit="bytes",
                    ),
                ],
            ),
        ],
        variables=[
            variable_query("node", "Node", "stipple_dispatcher_node_qos", "node_id"),
            variable_query("instance", "Node agent", "stipple_node_info", "instance"),
        ],
    )


def validation() -> dict:
    verdicts = "stipple_validator_verdicts_total"
    return render(
        "stipple-validation",
        "Stipple / Validation",
        "Commit-reveal outcomes: per-node verdicts, mismatches and slashes, QoS pauses, the validator's own latency.",
        [
            (
                "Verdicts",
                [
                    ts("Verdicts / s", (rate(verdicts, "verdict"), "{{verdict}}"), unit="ops", stack=True),
                    ts(
                        "Mismatch share of verdicts",
                        (
                            ratio(rate(verdicts, matchers='verdict="mismatch"'), rate(verdicts), none_is_zero=True),
                            "mismatch",
                        ),
                        (
                            ratio(
                                rate(verdicts, matchers='verdict="bad_commitment"'), rate(verdicts), none_is_zero=True
                            ),
                            "bad_commitment",
                        ),
                        (
                            ratio(rate(verdicts, matchers='verdict="timeout"'), rate(verdicts), none_is_zero=True),
                            "timeout",
                        ),
                        unit="percentunit",
                    ),
                    ts(
                        "Outcomes / s by reason",
                        (rate("stipple_validator_outcomes_total", "outcome, reason"), "{{outcome}} {{reason}}"),
                        unit="ops",
                    ),
                    ts(
                        "Slashes (judged, and sent on chain) per hour",
                        ("sum by (verdict) (increase(stipple_validator_slashes_total[1h]))", "judged {{verdict}}"),
                        ("sum by (verdict) (increase(stipple_chain_indexer_slashes_total[1h]))", "slashed {{verdict}}"),
                    ),
                ],
            ),
            (
                "Nodes",
                [
                    ts("Paused nodes (waiting to pass a probe)", ("max(stipple_validator_paused_nodes)", "paused")),
                    ts(
                        "Lowest QoS",
                        ("bottomk(10, max by (node_id) (stipple_dispatcher_node_qos))", "{{node_id}}"),
                        unit="none",
                    ),
                ],
            ),
            (
                "Validator",
                [
                    quantiles("Validation (reveal opened to decision)", "stipple_validator_validation_seconds"),
                    quantiles(
                        "Submitted to decided", "stipple_validator_task_seconds", by="outcome", legend_by="outcome"
                    ),
                    ts(
                        "Consumer lag",
                        ("sum(stipple_validator_consumer_pending_messages)", "pending"),
                        ("sum(stipple_validator_consumer_ack_pending_messages)", "unacknowledged"),
                        ("sum(stipple_validator_consumer_redelivered_messages)", "redelivered"),
                    ),
                    ts(
                        "Messages / s by outcome",
                        (rate("stipple_validator_messages_total", "outcome"), "{{outcome}}"),
                        unit="ops",
                    ),
                ],
            ),
        ],
    )


def chain() -> dict:
    return render(
        "stipple-chain",
        "Stipple / Chain",
        "The chain-indexer: following the chain (lag, reorgs) and settling tasks (escrow, settle, refund, slash).",
        [
            (
                "Following",
                [
                    stat("Lag (blocks)", "max(stipple_chain_indexer_lag_blocks)", unit="none"),
                    stat(
                        "Since the last chain read",
                        "time() - max(stipple_chain_indexer_last_step_timestamp_seconds)",
                        unit="s",
                        thresholds=[(None, "green"), (60, "orange"), (300, "red")],
                    ),
                    stat("Settlement backlog", "sum(stipple_chain_indexer_settlement_backlog)"),
                    stat("Reorgs (24 h)", "sum(increase(stipple_chain_indexer_reorgs_total[24h]))"),
                    ts(
                        "Head and indexed block",
                        ("max(stipple_chain_indexer_head_block)", "head"),
                        ("max(stipple_chain_indexer_indexed_block)", "indexed"),
                        unit="none",
                    ),
                    ts("Lag (blocks)", ("max(stipple_chain_indexer_lag_blocks)", "lag"), unit="none"),
                    ts(
                        "Read errors / s by code",
                        (rate("stipple_chain_indexer_step_errors_total", "code"), "{{code}}"),
                        unit="ops",
                    ),
                    ts(
                        "Events published / s",
                        (rate("stipple_chain_indexer_events_total", "contract, event"), "{{contract}} {{event}}"),
                        unit="ops",
                    ),
                ],
            ),
            (
                "Settlement",
                [
                    ts(
                        "Transactions / s by kind",
                        (rate("stipple_chain_indexer_transactions_total", "kind"), "{{kind}}"),
                        unit="ops",
                    ),
                    ts(
                        "Tasks / s by result",
                        (rate("stipple_chain_indexer_settled_tasks_total", "result"), "{{result}}"),
                        unit="ops",
                    ),
                    ts("Backlog", ("sum(stipple_chain_indexer_settlement_backlog)", "held task events")),
                    quantiles("Settlement latency (outcome to receipt)", "stipple_chain_indexer_settlement_seconds"),
                    ts(
                        "Slashes per hour, tokens slashed per hour",
                        ("sum by (verdict) (increase(stipple_chain_indexer_slashes_total[1h]))", "{{verdict}}"),
                        ("sum(increase(stipple_chain_indexer_slashed_tokens_total[1h]))", "tokens"),
                    ),
                    ts(
                        "Settler consumer lag",
                        ("sum(stipple_chain_indexer_consumer_pending_messages)", "pending"),
                        (
                            "sum(stipple_chain_indexer_consumer_ack_pending_messages)",
                            "unacknowledged (held for a batch)",
                        ),
                    ),
                ],
            ),
        ],
    )


DASHBOARDS = {"overview": overview, "tasks": tasks, "nodes": nodes, "validation": validation, "chain": chain}


def generate() -> dict[str, str]:
    """File name -> its JSON text."""
    return {
        f"{name}.json": json.dumps(make(), indent=2, ensure_ascii=False) + "\n" for name, make in DASHBOARDS.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    stale = []
    for name, text in generate().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run deploy/tools/dashboards.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
