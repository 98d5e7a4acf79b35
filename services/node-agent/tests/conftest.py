"""Fixtures for the node agent's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stipple_node.tinymodel import make_tiny_model


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
