"""Fixtures shared by the end-to-end tests (the network itself is stipple_testkit.network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stipple_node.pipeline import PipelineRunner
from stipple_testkit.network import tiny_runner


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    """The built-in tiny model, loaded once per module (bit-exact at one torch thread)."""
    return tiny_runner(Path(tmp_path_factory.mktemp("tiny")))
