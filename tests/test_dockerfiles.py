"""The services' Dockerfiles and the root .dockerignore, checked without a Docker daemon.

Images cannot be built here, so these tests read each services/<svc>/Dockerfile (a small
parser of the instruction format below: continuation lines, comments, JSON or shell form)
and check what a build or a Kubernetes pod would trip over: a COPY of a path that does not
exist or that .dockerignore keeps out of the context, an ENTRYPOINT that is not one of the
service's console scripts, a final stage running as root, the node agent's torch pin
drifting from uv.lock's, metrics that listen on localhost only.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.parent.name for p in ROOT.glob("services/*/pyproject.toml"))
CPU_SERVICES = [s for s in SERVICES if s != "node-agent"]
DEV_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|git|python3(\.\d+)?-dev|[\w.+-]+-dev)\b")


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        """The arguments: a JSON array as given, else split like a shell would."""
        text = self.args.strip()
        if text.startswith("["):
            return [str(w) for w in json.loads(text)]
        return shlex.split(text)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for instruction in self.all("ENV"):
            words = instruction.words()
            if len(words) == 2 and "=" not in words[0]:  # legacy `ENV KEY value`
                out[words[0]] = words[1]
                continue
            for word in words:
                key, _, value = word.partition("=")
                out[key] = value
        return out


def parse_instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):  # comments may sit inside a continued instruction
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, "the file ends inside a continued instruction"
    return out


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages); FROM's image with the global ARGs substituted."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.words() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) > 2 and words[1].lower() == "as" else ""
            stages.append(Stage(base, name))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path}:{instruction.line}: only ARG may come before FROM"
            key, _, value = instruction.args.partition("=")
            args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(instruction)
    return args, stages


def dockerfile(service: str) -> list[Stage]:
    path = ROOT / "services" / service / "Dockerfile"
    assert path.is_file(), f"services/{service} has no Dockerfile"
    return parse_dockerfile(path)[1]


def copy_sources(instruction: Instruction) -> tuple[list[str], bool]:
    """(sources, from another stage) of a COPY or ADD."""
    words = instruction.words()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], any(f.startswith("--from=") for f in flags)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions (!) are not modelled by this test"
    return [p.rstrip("/") for p in patterns]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the root) out of the build context: a pattern
    matches the path or a folder above it; a leading `**/` matches any number of folders."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            suffixes = ["/".join(parts[i : j + 1]) for i in range(len(parts)) for j in range(i, len(parts))]
            if any(fnmatch.fnmatchcase(s, tail) for s in suffixes):
                return True
        elif any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return True
    return False


def pyproject(service: str) -> dict:
    return tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())


def locked() -> dict[str, str]:
    """Package name -> the version uv.lock pins (what ./dev installs)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"] if "version" in package}


def dev_torch_pin() -> str:
    """torch's release in uv.lock, without the build tag (2.13.0+cpu: 2.13.0)."""
    return locked()["torch"].partition("+")[0]


def test_every_service_has_a_dockerfile() -> None:
    assert set(SERVICES) == {"chain-indexer", "dispatcher", "gatekeeper", "gateway", "node-agent", "validator"}
    for service in SERVICES:
        assert (ROOT / "services" / service / "Dockerfile").is_file(), service


@pytest.mark.parametrize("service", SERVICES)
def test_copy_sources_exist_and_are_in_the_build_context(service: str) -> None:
    patterns = dockerignore_patterns()
    stage_names = set()
    for stage in dockerfile(service):
        for instruction in stage.all("COPY") + stage.all("ADD"):
            sources, from_stage = copy_sources(instruction)
            assert sources, f"line {instruction.line}: COPY without a source"
            if from_stage:
                source_stage = next(f for f in instruction.words() if f.startswith("--from="))[7:]
                pinned_image = re.fullmatch(r"[\w.-]+(/[\w.-]+)+:\d[\w.-]*", source_stage)  # uv's image, by release
                assert source_stage in stage_names or pinned_image, (
                    f"line {instruction.line}: no earlier stage and no image of a fixed release: {source_stage!r}"
                )
                continue
            for source in sources:
                assert not source.startswith(("/", "..")), f"line {instruction.line}: {source} is outside the context"
                assert (ROOT / source).exists(), f"line {instruction.line}: COPY {source}: not in the repository"
                assert not ignored(source, patterns), f"line {instruction.line}: COPY {source}: .dockerignore drops it"
        if stage.name:
            stage_names.add(stage.name)


