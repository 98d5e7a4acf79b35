"""A stand-in for an annotator's network, for the node agent's annotator tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class StandIn(nn.Module):
    """A stand-in for an annotator network: output = `make(input)`, recording every input,
    so an annotator's pre- and post-processing can be tested on hand-made outputs."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.make = make
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.make(x)
