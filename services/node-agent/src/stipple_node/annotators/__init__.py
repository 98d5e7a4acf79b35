"""ControlNet annotators that need weights (HED, ...): their networks in plain torch (no
torchvision, no controlnet_aux), with weights that come through the node's model store.

Each module of this package describes its networks with `Annotator` records in a
module-level `ANNOTATORS` tuple: which preprocess methods a record serves, where its
weights are published (lllyasviel/Annotators by default, overridable per annotator with
`STIPPLE_ANNOTATOR_WEIGHTS=name=ref,...`), how to build the network, how to load the
published file into it (`load`, and its inverse `to_published` for tests) and how to
turn an RGB array into a control image (`run`). A method that needs more than one network
(OpenPose's hands and faces run on crops its body network finds) names the other records
in `uses`. `REGISTRY` collects every module's records; a method no record serves ends the
task with `preprocessor_unavailable`.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stipple_common.errors import StippleError
from stipple_common.settings import InvalidSettings

ANNOTATORS_REPO = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"


class PreprocessorUnavailable(StippleError):
    code = "preprocessor_unavailable"


def load_torch_state(network: nn.Module, path: Path) -> None:
    """The usual published layout: a `torch.save`d state dict (loaded without pickle code)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    network.load_state_dict(state)


def save_torch(published: Any, path: Path) -> None:
    """Writes what `to_published` gives as the usual layout does (`torch.save`)."""
    torch.save(published, str(path))


@dataclass(frozen=True)
class Annotator:
    name: str  # the key of its weights in STIPPLE_ANNOTATOR_WEIGHTS
    methods: tuple[str, ...]
    weights: str  # default reference: a URL, a repo file or a path
    build: Callable[[], nn.Module]
    # (network, RGB uint8 array HxWx3, method, args) -> control image, uint8 HxWx3; with the
    # keyword `uses` too where the record has `uses`
    run: Callable[..., np.ndarray]
    load: Callable[[nn.Module, Path], None] = load_torch_state
    # the inverse of `load`: what the published file holds for `network` (tests write it)
    to_published: Callable[[nn.Module], Any] = lambda network: network.state_dict()
    # (what `to_published` gives, path) -> the published file (tests write it); a file that
    # is not a torch.save'd object (TorchScript) needs its own
    save: Callable[[Any, Path], None] = save_torch
    # Other records whose networks a method needs as well: {method: (record name, ...)}.
    # `Annotators.apply` loads them too and passes them to `run` as `uses={name: network}`
    # (empty for a method not listed). A record without `uses` gets no such keyword.
    uses: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)


def _registry() -> dict[str, Annotator]:
    records: dict[str, Annotator] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for record in getattr(module, "ANNOTATORS", ()):
            if record.name in records:
                raise RuntimeError(f"two annotators are named {record.name!r}")
            records[record.name] = record
    for record in records.values():
        for method, names in record.uses.items():
            if method not in record.methods or not set(names) <= records.keys() - {record.name}:
                raise RuntimeError(f"{record.name} uses {names!r} for {method!r}: not its method or not other records")
    return records


REGISTRY: dict[str, Annotator] = _registry()
BY_METHOD: dict[str, Annotator] = {method: a for a in REGISTRY.values() for method in a.methods}


def parse_weights(spec: str) -> dict[str, str]:
    """`name=ref[,name=ref...]` (STIPPLE_ANNOTATOR_WEIGHTS) -> overrides of the defaults."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, ref = item.partition("=")
        if not sep or name not in REGISTRY or not ref:
            raise InvalidSettings(
                f"STIPPLE_ANNOTATOR_WEIGHTS={spec!r}: expected name=ref[,name=ref...] with names from "
                f"{', '.join(REGISTRY)}, got {item!r}"
            )
        out[name] = ref
    return out


class Annotators:
    """Annotator networks, each loaded on first use through `resolve` (the model store)."""

    def __init__(self, resolve: Callable[[str], Path] | None, weights: Mapping[str, str] | None = None) -> None:
        self._resolve = resolve
        self._refs = {name: record.weights for name, record in REGISTRY.items()} | dict(weights or {})
        self._networks: dict[str, nn.Module] = {}
        self._lock = threading.Lock()

    def network(self, name: str) -> nn.Module:
        record = REGISTRY[name]
        with self._lock:
            if name not in self._networks:
                ref = self._refs.get(name, "")
                if self._resolve is None or not ref:
                    raise PreprocessorUnavailable(
                        f"controlnet.preprocess.method: {(record.methods or (name,))[0]} needs annotator weights "
                        "and this node has no model store"
                    )
                path = self._resolve(ref)
                network = record.build()
                try:
                    record.load(network, path)
                except Exception as exc:
                    raise PreprocessorUnavailable(
                        f"controlnet.preprocess.method: cannot load {name} weights from {ref}: {exc}"
                    ) from exc
                self._networks[name] = network.eval()
            return self._networks[name]

    def apply(self, method: str, array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
        record = BY_METHOD[method]
        network = self.network(record.name)
        extra = {"uses": {name: self.network(name) for name in record.uses.get(method, ())}} if record.uses else {}
        with torch.inference_mode():
            return record.run(network, array, method, args, **extra)