@pytest.mark.parametrize("service", SERVICES)
def test_the_build_installs_the_locked_versions(service: str) -> None:
    """Every dependency comes at the version uv.lock pins, hash-checked: what the tests ran."""
    build = dockerfile(service)[0]
    copied = {source for instruction in build.all("COPY") for source in copy_sources(instruction)[0]}
    assert {"pyproject.toml", "uv.lock"} <= copied
    runs = " ".join(i.args for i in build.all("RUN"))
    name = pyproject(service)["project"]["name"]
    assert f"uv export --frozen --no-dev --package {name} --no-emit-workspace" in runs
    assert "--require-hashes" in runs
    uv_images = [w for i in build.all("COPY") for w in i.words() if w.startswith("--from=ghcr.io/astral-sh/uv:")]
    assert uv_images == [f"--from=ghcr.io/astral-sh/uv:{locked()['uv']}"], "the uv the lock names"


def test_what_decides_a_nodes_pixels_is_pinned_exactly_and_as_locked() -> None:
    """Nodes that run one task must compute identical images: the node agent pins the packages
    that decide pixels (and the validator the ones that recompute pHash) to uv.lock's versions."""
    versions = locked()
    pixel_deciding = {"torch", "numpy", "diffusers", "transformers", "tokenizers", "safetensors", "peft"}
    pixel_deciding |= {"accelerate", "compel", "pillow", "opencv-python-headless", "imagehash", "scipy"}
    for service, names in (("node-agent", pixel_deciding), ("validator", {"pillow", "imagehash", "scipy"})):
        pins = {}
        for requirement in pyproject(service)["project"]["dependencies"]:
            name, op, version = re.match(
                r"([\w.-]+)(?:\[[^]]*\])?\s*(==|>=|<=|~=|>|<)?\s*([^\s;,]*)", requirement
            ).groups()
            pins[name.lower()] = (op, version)
        for name in names:
            assert pins.get(name, (None,))[0] == "==", f"{service}: {name} is not pinned exactly"
            assert versions[name].partition("+")[0] == pins[name][1], f"{service}: {name} differs from uv.lock"


@pytest.mark.parametrize("service", SERVICES)
def test_the_build_copies_the_local_dependency_and_the_service(service: str) -> None:
    copied = {
        source.rstrip("/")
        for stage in dockerfile(service)
        for instruction in stage.all("COPY")
        if not copy_sources(instruction)[1]
        for source in copy_sources(instruction)[0]
    }
    assert f"services/{service}" in copied
    dependencies = pyproject(service)["project"]["dependencies"]
    assert "stipple-common" in dependencies
    assert "libs/common" in copied, "stipple-common is a local package: the build needs libs/common"


@pytest.mark.parametrize("service", SERVICES)
def test_entrypoint_is_a_console_script_of_the_service(service: str) -> None:
    final = dockerfile(service)[-1]
    entrypoints = final.all("ENTRYPOINT")
    assert len(entrypoints) == 1, "one ENTRYPOINT in the final stage"
    assert entrypoints[0].args.startswith("["), "exec form, so SIGTERM reaches the service (not a shell)"
    scripts = pyproject(service)["project"]["scripts"]
    assert entrypoints[0].words()[0] in scripts, f"{entrypoints[0].words()} is not one of {sorted(scripts)}"


@pytest.mark.parametrize("service", SERVICES)
def test_final_stage_runs_as_a_numeric_non_root_user(service: str) -> None:
    users = dockerfile(service)[-1].all("USER")
    assert users, "the final stage sets no USER: it would run as root"
    user, _, group = users[-1].args.partition(":")
    assert user not in ("root", "0"), users[-1].args
    assert group not in ("root", "0"), users[-1].args
    assert user.isdigit(), "a numeric uid, so that Kubernetes' runAsNonRoot can verify it"


