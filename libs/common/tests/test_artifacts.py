"""The committed contracts/artifacts are what the sources compile to with the pinned solc.

The test recompiles contracts/src with contracts/compile.js into a temporary folder and
compares every file byte for byte, so a source edit without `node compile.js` fails here.
contracts/node_modules is installed with `npm ci` when missing or out of date.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from stipple_common import chain as ch

CONTRACTS = ch.contracts_dir()
COMMITTED = CONTRACTS / "artifacts"


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifacts compiled afresh from contracts/src."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:  # a missing tool is a failure, never a skip
        pytest.fail("node and npm not found: install Node.js 20+ (apt-get install nodejs npm) to check the artifacts")
    ch.install_node_modules(CONTRACTS)
    out = tmp_path_factory.mktemp("artifacts")
    result = subprocess.run(
        [node, "compile.js", "--out", str(out)], cwd=CONTRACTS, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"node compile.js failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.mark.slow
def test_committed_artifacts_match_the_sources(rebuilt: Path) -> None:
    fresh = sorted(p.name for p in rebuilt.glob("*.json"))
    committed = sorted(p.name for p in COMMITTED.glob("*.json"))
    assert fresh == committed, f"artifact files differ: rebuilt {fresh}, committed {committed}"
    stale = [name for name in fresh if (rebuilt / name).read_bytes() != (COMMITTED / name).read_bytes()]
    assert not stale, f"contracts/artifacts/{stale} differ from the sources: run `cd contracts && node compile.js`"


def test_every_source_has_an_artifact() -> None:
    sources = {p.stem for p in (CONTRACTS / "src").glob("*.sol")}
    assert sources == {p.stem for p in COMMITTED.glob("*.json")} == set(ch.CONTRACT_NAMES)


def test_artifacts_name_the_pinned_compiler_and_evm_version() -> None:
    lock = json.loads((CONTRACTS / "package-lock.json").read_text())
    solc = lock["packages"]["node_modules/solc"]["version"]
    package = json.loads((CONTRACTS / "package.json").read_text())
    pinned = {**package["dependencies"], **package.get("optionalDependencies", {})}
    assert all(v[0].isdigit() for v in pinned.values()), f"package.json pins must be exact versions: {pinned}"
    # The bytecode ends with solc's CBOR metadata: "solc" (736f6c63), its version in 3 bytes, the length.
    cbor_solc = "64736f6c6343" + "".join(f"{int(x):02x}" for x in solc.split(".")) + "0033"
    for name, artifact in ch.load_artifacts(COMMITTED).items():
        assert artifact.compiler["version"].startswith(solc + "+"), (name, artifact.compiler["version"], solc)
        assert artifact.compiler["settings"]["evmVersion"] == "cancun", name
        assert artifact.bytecode.endswith(cbor_solc), name
