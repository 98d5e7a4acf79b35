"""deploy/k8s: the overlays render and pass `just k8s-check`; the checker fails on what it
must (an unknown field in a Deployment's container, an unknown nested field in a
PodMonitor, a missing required field, a kind without a schema, a secret in plain sight, a
credential given to a node); the rendered objects keep the deployment's invariants; the
NATS accounts file is what stipple_common.permissions renders, a real nats-server (the
release the StatefulSet runs) loads it, and with the dev overlay's Secrets the gatekeeper's
Deployment settings admit a node that has nothing but its key."""

from __future__ import annotations

import asyncio
import base64
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
import nats.errors
import pytest

from stipple_common import permissions
from stipple_common.natsserver import NatsServer, nats_server_binary

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "deploy" / "tools"
K8S = ROOT / "deploy" / "k8s"
SERVICES = permissions.SERVICES
NATS_OVERLAYS = ("overlays/dev", "overlays/production")
# nkeys (not marked dev-only: they are keys) in the dev overlay's Secrets
NKEY_VARS = {
    "NATS_CALLOUT_ISSUER": "A",
    "NATS_CALLOUT_USER": "U",
    "STIPPLE_ISSUER_SEED": "SA",
    "STIPPLE_CALLOUT_SEED": "SU",
}


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


# --- NATS accounts ------------------------------------------------------------------


def test_committed_nats_auth_is_the_generators_output() -> None:
    assert render_nats.AUTH_FILE == K8S / "base/nats/auth.conf"
    assert render_nats.AUTH_FILE.read_text() == render_nats.render()
    assert render_nats.main(["--check"]) == 0
    assert k8s_check.nats_auth_failures() == []
    assert not list(K8S.rglob("nats-nodes.txt")), "no list of nodes: joining is permissionless"


def test_generator_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    target = tmp_path / "auth.conf"
    assert render_nats.main(["--check", "--output", str(target)]) == 1  # missing
    assert render_nats.main(["--output", str(target)]) == 0
    assert render_nats.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text().replace("gatekeeper", "gatekeeper2"))
    assert render_nats.main(["--check", "--output", str(target)]) == 1


def test_accounts_come_from_stipple_common(capsys: pytest.CaptureFixture[str]) -> None:
    from stipple_common.permissions import SERVICE_PERMISSIONS, CalloutKeys, render_accounts, service_user

    text = render_nats.render()
    # exactly render_accounts' output, with every `$VAR` unquoted (nats-server reads a
    # quoted "$VAR" as the literal string)
    users = [service_user(s, "$" + render_nats.password_var(s)) for s in SERVICES]
    callout = CalloutKeys("$NATS_CALLOUT_ISSUER", "$NATS_CALLOUT_USER")
    rendered = render_accounts(users, callout, system_password="$NATS_SYS_PASSWORD", raw_passwords=True)
    assert text == render_nats.HEADER + re.sub(r'"\$([A-Z0-9_]+)"', r"$\1", rendered)
    assert '"$' not in text
    rights = json.dumps(SERVICE_PERMISSIONS)
    for service in SERVICES:
        user = f'"user": "{service}", "password": ${render_nats.password_var(service)}, "permissions": {rights}'
        assert user in text, service
    assert "NATS_CHAIN_INDEXER_PASSWORD" in text
    assert "issuer: $NATS_CALLOUT_ISSUER" in text
    assert "users: [ { nkey: $NATS_CALLOUT_USER } ]" in text
    assert "auth_users: [$NATS_CALLOUT_USER, " in text  # the gatekeeper's own login skips the callout
    assert 'user: "sys", password: $NATS_SYS_PASSWORD' in text
    assert re.search(r"APP \{\n    jetstream: enabled", text)
    assert "system_account: SYS" in text  # a cluster needs one
    assert "node" not in text.split("accounts {", 1)[1]  # no node user: the callout admits nodes
    assert render_nats.main(["--print-vars"]) == 0
    assert capsys.readouterr().out.split() == render_nats.env_vars()
    assert set(render_nats.env_vars()) == set(re.findall(r"\$(NATS_[A-Z0-9_]+)", text))


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
    (tmp_path / "auth.conf").write_text(render_nats.AUTH_FILE.read_text())
    (tmp_path / "tls.conf").write_text(_tls_conf(overlay, pki))
    return tmp_path / "nats.conf"