@pytest.mark.parametrize("service", SERVICES)
def test_metrics_listen_on_all_interfaces_and_are_exposed(service: str) -> None:
    final = dockerfile(service)[-1]
    env = final.env()
    assert env.get("STIPPLE_METRICS_HOST") == "0.0.0.0"
    port = env.get("STIPPLE_METRICS_PORT", "")
    assert port.isdigit(), "a fixed metrics port"
    assert int(port) > 0, "port 0 turns the metrics server off"
    exposed = {w.split("/")[0] for instruction in final.all("EXPOSE") for w in instruction.words()}
    assert port in exposed
    if service == "gateway":
        assert env.get("STIPPLE_HOST") == "0.0.0.0"
        assert "8080" in exposed


@pytest.mark.parametrize("service", SERVICES)
def test_final_stage_installs_no_dev_tools(service: str) -> None:
    for stage in dockerfile(service):
        for instruction in stage.all("RUN"):
            if "apt-get install" in instruction.args:
                assert "--no-install-recommends" in instruction.args, f"line {instruction.line}"
    for instruction in dockerfile(service)[-1].all("RUN"):
        for command in re.split(r"&&|;", instruction.args):
            if "apt-get install" in command or "pip install" in command:
                found = DEV_TOOLS.search(command.replace("--no-install-recommends", ""))
                assert found is None, f"line {instruction.line}: {found and found.group(0)} in the runtime image"


@pytest.mark.parametrize("service", CPU_SERVICES)
def test_cpu_services_are_multi_stage_on_python_311_slim(service: str) -> None:
    stages = dockerfile(service)
    assert len(stages) >= 2, "multi-stage: wheels are built in one stage, installed in a slim one"
    assert all(stage.base.startswith("python:3.11-slim") for stage in stages), [s.base for s in stages]
    runs = " ".join(i.args for i in stages[-1].all("RUN"))
    assert f"pip install --no-cache-dir --no-index --find-links=/wheels {pyproject(service)['project']['name']}" in runs


def test_node_agent_is_on_cuda_with_torch_pinned_as_dev_does() -> None:
    stages = dockerfile("node-agent")
    assert len(stages) >= 2
    assert all(stage.base.startswith("nvidia/cuda:") for stage in stages), [s.base for s in stages]
    assert all("ubuntu" in stage.base for stage in stages)
    assert any("apt-get install" in i.args and "python3.11" in i.args for i in stages[-1].all("RUN")), (
        "the runtime installs Python 3.11"
    )

    build_runs = [i.args for i in stages[0].all("RUN")]
    torch_runs = [n for n, run in enumerate(build_runs) if re.search(r"pip install\b.*\btorch==", run)]
    assert len(torch_runs) == 1, "torch is installed in one RUN of its own"
    torch_run = build_runs[torch_runs[0]]
    assert f'"torch=={dev_torch_pin()}"' in torch_run or f"torch=={dev_torch_pin()} " in torch_run + " "
    assert "--index-url https://download.pytorch.org/whl/cu128" in torch_run
    agent_runs = [n for n, run in enumerate(build_runs) if "pip install" in run and "services/node-agent" in run]
    assert agent_runs, "the node agent is installed in the build stage"
    assert min(agent_runs) > torch_runs[0], "torch before the node agent, so pip never swaps it"
    for run in build_runs + [i.args for i in stages[-1].all("RUN")]:
        for command in re.split(r"&&|;", run):
            assert not ("pip install" in command and "torchvision" in command), command
    node_requires = [d for d in pyproject("node-agent")["project"]["dependencies"] if d.startswith("torch")]
    assert node_requires == [f"torch=={dev_torch_pin()}"], "the agent's own pin, the image's and ./dev's agree"


def test_dockerignore_keeps_the_context_small_and_the_sources_in() -> None:
    patterns = dockerignore_patterns()
    for left_out in (
        ".venv/bin/python",
        "contracts/node_modules/solc/index.js",
        "deploy/node_modules/x",
        ".stipple/first-image.png",
        ".git/HEAD",
        "tests/test_e2e.py",
        "services/gateway/tests/test_app.py",
        "libs/common/src/stipple_common/__pycache__/bus.cpython-311.pyc",
        ".pytest_cache/v",
    ):
        assert ignored(left_out, patterns), f"{left_out} would be sent to the daemon"
    for kept in (
        "libs/common/pyproject.toml",
        "libs/common/src/stipple_common/service.py",
        "services/node-agent/src/stipple_node/service.py",
        "contracts/artifacts/NodeStaking.json",
    ):
        assert not ignored(kept, patterns), f"{kept} is needed by a build"
