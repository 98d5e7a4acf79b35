"""deploy/k8s: the overlays render and pass `just k8s-check`; the checker fails on what it
must (an unknown field in a Deployment's container, an unknown nested field in a
PodMonitor, a missing required field, a kind without a schema); the rendered objects
keep the deployment's invariants; the NATS authorization files are what
stipple_common.permissions renders, and a real nats-server accepts them."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
import nats.errors
import pytest

from stipple_common.natsserver import NatsServer, nats_server_binary

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "deploy" / "tools"
K8S = ROOT / "deploy" / "k8s"
SERVICES = ("gateway", "dispatcher", "validator", "chain-indexer")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


render_nats = _load("render_nats")
k8s_check = _load("k8s_check")


# --- NATS authorization -------------------------------------------------------------


@pytest.mark.parametrize("overlay", k8s_check.NATS_OVERLAYS)
def test_committed_nats_auth_is_the_generators_output(overlay: str) -> None:
    folder = K8S / overlay
    nodes = render_nats.read_nodes(folder / render_nats.NODES_FILE)
    assert nodes, "an overlay lists at least one node"
    assert (folder / render_nats.AUTH_FILE).read_text() == render_nats.render(nodes)
    assert render_nats.main(["--check", str(folder)]) == 0


def test_generator_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / render_nats.NODES_FILE).write_text("gpu-a\n")
    assert render_nats.main([str(tmp_path)]) == 0
    (tmp_path / render_nats.NODES_FILE).write_text("gpu-a\ngpu-b\n")
    assert render_nats.main(["--check", str(tmp_path)]) == 1


def test_node_permissions_come_from_stipple_common() -> None:
    from stipple_common.permissions import SERVICE_PERMISSIONS, node_permissions

    text = render_nats.render(["gpu-a"])
    assert '"password": $NATS_NODE_GPU_A_PASSWORD' in text
    assert '"password": $NATS_CHAIN_INDEXER_PASSWORD' in text
    for subject in node_permissions("gpu-a")["publish"]["allow"] + node_permissions("gpu-a")["subscribe"]["allow"]:
        assert f'"{subject}"' in text
    assert SERVICE_PERMISSIONS["subscribe"]["allow"] == [">"]
    # a node may not subscribe to the task events
    assert '"tasks.>"' not in text


def _tls_conf(overlay: str, pki: Any) -> str:
    """The overlay's tls.conf, with the Secret's mount replaced by the test PKI's files."""
    own = K8S / overlay / "nats-tls.conf"
    if not own.exists():
        return (K8S / "base/nats/tls.conf").read_text()
    text = own.read_text()
    assert "/etc/nats-tls/tls.crt" in text
    return text.replace("/etc/nats-tls/tls.crt", str(pki.cert)).replace("/etc/nats-tls/tls.key", str(pki.key))


def _server_config(tmp_path: Path, overlay: str, pki: Any) -> Path:
    (tmp_path / "nats.conf").write_text((K8S / "base/nats/nats.conf").read_text())
    (tmp_path / "auth.conf").write_text((K8S / overlay / render_nats.AUTH_FILE).read_text())
    (tmp_path / "tls.conf").write_text(_tls_conf(overlay, pki))
    return tmp_path / "nats.conf"


def _password_env(overlay: str) -> dict[str, str]:
    nodes = render_nats.read_nodes(K8S / overlay / render_nats.NODES_FILE)
    return {var: f"pw-{i}" for i, var in enumerate(render_nats.env_vars(nodes))}


@pytest.mark.parametrize("overlay", k8s_check.NATS_OVERLAYS)
def test_nats_server_accepts_the_rendered_config(tmp_path: Path, overlay: str, pki: Any) -> None:
    config = _server_config(tmp_path, overlay, pki)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env = {**base_env, "POD_NAME": "nats-0", **_password_env(overlay)}
    ok = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "is valid" in ok.stdout + ok.stderr
    # The passwords really are variable references: without them the server refuses.
    env.pop("NATS_GATEWAY_PASSWORD")
    bad = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "NATS_GATEWAY_PASSWORD" in bad.stderr


