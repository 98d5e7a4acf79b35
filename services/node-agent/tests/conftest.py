"""Fixtures for the node agent's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stipple_node.tinymodel import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5 model, built once per test session (about a second)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd"))