def _nats_env() -> dict[str, str]:
    """Values for every variable auth.conf reads, as the stipple-nats-users Secret gives them
    (the public keys of a new pair of gatekeeper keys)."""
    from stipple_gatekeeper.jwt import new_keys

    keys = new_keys()
    env = {var: f"pw-{i}" for i, var in enumerate(render_nats.env_vars())}
    env["NATS_CALLOUT_ISSUER"] = keys["ISSUER_PUBLIC"]
    env["NATS_CALLOUT_USER"] = keys["CALLOUT_PUBLIC"]
    return env


def test_the_statefulset_runs_the_nats_release_the_tests_run() -> None:
    import yaml

    docs = yaml.safe_load_all((K8S / "base/nats/nats.yaml").read_text())
    nats_set = next(d for d in docs if d["kind"] == "StatefulSet")
    image = nats_set["spec"]["template"]["spec"]["containers"][0]["image"]
    version = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    major_minor = re.search(r"v(\d+\.\d+)\.", version)
    assert major_minor, version
    assert image == f"nats:{major_minor.group(1)}-alpine", (image, version)


@pytest.mark.parametrize("overlay", NATS_OVERLAYS)
def test_nats_server_accepts_the_rendered_config(tmp_path: Path, overlay: str, pki: Any) -> None:
    config = _server_config(tmp_path, overlay, pki)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env = {**base_env, "POD_NAME": "nats-0", **_nats_env()}
    ok = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "is valid" in ok.stdout + ok.stderr
    # The passwords and keys really are variable references: without one the server refuses.
    for var in ("NATS_GATEWAY_PASSWORD", "NATS_CALLOUT_USER", "NATS_CALLOUT_ISSUER"):
        bad = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(config)],
            env={k: v for k, v in env.items() if k != var},
            capture_output=True,
            text=True,
        )
        assert bad.returncode != 0, var
        assert var in bad.stderr


@pytest.mark.integration
async def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in _nats_env().items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("NATS_GATEWAY_PASSWORD", "s3cret-from-env")
    with NatsServer.start(tmp_path, config=render_nats.AUTH_FILE.read_text()) as server:
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
    """The production overlay's tls.conf and the accounts on a real nats-server: a service
    with its Deployment's URL (nats://, upgraded) and STIPPLE_NATS_CA_FILE gets in; without
    the CA it is refused at once; a client that will not do TLS is refused too."""
    from stipple_common import bus

    for var, value in _nats_env().items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("NATS_GATEWAY_PASSWORD", "gw-pass")
    auth = render_nats.AUTH_FILE.read_text()
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


def _unhashed(ref: dict[str, str]) -> dict[str, str]:
    """A secretKeyRef / secretRef as written in the base (kustomize appends a hash to the
    names of the Secrets an overlay generates)."""
    return {**ref, "name": re.sub(r"-[a-z0-9]{10}$", "", ref["name"])}


def _secret(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in _get(objects, "Secret", name)["data"].items()}