@pytest.mark.integration
async def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in _password_env("overlays/production").items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("NATS_GATEWAY_PASSWORD", "s3cret-from-env")
    auth = (K8S / "overlays/production" / render_nats.AUTH_FILE).read_text()
    with NatsServer.start(tmp_path, config=auth) as server:
        nc = await nats.connect(f"nats://gateway:s3cret-from-env@{server.host}:{server.port}", connect_timeout=2)
        await nc.close()
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(
                f"nats://gateway:$NATS_GATEWAY_PASSWORD@{server.host}:{server.port}",
                connect_timeout=2,
                max_reconnect_attempts=0,
                allow_reconnect=False,
            )


@pytest.mark.integration
async def test_production_nats_takes_only_tls_and_the_services_verify_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki: Any
) -> None:
    """The production overlay's tls.conf and users on a real nats-server: a service with
    its Deployment's URL (nats://, upgraded) and STIPPLE_NATS_CA_FILE gets in; without the
    CA it is refused at once; a client that will not do TLS is refused too."""
    from stipple_common import bus

    for var, value in _password_env("overlays/production").items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("NATS_GATEWAY_PASSWORD", "gw-pass")
    auth = (K8S / "overlays/production" / render_nats.AUTH_FILE).read_text()
    with NatsServer.start(tmp_path, config=_tls_conf("overlays/production", pki) + "\n" + auth) as server:
        url = f"nats://gateway:gw-pass@127.0.0.1:{server.port}"
        nc = await bus.connect(url, "gateway", ca_file=str(pki.ca))
        await nc.flush(timeout=2)
        await nc.close()
        with pytest.raises(bus.NatsTlsError, match="STIPPLE_NATS_CA_FILE"):
            await asyncio.wait_for(bus.connect(url, "gateway"), 10)
        # a client that speaks plain NATS: told TLS is required, and never answered
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        info = json.loads((await asyncio.wait_for(reader.readline(), 5)).decode().removeprefix("INFO "))
        assert info["tls_required"] is True
        writer.write(b'CONNECT {"user":"gateway","pass":"gw-pass"}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 5)
        assert b"PONG" not in answer
        writer.close()


# --- rendered overlays ----------------------------------------------------------------


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    return {target: k8s_check.render(K8S / target) for target in k8s_check.TARGETS}


def _get(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert found, f"no {kind}/{name}"
    return found[0]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


@pytest.mark.slow
def test_k8s_check_passes_on_the_real_overlays(capsys: pytest.CaptureFixture[str]) -> None:
    code = k8s_check.main([])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "k8s-check: ok" in out.err


@pytest.mark.slow
def test_checker_finds_nothing_in_the_renders(renders: dict[str, list[dict[str, Any]]]) -> None:
    assert [f.line() for f in k8s_check.check_renders(renders)] == []


@pytest.mark.slow
def test_unknown_field_in_a_deployment_container_fails(renders: dict[str, list[dict[str, Any]]]) -> None:
    gateway = copy.deepcopy(_get(renders["overlays/production"], "Deployment", "gateway"))
    _containers(gateway)[0]["imagePullPolicyy"] = "Always"
    failures = k8s_check.check_objects("overlays/production", [gateway])
    assert any(
        f.kind == "Deployment"
        and f.name == "gateway"
        and f.path == "spec.template.spec.containers[0]"
        and "imagePullPolicyy" in f.message
        for f in failures
    ), failures
    line = next(f.line() for f in failures if "imagePullPolicyy" in f.message)
    assert line.startswith("overlays/production: Deployment/gateway: spec.template.spec.containers[0]: ")


@pytest.mark.slow
def test_unknown_nested_field_in_a_podmonitor_fails(renders: dict[str, list[dict[str, Any]]]) -> None:
    monitor = copy.deepcopy(_get(renders["overlays/dev"], "PodMonitor", "dispatcher"))
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"] = [{"action": "keep", "sourceLabel": ["x"]}]
    failures = k8s_check.check_objects("overlays/dev", [monitor])
    assert [(f.kind, f.name, f.path) for f in failures] == [
        ("PodMonitor", "dispatcher", "spec.podMetricsEndpoints[0].relabelings[0].sourceLabel")
    ], failures
    assert "sourceLabel" in failures[0].message


@pytest.mark.slow
def test_missing_required_fields_fail(renders: dict[str, list[dict[str, Any]]]) -> None:
    deployment = copy.deepcopy(_get(renders["overlays/production"], "Deployment", "validator"))
    del deployment["spec"]["selector"]
    monitor = copy.deepcopy(_get(renders["overlays/production"], "PodMonitor", "validator"))
    del monitor["spec"]["selector"]
    failures = k8s_check.check_objects("overlays/production", [deployment, monitor])
    assert any(f.kind == "Deployment" and "'selector' is a required property" in f.message for f in failures)
    assert any(f.kind == "PodMonitor" and f.path.startswith("spec") and "selector" in f.message for f in failures)


def test_kind_without_a_schema_fails() -> None:
    objects = [
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}},
    ]
    failures = k8s_check.check_objects("t", objects)
    assert [(f.kind, f.path) for f in failures] == [("Widget", "kind"), ("Widget", "kind")], failures


