"""Fixtures for the node agent's tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stipple_node.tinymodel import make_tiny_model

# The tests' files come from a FileServer on 127.0.0.1, which the default source policy (no
# URL hosts, https only, public addresses only, sha256 required) refuses; the stores the tests
# make without a policy read this one. Tests of the policy itself pass theirs explicitly.
LOOPBACK_SOURCES = {
    "hosts": ["127.0.0.1"],
    "http_hosts": ["127.0.0.1"],
    "private_hosts": ["127.0.0.1"],
    "require_sha256": False,
}


@pytest.fixture(autouse=True)
def loopback_model_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests' file servers are on loopback: the policy allows it, for these tests only
    (set in the environment of the whole process, it leaked into other packages' tests)."""
    if "STIPPLE_MODEL_SOURCES" not in os.environ:
        monkeypatch.setenv("STIPPLE_MODEL_SOURCES", json.dumps(LOOPBACK_SOURCES))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5 model, built once per test session (about a second)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """As the node agent runs: one thread, so results are bit-identical and test processes
    do not fight over the two cores (torch's spinning threads slow each other 10x or more)."""
    import torch

    torch.set_num_threads(1)
