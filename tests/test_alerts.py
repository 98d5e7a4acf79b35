"""The alert rules (deploy/k8s/base/monitoring/prometheus-rules.yaml, a PrometheusRule):
`promtool check rules` accepts them, `promtool test rules` proves each alert fires on its
input and stays quiet otherwise (tests/alerts/rules.test.yaml), every alert expression
names only exported metrics, and every alert has a severity, a `for`, its annotations and
a runbook section in docs/metrics.md.

Without promtool the promtool tests fail (never skip): `./dev` installs Debian's
prometheus package, which brings it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "k8s" / "base" / "monitoring" / "prometheus-rules.yaml"
UNIT_TESTS = ROOT / "tests" / "alerts" / "rules.test.yaml"
SEVERITIES = {"critical", "warning", "info"}


def tool(name: str) -> ModuleType:
    """A module of deploy/tools (the checker tests/test_dashboards.py uses too)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "tools" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


promql = tool("promql_names")


DEBIAN_PROMTOOL = Path("/usr/bin/promtool")


def promtool() -> str:
    found = shutil.which("promtool") or (str(DEBIAN_PROMTOOL) if DEBIAN_PROMTOOL.is_file() else None)
    if found is None:  # never a skip: an unchecked rule file is not a passing one
        pytest.fail("promtool is not installed (./dev installs Debian's prometheus package, which has it)")
    return found


def rule_object() -> dict:
    docs = [d for d in yaml.safe_load_all(RULES.read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def alerts() -> list[dict]:
    return [rule for group in rule_object()["spec"]["groups"] for rule in group["rules"] if "alert" in rule]


def write_rules(directory: Path, groups: list[dict] | None = None) -> Path:
    """The PrometheusRule's groups as a plain rules file (what the operator hands Prometheus)."""
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups or rule_object()["spec"]["groups"]}, sort_keys=False))
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_missing_promtool_fails_the_tests(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "DEBIAN_PROMTOOL", tmp_path / "promtool")
    for ci in ("1", ""):  # under CI or not: the rules are checked, or the run is red
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="promtool is not installed"):
            promtool()


def test_it_is_a_prometheus_rule():
    rule = rule_object()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"]


def test_promtool_check_rules(tmp_path):
    result = run("check", "rules", str(write_rules(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_check_rules_refuses_a_broken_rule(tmp_path):
    """The check can fail: a rule with a PromQL syntax error is refused."""
    groups = rule_object()["spec"]["groups"]
    groups[0]["rules"][0]["expr"] = "sum(rate(stipple_dispatcher_nodes[5m]"
    result = run("check", "rules", str(write_rules(tmp_path, groups)), cwd=tmp_path)
    assert result.returncode != 0


def test_promtool_unit_tests_pass(tmp_path):
    write_rules(tmp_path)
    shutil.copy(UNIT_TESTS, tmp_path / "rules.test.yaml")
    result = run("test", "rules", "rules.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fail_when_an_alert_cannot_fire(tmp_path):
    """Raise every threshold out of reach: the cases expecting alerts must fail."""
    groups = rule_object()["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = f"({rule['expr']}) and vector(0) > 1"
    write_rules(tmp_path, groups)
    shutil.copy(UNIT_TESTS, tmp_path / "rules.test.yaml")
    result = run("test", "rules", "rules.test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    failed = set(re.findall(r"alertname: (\w+)", result.stdout + result.stderr))
    assert failed == {a["alert"] for a in alerts()}


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    firing, quiet = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert firing == names
    assert quiet == names


def test_every_alert_names_only_exported_metrics():
    exported = tool("exported_metrics").series_names()
    exprs = [a["expr"] for a in alerts()]
    assert promql.unknown_metrics(exprs, exported) == {}
    assert all(promql.metric_names(e) for e in exprs)
    # and the check bites
    assert promql.unknown_metrics(["stipple_dispatcher_nodez > 0"], exported) == {
        "stipple_dispatcher_nodez > 0": {"stipple_dispatcher_nodez"}
    }


def test_every_alert_is_documented_and_complete():
    runbook = (ROOT / "docs" / "metrics.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^### (.+)$", runbook, re.M)}
    required = {"no live nodes": "StippleNoLiveNodes", "queue": "StippleQueueGrowing"}
    required |= {"mismatch": "StippleValidationMismatchRateHigh", "indexer": "StippleChainIndexerStalled"}
    names = {a["alert"] for a in alerts()}
    assert set(required.values()) <= names
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Stipple[A-Z][A-Za-z]+", name)
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), f"{name}: no `for`"
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert annotations["runbook"] == f"docs/metrics.md#{name.lower()}", name
        assert name.lower() in headings, f"{name}: no runbook section in docs/metrics.md"