@pytest.mark.slow
def test_rules_catch_a_scrape_the_network_policies_or_the_ports_would_drop(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    assert k8s_check.rule_failures("overlays/production", renders["overlays/production"]) == []
    objects = copy.deepcopy(renders["overlays/production"])
    objects = [
        o for o in objects if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "prometheus-scrape")
    ]
    _get(objects, "PodMonitor", "minio")["spec"]["podMetricsEndpoints"][0]["port"] = "console-metrics"
    _get(objects, "PodMonitor", "nats")["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "natz"}
    failures = {(f.kind, f.name, f.message) for f in k8s_check.rule_failures("overlays/production", objects)}
    for service in SERVICES:
        blocked = f"no NetworkPolicy lets the monitoring namespace reach {service} on 9090"
        assert ("PodMonitor", service, blocked) in failures
    assert ("PodMonitor", "minio", "StatefulSet/minio has no such port") in failures
    assert ("PodMonitor", "nats", "selects no workload's pods") in failures
    assert ("StatefulSet", "nats", "a metrics port no PodMonitor scrapes") in failures


@pytest.mark.slow
def test_nats_servers_and_minio_are_scraped_too(renders: dict[str, list[dict[str, Any]]]) -> None:
    objects = renders["overlays/production"]
    nats_set = _get(objects, "StatefulSet", "nats")
    server, exporter = _containers(nats_set)
    assert server["name"] == "nats"
    assert {"name": "monitor", "containerPort": 8222} in server["ports"]
    assert exporter["image"].startswith("natsio/prometheus-nats-exporter:")
    assert exporter["args"][-1] == "http://localhost:8222"  # the server's monitor port, in the same pod
    assert {"-jsz=all", "-varz", "-routez"} <= set(exporter["args"])
    assert {"name": "metrics", "containerPort": 7777} in exporter["ports"]
    assert "http: 0.0.0.0:8222" in _get(objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
    monitor = _get(objects, "PodMonitor", "nats")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

    minio = _containers(_get(objects, "StatefulSet", "minio"))[0]
    env = {e["name"]: e.get("value") for e in minio["env"]}
    assert env["MINIO_PROMETHEUS_AUTH_TYPE"] == "public"
    endpoint = _get(objects, "PodMonitor", "minio")["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("s3", "/minio/v2/metrics/cluster")


@pytest.mark.slow
def test_production_ingress_fits_the_gateways_limits(renders: dict[str, list[dict[str, Any]]]) -> None:
    from stipple_gateway.app import GatewaySettings

    objects = renders["overlays/production"]
    ingress = _get(objects, "Ingress", "gateway")
    (rule,) = ingress["spec"]["rules"]
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == backend["name"])
    assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]
    notes = ingress["metadata"]["annotations"]
    settings = GatewaySettings()
    body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m")  # nginx's m: MiB
    assert int(body[:-1]) * 2**20 >= settings.max_body_bytes
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > settings.sync_timeout_s
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # the events stream
    policy = _get(objects, "NetworkPolicy", "gateway-ingress")["spec"]["ingress"][0]
    assert policy["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}


@pytest.mark.slow
def test_rules_catch_a_missing_probe_resources_and_podmonitor(renders: dict[str, list[dict[str, Any]]]) -> None:
    objects = copy.deepcopy(renders["overlays/dev"])
    dispatcher = _get(objects, "Deployment", "dispatcher")
    del _containers(dispatcher)[0]["readinessProbe"]
    del _containers(dispatcher)[0]["resources"]["requests"]
    objects = [o for o in objects if not (o["kind"] == "PodMonitor" and o["metadata"]["name"] == "validator")]
    paths = {(f.name, f.path) for f in k8s_check.rule_failures("overlays/dev", objects)}
    assert ("dispatcher", "spec.template.spec.containers[0].readinessProbe") in paths
    assert ("dispatcher", "spec.template.spec.containers[0].resources.requests.cpu") in paths
    assert ("validator", "metadata.labels") in paths


@pytest.mark.slow
def test_cli_prints_one_line_per_failure_and_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - bad.yaml\n")
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  selector:\n"
        "    matchLabels: {app: bad}\n  template:\n    metadata:\n      labels: {app: bad}\n"
        "    spec:\n      containers:\n        - name: c\n          image: busybox:1\n          bogus: 1\n"
    )
    assert k8s_check.main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"{tmp_path}: Deployment/bad: spec.template.spec.containers[0]: " in lines[0]
    assert "bogus" in lines[0]


# --- invariants -------------------------------------------------------------------------

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


@pytest.mark.slow
@pytest.mark.parametrize("target", k8s_check.TARGETS)
def test_every_container_has_requests_limits_and_probes(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    workloads = [o for o in renders[target] if o["kind"] in WORKLOADS]
    assert workloads
    for obj in workloads:
        for c in _containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert obj["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, where
            if obj["kind"] != "Job":
                assert "livenessProbe" in c, where
                assert "readinessProbe" in c, where


@pytest.mark.slow
@pytest.mark.parametrize("target", ["overlays/dev", "overlays/production"])
def test_every_service_has_a_metrics_port_probes_and_a_podmonitor(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    objects = renders[target]
    for service in SERVICES:
        deployment = _get(objects, "Deployment", service)
        container = _containers(deployment)[0]
        assert "metrics" in [p["name"] for p in container["ports"]]
        # liveness on the metrics port (the process answers); readiness includes NATS
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        ready = {"path": "/healthz", "port": "http"} if service == "gateway" else {"path": "/readyz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == ready
        assert container["image"].startswith(f"ghcr.io/stipple/{service}:")
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["STIPPLE_NATS_URL"] == f"nats://{service}:$(NATS_PASSWORD)@nats:4222"
        monitor = _get(objects, "PodMonitor", service)
        assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": service}
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
        config = _get(objects, "ConfigMap", "stipple-config")["data"]
        assert config["STIPPLE_METRICS_HOST"] == "0.0.0.0"
        assert container["ports"][-1]["containerPort"] == int(config["STIPPLE_METRICS_PORT"])


@pytest.mark.slow
def test_production_runs_r3_streams_on_three_nats_servers(renders: dict[str, list[dict[str, Any]]]) -> None:
    objects = renders["overlays/production"]
    assert _get(objects, "ConfigMap", "stipple-config")["data"]["STIPPLE_STREAM_REPLICAS"] == "3"
    nats_set = _get(objects, "StatefulSet", "nats")
    assert nats_set["spec"]["replicas"] == 3
    assert _containers(nats_set)[0]["image"] == "nats:2.11-alpine"
    assert nats_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    config = _get(objects, "ConfigMap", "nats-config")["data"]
    for n in range(3):
        assert f"nats://nats-{n}.nats-headless:6222" in config["nats.conf"]
    assert config["auth.conf"] == (K8S / "overlays/production" / render_nats.AUTH_FILE).read_text()
    assert {
        s["spec"].get("clusterIP") for s in objects if s["kind"] == "Service" and "nats" in s["metadata"]["name"]
    } == {
        None,
        "None",
    }


@pytest.mark.slow
def test_production_services_trust_the_ca_of_the_nats_certificate(renders: dict[str, list[dict[str, Any]]]) -> None:
    objects = renders["overlays/production"]
    ca_file = Path(_get(objects, "ConfigMap", "stipple-config")["data"]["STIPPLE_NATS_CA_FILE"])
    for service in SERVICES:
        pod = _get(objects, "Deployment", service)["spec"]["template"]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(ca_file.parent))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "stipple-nats-tls", service
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca_file.name}], service
    nats_config = _get(objects, "ConfigMap", "nats-config")["data"]
    assert "include ./tls.conf" in nats_config["nats.conf"]
    assert nats_config["tls.conf"] == (K8S / "overlays/production/nats-tls.conf").read_text()
    server = _get(objects, "StatefulSet", "nats")["spec"]["template"]["spec"]
    mount = next(m for m in server["containers"][0]["volumeMounts"] if m["name"] == "tls")
    assert f"cert_file: {mount['mountPath']}/tls.crt" in nats_config["tls.conf"]
    assert next(v for v in server["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "stipple-nats-tls"
    dev = renders["overlays/dev"]  # dev: no TLS, no CA
    assert "tls {" not in _get(dev, "ConfigMap", "nats-config")["data"]["tls.conf"]
    assert "STIPPLE_NATS_CA_FILE" not in _get(dev, "ConfigMap", "stipple-config")["data"]


@pytest.mark.slow
def test_production_commits_no_secret_and_dev_secrets_are_marked(renders: dict[str, list[dict[str, Any]]]) -> None:
    assert [o for o in renders["overlays/production"] if o["kind"] == "Secret"] == []
    import base64

    dev_secrets = [o for o in renders["overlays/dev"] if o["kind"] == "Secret"]
    assert dev_secrets
    for secret in dev_secrets:
        for key, value in secret["data"].items():
            text = base64.b64decode(value).decode()
            assert text == "" or "dev-only" in text or key.endswith("ACCESS_KEY") or key == "MINIO_ROOT_USER", key


@pytest.mark.slow
def test_node_agent_gets_a_gpu_its_own_credentials_and_a_model_cache(renders: dict[str, list[dict[str, Any]]]) -> None:
    objects = renders["node/example"]
    agent = _get(objects, "Deployment", "node-agent")
    pod = agent["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert agent["spec"]["replicas"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["STIPPLE_NATS_URL"]["value"] == "nats://$(STIPPLE_NODE_ID):$(NATS_PASSWORD)@$(NATS_ADDRESS)"
    assert env["STIPPLE_NATS_INBOX_PREFIX"]["value"] == "_INBOX_$(STIPPLE_NODE_ID)"
    assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "stipple-node", "key": "nats-password"}
    key_volume = next(v for v in pod["volumes"] if v["name"] == "key")
    assert key_volume["secret"]["secretName"] == "stipple-node"
    assert env["STIPPLE_KEY_FILE"]["value"] == "/var/run/stipple/key/node.key"
    cache = next(v for v in pod["volumes"] if v["name"] == "models")
    assert _get(objects, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    config = _get(objects, "ConfigMap", "node-config")["data"]
    assert config["STIPPLE_DECLARE_STREAMS"] == "false"
    assert config["STIPPLE_NODE_ID"] in render_nats.read_nodes(K8S / "overlays/production" / render_nats.NODES_FILE)
    assert _get(objects, "PodMonitor", "node-agent")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.mark.slow
def test_the_cpu_dev_nodes_join_the_dev_network_with_its_credentials(renders: dict[str, list[dict[str, Any]]]) -> None:
    import base64

    dev = renders["overlays/dev"]
    namespace_of = {o["metadata"]["name"]: o["metadata"]["namespace"] for o in dev if o["kind"] == "Service"}

    def secret(objs: list[dict[str, Any]], name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in _get(objs, "Secret", name)["data"].items()}

    by_namespace: dict[str, list[dict[str, Any]]] = {}
    for o in renders["node/dev-cpu"]:
        by_namespace.setdefault(o["metadata"].get("namespace") or o["metadata"]["name"], []).append(o)
    nodes = []
    for namespace, objects in sorted(by_namespace.items()):
        assert _get(objects, "Namespace", namespace)["metadata"]["labels"]["stipple.io/nodes"] == "true"
        pod = _get(objects, "Deployment", "node-agent")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert "nodeSelector" not in pod
        assert "tolerations" not in pod
        assert not any("nvidia.com/gpu" in part for part in container["resources"].values())
        config = _get(objects, "ConfigMap", "node-config")["data"]
        assert config["STIPPLE_DEVICE"] == "cpu"
        assert config["NATS_ADDRESS"] == f"nats.{namespace_of['nats']}.svc:4222"
        assert config["STIPPLE_S3_ENDPOINT"] == f"minio.{namespace_of['minio']}.svc:9000"
        node = config["STIPPLE_NODE_ID"]
        nodes.append(node)
        mine = secret(objects, "stipple-node")
        assert set(mine) == {"nats-password", "s3-secret-key"}  # no chain-key: made at first start
        assert mine["nats-password"] == secret(dev, "stipple-nats-users")[render_nats.password_var("node", node)]
        assert mine["s3-secret-key"] == secret(dev, "stipple-s3-nodes")[node]
        assert all("dev-only" in v for v in mine.values())
        assert "STIPPLE_KEY_FILE" not in {e["name"] for e in container["env"]}
        assert {v["name"] for v in pod["volumes"]} == {"models", "tmp"}
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs == {_get(objects, "Secret", "stipple-node")["metadata"]["name"]}
    # every node the dev network admits, each once: a task runs on three
    assert sorted(nodes) == render_nats.read_nodes(K8S / "overlays/dev" / render_nats.NODES_FILE)


@pytest.mark.slow
def test_network_policies_open_exactly_the_needed_ports(renders: dict[str, list[dict[str, Any]]]) -> None:
    policies = {
        o["metadata"]["name"]: o["spec"] for o in renders["overlays/production"] if o["kind"] == "NetworkPolicy"
    }
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    def ingress_ports(name: str) -> set[int]:
        return {p["port"] for rule in policies[name].get("ingress", []) for p in rule["ports"]}

    assert ingress_ports("nats-clients") == {4222}
    assert ingress_ports("nats-routes") == {6222}
    assert ingress_ports("minio-clients") == {9000}
    assert ingress_ports("gateway-ingress") == {8080}
    assert ingress_ports("prometheus-scrape") == {9090}
    assert ingress_ports("prometheus-scrape-nats") == {7777}
    assert ingress_ports("prometheus-scrape-minio") == {9000}
    selectors = [f.get("namespaceSelector") for f in policies["nats-clients"]["ingress"][0]["from"]]
    assert {"matchLabels": {"stipple.io/nodes": "true"}} in selectors
    node_policies = [o for o in renders["node/example"] if o["kind"] == "NetworkPolicy"]
    egress = {p["port"] for o in node_policies for rule in o["spec"].get("egress", []) for p in rule["ports"]}
    assert {4222, 9000} <= egress


def test_minio_node_policy_writes_only_under_the_nodes_own_id() -> None:
    import json

    services = json.loads((K8S / "base/minio/policies/services.json").read_text())
    nodes = json.loads((K8S / "base/minio/policies/nodes.json").read_text())
    assert services["Statement"][0]["Resource"] == ["arn:aws:s3:::stipple-images", "arn:aws:s3:::stipple-images/*"]
    actions = {a for s in nodes["Statement"] for a in s["Action"]}
    assert not any("Get" in a and a != "s3:GetBucketLocation" for a in actions), actions
    assert "s3:DeleteObject" not in actions
    put = next(s for s in nodes["Statement"] if "s3:PutObject" in s["Action"])
    assert put["Resource"] == ["arn:aws:s3:::stipple-images/tasks/*/${aws:username}/*"]
