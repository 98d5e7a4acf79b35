"""Pictures of the Grafana dashboards from a real local run (docs/img/dashboard-<name>.png).

Grafana is not installable on our machines, so this draws each dashboard's panels itself,
from the same queries, against a real Prometheus:

1. starts `stipple up` (the whole network, as an operator would try it) and reads the
   gateway and metrics URLs it prints;
2. starts Debian's `prometheus` scraping every service every 2 s, with the alert rules of
   deploy/k8s/base/monitoring loaded (so `ALERTS` is real too);
3. puts load on the gateway for `--minutes`: closed-loop clients posting tasks of a few
   sizes, half of them paid (escrowed and settled on the embedded chain), a share of bad
   requests (they must be 4xx) and cancellations; after `--cheater-after` seconds a
   cheating node joins (bench/fixed_image_node.py: the real node agent returning a flat
   grey picture), stakes, and is caught, slashed and paused;
4. runs every panel's PromQL over the run with Prometheus's query_range and plots the
   results in the dashboard's own grid, one PNG per dashboard.

    .venv/bin/python deploy/tools/dashboard_snapshot.py --minutes 4 --out docs/img

Grafana's template variables are replaced for a plain query: `$__rate_interval` and
`$__interval` by `--rate-window`, `$datasource` dropped, every other `$var` by `.*`
(all values). What the pictures show is what the queries return; nothing is drawn that
Prometheus did not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "k8s" / "base" / "monitoring"
STATS = ("stat", "gauge", "bargauge")  # one number each, drawn as text
SIZES = [(64, 64, 4), (128, 128, 8), (128, 128, 12), (192, 192, 8)]


def start_network(data_dir: Path, nodes: int, log: Path) -> tuple[subprocess.Popen, str, str, dict[str, str]]:
    """`stipple up` as a user runs it; returns the process, the gateway and NATS URLs and the metrics URLs."""
    cmd = [sys.executable, "-m", "stipple_cli", "up", "--port", "0", "--no-demo", "--nodes", str(nodes)]
    cmd += ["--data-dir", str(data_dir)]
    out = log.open("w")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=out, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    gateway, nats, metrics, in_metrics = "", "", {}, False
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)
        if time.monotonic() > deadline:
            break
        if m := re.match(r"\s+gateway\s+(http://\S+)", line):
            gateway = m[1]
        if m := re.match(r"\s+nats\s+(nats://\S+)", line):
            nats = m[1]
        m = re.match(r"\s+(?:metrics\s+)?(\S+)\s+(http://\S+/metrics)$", line.rstrip())
        if m and ("metrics" in line or in_metrics):
            in_metrics = True
            metrics[m[1]] = m[2]
        elif in_metrics:
            break
        if line.startswith("Try:"):
            break
    if not gateway or not nats or not metrics:
        proc.terminate()
        raise SystemExit(f"stipple up did not come up; see {log}")
    # keep draining its output so it never blocks on a full pipe
    threading.Thread(target=lambda: [out.write(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    return proc, gateway, nats, metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cheater(nats: str, work: Path, metrics_port: int, log: Path) -> subprocess.Popen:
    """A node that stakes like any other and answers every task with a flat grey picture."""
    env = {
        **os.environ,
        "STIPPLE_NATS_URL": nats,
        "STIPPLE_MODEL_CACHE": str(work / "node-cheat"),
        "STIPPLE_CHAIN": "true",
        "STIPPLE_METRICS_PORT": str(metrics_port),
        "STIPPLE_LOG_FORMAT": "json",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, str(ROOT / "bench" / "fixed_image_node.py")]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def service_of(name: str) -> str:
    return "node-agent" if name.startswith("node-") else name


def prometheus_config(metrics: dict[str, str], rules: Path | None, interval: str) -> dict:
    jobs: dict[str, list[dict]] = {}
    for name, url in metrics.items():
        target = urllib.parse.urlparse(url).netloc
        jobs.setdefault(service_of(name), []).append({"targets": [target], "labels": {"pod": name}})
    config: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": f"stipple/{job}", "static_configs": targets} for job, targets in sorted(jobs.items())
        ],
    }
    if rules is not None:
        config["rule_files"] = [str(rules)]
    return config


def alert_rules(out: Path) -> Path | None:
    """The PrometheusRule objects' groups as a plain rules file (what the operator loads in k8s)."""
    groups = []
    for path in sorted(MONITORING.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                groups += doc["spec"]["groups"]
    if not groups:
        return None
    out.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return out


def start_prometheus(workdir: Path, config: dict, port: int, log: Path) -> subprocess.Popen:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus not found: apt-get install prometheus (./dev installs it as root)")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"prometheus did not become ready; see {log}")


async def load(gateway: str, minutes: float, concurrency: int, seed: int) -> dict[str, int]:
    """Closed-loop clients: mostly good tasks of a few sizes, some bad requests, some cancels."""
    rng = random.Random(seed)
    counts = {"ok": 0, "bad_4xx": 0, "unexpected": 0, "cancelled": 0}
    stop_at = time.monotonic() + minutes * 60

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            roll = rng.random()
            w, h, steps = rng.choice(SIZES)
            body: dict = {"base_model": "tiny-sd", "prompt": f"a red fox {rng.randrange(10**6)}"}
            if rng.random() < 0.5:  # paid: escrowed from the custodial deposit, settled to the nodes
                body["fee"] = 10**16
            body["task_config"] = {"image_width": w, "image_height": h, "steps": steps, "seed": rng.randrange(2**31)}
            if roll < 0.07:  # a bad value: the gateway must name it and answer 4xx
                body["task_config"]["steps"] = -3
            try:
                r = await http.post(f"{gateway}/v1/tasks", json=body)
                if roll < 0.07:
                    counts["bad_4xx" if 400 <= r.status_code < 500 else "unexpected"] += 1
                    continue
                if r.status_code >= 300:
                    counts["unexpected"] += 1
                    await asyncio.sleep(0.5)
                    continue
                task_id = r.json()["task_id"]
                if roll < 0.10:
                    await http.delete(f"{gateway}/v1/tasks/{task_id}")
                    counts["cancelled"] += 1
                    continue
                while time.monotonic() < stop_at + 60:
                    s = (await http.get(f"{gateway}/v1/tasks/{task_id}")).json()
                    if s.get("status") in ("succeeded", "aborted", "cancelled"):
                        counts["ok" if s["status"] == "succeeded" else "unexpected"] += 1
                        break
                    await asyncio.sleep(0.2)
            except httpx.HTTPError:
                counts["unexpected"] += 1
                await asyncio.sleep(0.5)

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return counts


def grafana_expr(expr: str, rate_window: str) -> str:
    expr = expr.replace("$__rate_interval", rate_window).replace("${__rate_interval}", rate_window)
    expr = expr.replace("$__interval", rate_window).replace("${__interval}", rate_window)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
        return inner or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


def panels_of(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return [p for p in out if p.get("targets")]


def draw(dashboard: dict, prom: str, start: float, end: float, rate_window: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(dashboard)
    step = max((end - start) / 240, 2)
    bottom = max((p.get("gridPos", {}).get("y", 0) + p.get("gridPos", {}).get("h", 8)) for p in panels)
    width_in, row_in, head_in = 16.0, 0.42, 0.6  # a Grafana grid row is ~30 px: 0.42 in here
    height_in = bottom * row_in + head_in
    fig = plt.figure(figsize=(width_in, height_in), dpi=80)
    fig.suptitle(f"{dashboard.get('title', '')}: stipple up under load (Prometheus query_range)", fontsize=13)
    empty = []
    for panel in panels:
        g = panel.get("gridPos", {"x": 0, "y": 0, "w": 12, "h": 8})
        left, right = 0.6 / width_in, 0.15 / width_in  # room for tick labels
        top, below = 0.3 / height_in, 0.45 / height_in  # room for the title and the x label
        cell_top = 1 - (head_in + g["y"] * row_in) / height_in
        cell_h = g["h"] * row_in / height_in
        ax = fig.add_axes(
            (g["x"] / 24 + left, cell_top - cell_h + below, g["w"] / 24 - left - right, cell_h - top - below)
        )
        ax.set_title(panel.get("title", ""), fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        series = 0
        for target in panel["targets"]:
            expr = grafana_expr(target.get("expr", ""), rate_window)
            if not expr:
                continue
            for result in query_range(prom, expr, start, end, step):
                xs = [float(t) - start for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                if all(math.isnan(y) for y in ys):  # histogram_quantile of no observations
                    continue
                label = legend(target.get("legendFormat", ""), result["metric"])
                if panel.get("type") in STATS:
                    ax.text(0.5, 0.5 - 0.25 * series, f"{ys[-1]:.3g}", ha="center", va="center", fontsize=18)
                    ax.set_axis_off()
                else:
                    ax.plot(xs, ys, linewidth=1, label=label[:40])
                series += 1
        if series == 0:
            empty.append(panel.get("title", "?"))
            if panel.get("type") in STATS:
                ax.set_axis_off()
            ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=10, color="grey", transform=ax.transAxes)
        elif panel.get("type") not in STATS:
            ax.set_xlabel("seconds into the run", fontsize=7)
            if series <= 8:
                ax.legend(fontsize=6, loc="upper left")
    fig.savefig(out)
    plt.close(fig)
    return empty


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="load duration (default 4)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients (default 4)")
    parser.add_argument("--nodes", type=int, default=3, help="node agents for stipple up (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--rate-window", default="30s", help="what $__rate_interval becomes (default 30s)")
    parser.add_argument("--cheater-after", type=float, default=60, help="seconds until a cheating node joins (0: none)")
    parser.add_argument("--prometheus-port", type=int, default=19090)
    parser.add_argument("--dashboards", type=Path, default=MONITORING / "dashboards", help="the dashboards' JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, TSDB)")
    args = parser.parse_args()
    dashboards = sorted(args.dashboards.glob("*.json"))
    if not dashboards:
        raise SystemExit(f"no dashboards in {args.dashboards}")
    work = Path(tempfile.mkdtemp(prefix="stipple-snapshot-"))
    args.out.mkdir(parents=True, exist_ok=True)
    network, gateway, nats, metrics = start_network(work / "network", args.nodes, work / "stipple-up.log")
    prometheus = None
    cheaters: list[subprocess.Popen] = []
    timer: threading.Timer | None = None
    try:
        if args.cheater_after:
            cheat_port = free_port()
            metrics = {**metrics, "node-cheat": f"http://127.0.0.1:{cheat_port}/metrics"}
        config = prometheus_config(metrics, alert_rules(work / "rules.yml"), "2s")
        prometheus = start_prometheus(work, config, args.prometheus_port, work / "prometheus.log")
        prom = f"http://127.0.0.1:{args.prometheus_port}"
        print(f"stipple up: {gateway}, {len(metrics)} metrics endpoints; prometheus {prom}", flush=True)
        start = time.time()
        time.sleep(10)  # an idle stretch first: the panels show the step up
        if args.cheater_after:
            timer = threading.Timer(
                args.cheater_after,
                lambda: cheaters.append(start_cheater(nats, work, cheat_port, work / "node-cheat.log")),
            )
            timer.start()
        counts = asyncio.run(load(gateway, args.minutes, args.concurrency, seed=7))
        time.sleep(15)  # and the quiet after
        end = time.time()
        print(f"load: {counts} over {args.minutes} min at concurrency {args.concurrency}", flush=True)
        for path in dashboards:
            dashboard = json.loads(path.read_text())
            target = args.out / f"dashboard-{path.stem}.png"
            empty = draw(dashboard, prom, start, end, args.rate_window, target)
            note = f" (no data: {', '.join(empty)})" if empty else ""
            print(
                f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: "
                f"{len(panels_of(dashboard))} panels{note}",
                flush=True,
            )
        return 0
    finally:
        if timer is not None:
            timer.cancel()
        for cheater in cheaters:
            cheater.terminate()
            cheater.wait(30)
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        network.send_signal(signal.SIGINT)
        try:
            network.wait(60)
        except subprocess.TimeoutExpired:
            network.kill()
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