def _container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """A container's variables as the kubelet sets them: literal values and secretKeyRefs
    (from the Secrets in `objects`), then `$(VAR)` references resolved; envFrom left out."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = _secret(objects, ref["name"])[ref["key"]]
    return env


@pytest.mark.slow
@pytest.mark.integration
async def test_the_dev_secrets_load_in_nats_and_the_gatekeeper_admits_a_bare_key(
    renders: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the dev overlay runs, on a real nats-server: the NATS pods' variables from
    stipple-nats-users, the gatekeeper with its Deployment's STIPPLE_* settings (Secrets
    resolved, `nats:4222` pointed at the test server). Every service logs in with its
    password; the gatekeeper's three connections (APP, AUTH with the callout seed, SYS)
    come up, it declares the streams (JetStream in APP); a client with nothing but a new
    key is admitted as a node; a client with nothing at all is refused."""
    from eth_account import Account

    from stipple_common import subjects
    from stipple_common.identity import node_id_of
    from stipple_common.messages import join_status_decoder
    from stipple_common.service import nats_identity, open_service
    from stipple_common.settings import load_settings
    from stipple_gatekeeper.service import GatekeeperSettings, serve

    dev = renders["overlays/dev"]
    for var, value in _secret(dev, "stipple-nats-users").items():
        monkeypatch.setenv(var, value)
    with NatsServer.start(tmp_path, config=render_nats.AUTH_FILE.read_text()) as server:
        address = f"{server.host}:{server.port}"
        passwords = _secret(dev, "stipple-nats-users")
        for service in SERVICES:
            nc = await nats.connect(f"nats://{service}:{passwords[render_nats.password_var(service)]}@{address}")
            await nc.close()
        gatekeeper = _containers(_get(dev, "Deployment", "gatekeeper"))[0]
        env = {
            k: v.replace("@nats:4222", f"@{address}")
            for k, v in _container_env(dev, gatekeeper).items()
            if k.startswith("STIPPLE_")
        }
        assert {"STIPPLE_NATS_URL", "STIPPLE_SYSTEM_URL", "STIPPLE_ISSUER_SEED", "STIPPLE_CALLOUT_SEED"} <= set(env)
        settings = load_settings(GatekeeperSettings, {**env, "STIPPLE_LOG_LEVEL": "warning"})
        stop = asyncio.Event()
        async with open_service("gatekeeper", settings, blobs=settings.intake, stop=stop) as ctx:
            task = asyncio.create_task(serve(ctx, settings))
            try:
                account = Account.create()
                node_id = node_id_of(account.address)
                deadline = time.monotonic() + 15
                while True:  # until the gatekeeper answers the callout, then rpc.join
                    node = None
                    try:
                        node = await nats.connect(
                            server.url,
                            connect_timeout=3,
                            max_reconnect_attempts=0,
                            allow_reconnect=False,
                            **nats_identity(account),
                        )
                        reply = await node.request(subjects.join_rpc_subject(node_id), b"", timeout=2)
                        break
                    except (nats.errors.Error, OSError):
                        if node is not None:
                            await node.close()
                        assert time.monotonic() < deadline, "the gatekeeper never admitted the key"
                        await asyncio.sleep(0.2)
                status = join_status_decoder.decode(reply.data)
                assert status.node_id == node_id
                assert status.level == ("node" if status.min_stake == 0 else "applicant"), status
                await node.close()
                with pytest.raises((nats.errors.Error, OSError)):
                    await nats.connect(server.url, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
            finally:
                stop.set()
                await asyncio.wait({task}, timeout=10)
                task.cancel()  # still connecting, when its NATS logins failed
                await asyncio.gather(task, return_exceptions=True)


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
        password = next(e for e in container["env"] if e["name"] == "NATS_PASSWORD")["valueFrom"]["secretKeyRef"]
        assert _unhashed(password) == {"name": "stipple-nats-users", "key": render_nats.password_var(service)}
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
    assert _containers(nats_set)[0]["image"].startswith("nats:2.")  # the release: test_the_statefulset_runs_...
    assert nats_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    config = _get(objects, "ConfigMap", "nats-config")["data"]
    for n in range(3):
        assert f"nats://nats-{n}.nats-headless:6222" in config["nats.conf"]
    assert config["auth.conf"] == render_nats.AUTH_FILE.read_text()
    assert "include ./auth.conf" in config["nats.conf"]
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
    from stipple_gatekeeper.jwt import public_key

    dev_secrets = [o for o in renders["overlays/dev"] if o["kind"] == "Secret"]
    assert dev_secrets
    for secret in dev_secrets:
        for key, value in secret["data"].items():
            text = base64.b64decode(value).decode()
            if key in NKEY_VARS:  # keys: marked DEV-ONLY in the kustomization
                assert text.startswith(NKEY_VARS[key]), key
                continue
            assert text == "" or "dev-only" in text or key.endswith("ACCESS_KEY") or key == "MINIO_ROOT_USER", key
    kustomization = (K8S / "overlays/dev/kustomization.yaml").read_text()
    assert kustomization.count("DEV-ONLY") >= 3
    # the gatekeeper's seeds and the public keys the NATS servers trust are one pair
    seeds = _secret(renders["overlays/dev"], "stipple-gatekeeper-keys")
    nats_users = _secret(renders["overlays/dev"], "stipple-nats-users")
    assert public_key(seeds["STIPPLE_ISSUER_SEED"]) == nats_users["NATS_CALLOUT_ISSUER"]
    assert public_key(seeds["STIPPLE_CALLOUT_SEED"]) == nats_users["NATS_CALLOUT_USER"]


@pytest.mark.slow
@pytest.mark.parametrize("target", NATS_OVERLAYS)
def test_the_nats_pods_get_every_variable_the_accounts_file_reads(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    objects = renders[target]
    server = _containers(_get(objects, "StatefulSet", "nats"))[0]
    assert [_unhashed(r["secretRef"])["name"] for r in server["envFrom"] if "secretRef" in r] == ["stipple-nats-users"]
    if target == "overlays/dev":  # production's Secret is made by hand (README), from --print-vars
        assert set(_secret(objects, "stipple-nats-users")) == set(render_nats.env_vars())


@pytest.mark.slow
@pytest.mark.parametrize("target", NATS_OVERLAYS)
def test_the_gatekeeper_takes_its_keys_from_secrets_and_reaches_nats_and_minio_only(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    objects = renders[target]
    deployment = _get(objects, "Deployment", "gatekeeper")
    assert deployment["spec"]["replicas"] == 2  # stateless: queue groups
    assert _get(objects, "PodDisruptionBudget", "gatekeeper")["spec"]["minAvailable"] == 1
    container = _containers(deployment)[0]
    env = {e["name"]: e for e in container["env"]}
    for seed in ("STIPPLE_ISSUER_SEED", "STIPPLE_CALLOUT_SEED"):
        assert _unhashed(env[seed]["valueFrom"]["secretKeyRef"]) == {"name": "stipple-gatekeeper-keys", "key": seed}
    assert _unhashed(env["NATS_SYS_PASSWORD"]["valueFrom"]["secretKeyRef"]) == {
        "name": "stipple-nats-users",
        "key": render_nats.SYSTEM_PASSWORD_VAR,
    }
    assert env["STIPPLE_SYSTEM_URL"]["value"] == "nats://sys:$(NATS_SYS_PASSWORD)@nats:4222"
    # the nodes' images go to MinIO with the services' key
    assert {"name": "stipple-s3-services"} in [
        _unhashed(r["secretRef"]) for r in container["envFrom"] if "secretRef" in r
    ]
    assert {"configMapRef": {"name": _get(objects, "ConfigMap", "stipple-config")["metadata"]["name"]}} in container[
        "envFrom"
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    egress: set[tuple[str, int]] = set()
    ingress: set[tuple[str, int]] = set()
    for policy in (o["spec"] for o in objects if o["kind"] == "NetworkPolicy"):
        if not k8s_check._matches(policy["podSelector"], labels):
            continue
        for rule in policy.get("egress", []):
            peers = [
                (p.get("podSelector") or {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                or (p.get("podSelector") or {}).get("matchLabels", {}).get("k8s-app")
                for p in rule.get("to", [{}])
            ]
            egress |= {(str(peer), port["port"]) for peer in peers for port in rule["ports"]}
        for rule in policy.get("ingress", []):
            peers = [
                (p.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                for p in rule["from"]
            ]
            ingress |= {(str(peer), port["port"]) for peer in peers for port in rule["ports"]}
    assert egress == {("kube-dns", 53), ("nats", 4222), ("minio", 9000)}
    assert ingress == {("monitoring", 9090)}
    minio = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}["minio-clients"]
    assert any(k8s_check._matches(p["podSelector"], labels) for p in minio["ingress"][0]["from"])


@pytest.mark.slow
def test_node_agent_gets_a_gpu_its_key_and_a_model_cache(renders: dict[str, list[dict[str, Any]]]) -> None:
    objects = renders["node/example"]
    agent = _get(objects, "Deployment", "node-agent")
    pod = agent["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert agent["spec"]["replicas"] == 1
    env = {e["name"]: e for e in container["env"]}
    key_volume = next(v for v in pod["volumes"] if v["name"] == "key")
    assert key_volume["secret"]["secretName"] == "stipple-node-key"
    assert key_volume["secret"]["items"] == [{"key": "node.key", "path": "node.key"}]
    assert env["STIPPLE_KEY_FILE"]["value"] == "/var/run/stipple/key/node.key"
    cache = next(v for v in pod["volumes"] if v["name"] == "models")
    assert _get(objects, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    config = _get(objects, "ConfigMap", "node-config")["data"]
    assert config["STIPPLE_NATS_URL"] == "nats://nats.stipple.svc:4222"  # no user, no password
    assert config["STIPPLE_CHAIN"] == "true"  # stakes the minimum at start through the chain relay
    assert config["STIPPLE_DECLARE_STREAMS"] == "false"
    assert _get(objects, "PodMonitor", "node-agent")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["node/example", "node/dev-cpu"])
def test_no_node_manifest_carries_a_credential(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    objects = renders[target]
    assert [o for o in objects if o["kind"] == "Secret"] == []  # node/example's key Secret is made by hand
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            for key, value in obj["data"].items():
                assert not re.search(r"PASSWORD|S3_|SECRET|NODE_ID|OPERATOR|INBOX", key), key
                assert "@" not in value, key
        if obj["kind"] == "Deployment":
            for container in _containers(obj):
                assert [e for e in container["env"] if "valueFrom" in e] == []
                assert all("secretRef" not in r for r in container["envFrom"])
                assert all("value" in e and "@" not in e["value"] for e in container["env"])
                assert not any(re.search(r"PASSWORD|S3_|SECRET|NODE_ID|OPERATOR", e["name"]) for e in container["env"])


@pytest.mark.slow
def test_rules_catch_a_secret_in_plain_sight_and_a_credential_given_to_a_node(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    objects = copy.deepcopy(renders["node/example"])
    node = _containers(_get(objects, "Deployment", "node-agent"))[0]
    node["env"] += [
        {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "stipple-node", "key": "nats-password"}}},
        {"name": "STIPPLE_S3_SECRET_KEY", "value": "literal"},
    ]
    _get(objects, "ConfigMap", "node-config")["data"]["STIPPLE_NATS_URL"] = "nats://gpu-a:pw@nats:4222"
    messages = {(f.name, f.message.split(":")[0]) for f in k8s_check.rule_failures("node/example", objects)}
    assert ("node-agent", "NATS_PASSWORD comes from a Secret") in messages
    assert ("node-agent", "NATS_PASSWORD") in messages
    assert ("node-agent", "STIPPLE_S3_SECRET_KEY has a literal value") in messages
    assert ("node-agent", "STIPPLE_NATS_URL carries a user or password") in messages

    objects = copy.deepcopy(renders["overlays/production"])
    gatekeeper = _containers(_get(objects, "Deployment", "gatekeeper"))[0]
    seed = next(e for e in gatekeeper["env"] if e["name"] == "STIPPLE_ISSUER_SEED")
    del seed["valueFrom"]
    seed["value"] = "SA..."
    _get(objects, "ConfigMap", "stipple-config")["data"]["STIPPLE_WEBHOOK_SECRET"] = "x"
    failures = {(f.kind, f.name, f.path) for f in k8s_check.rule_failures("overlays/production", objects)}
    index = gatekeeper["env"].index(seed)
    assert ("Deployment", "gatekeeper", f"spec.template.spec.containers[0].env[{index}]") in failures
    assert any(kind == "ConfigMap" and path == "data.STIPPLE_WEBHOOK_SECRET" for kind, _, path in failures)


@pytest.mark.slow
def test_the_cpu_dev_nodes_join_the_dev_network_with_their_keys_alone(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    dev = renders["overlays/dev"]
    namespace_of = {o["metadata"]["name"]: o["metadata"]["namespace"] for o in dev if o["kind"] == "Service"}
    by_namespace: dict[str, list[dict[str, Any]]] = {}
    for o in renders["node/dev-cpu"]:
        by_namespace.setdefault(o["metadata"].get("namespace") or o["metadata"]["name"], []).append(o)
    assert len(by_namespace) == 3  # a task runs on three nodes
    for namespace, objects in sorted(by_namespace.items()):
        assert _get(objects, "Namespace", namespace)["metadata"]["labels"]["stipple.io/nodes"] == "true"
        pod = _get(objects, "Deployment", "node-agent")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert "nodeSelector" not in pod
        assert "tolerations" not in pod
        assert not any("nvidia.com/gpu" in part for part in container["resources"].values())
        config = _get(objects, "ConfigMap", "node-config")["data"]
        assert config["STIPPLE_DEVICE"] == "cpu"
        assert config["STIPPLE_NATS_URL"] == f"nats://nats.{namespace_of['nats']}.svc:4222"
        assert config["STIPPLE_CHAIN"] == "true"  # the dev chain's faucet funds the new key, which stakes
        # no key Secret: the node makes its key on the model cache at first start
        assert "STIPPLE_KEY_FILE" not in {e["name"] for e in container["env"]}
        assert {v["name"] for v in pod["volumes"]} == {"models", "tmp"}


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
    # nodes reach NATS only: their images go through the gatekeeper
    selectors = [f.get("namespaceSelector") for f in policies["minio-clients"]["ingress"][0]["from"]]
    assert selectors == [None, None]
    node_policies = [o for o in renders["node/example"] if o["kind"] == "NetworkPolicy"]
    egress = {p["port"] for o in node_policies for rule in o["spec"].get("egress", []) for p in rule["ports"]}
    assert egress == {53, 4222, 443}


def test_minio_has_the_services_user_only() -> None:
    import yaml

    services = json.loads((K8S / "base/minio/policies/services.json").read_text())
    assert services["Statement"][0]["Resource"] == ["arn:aws:s3:::stipple-images", "arn:aws:s3:::stipple-images/*"]
    assert not (K8S / "base/minio/policies/nodes.json").exists()
    job = yaml.safe_load((K8S / "base/minio/setup-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} == {"policies", "tmp"}
    script = pod["containers"][0]["args"][0]
    assert script.count("mc admin user add") == 1
    assert "nodes" not in script


@pytest.mark.slow
def test_every_stipple_image_has_a_dockerfile_and_a_tag_in_each_overlay(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    import yaml

    for target in ("overlays/dev", "overlays/production"):
        images = {
            c["image"]
            for o in renders[target]
            if o["kind"] in WORKLOADS
            for c in o["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith(k8s_check.STIPPLE_IMAGE)
        }
        names = {image.rpartition(":")[0].removeprefix(k8s_check.STIPPLE_IMAGE) for image in images}
        assert names == set(SERVICES), target
        for name in names:
            assert (ROOT / "services" / name / "Dockerfile").is_file(), name
        tagged = yaml.safe_load((K8S / target / "kustomization.yaml").read_text())["images"]
        assert {i["name"].removeprefix(k8s_check.STIPPLE_IMAGE) for i in tagged} == names, target


@pytest.mark.slow
def test_production_runs_the_stateful_services_active_and_standby_and_two_gateways(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """Losing one replica loses nothing: two gateways (stateless), and two of each service
    whose state is in memory, one of them holding the KV lease (STIPPLE_LEASE_S), or, the
    validator, each holding the leases of half its partitions (STIPPLE_PARTITIONS), each
    named by its pod (STIPPLE_INSTANCE: a lease holder's name must be its own)."""
    objects = renders["overlays/production"]
    assert int(_get(objects, "ConfigMap", "stipple-config")["data"]["STIPPLE_LEASE_S"]) > 0
    assert _get(objects, "Deployment", "gateway")["spec"]["replicas"] == 2
    for name in ("dispatcher", "validator", "chain-indexer"):
        deployment = _get(objects, "Deployment", name)
        assert deployment["spec"]["replicas"] == 2, name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        env = {e["name"]: e for e in _containers(deployment)[0]["env"]}
        assert env["STIPPLE_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
    validator = {e["name"]: e for e in _containers(_get(objects, "Deployment", "validator"))[0]["env"]}
    assert int(validator["STIPPLE_PARTITIONS"]["value"]) >= 2 * 2  # partitioned: both replicas active
    dev = renders["overlays/dev"]
    assert "STIPPLE_LEASE_S" not in _get(dev, "ConfigMap", "stipple-config")["data"]
    assert _get(dev, "Deployment", "dispatcher")["spec"]["replicas"] == 1
