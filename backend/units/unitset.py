"""Units: anything with one activation per token, read from one forward pass.

A ``UnitSet`` says how to read its activations (hooks recording a [batch, positions, units]
tensor per layer) and which residual-stream direction each unit writes (for its logit
effects). MLP neurons are the first kind; transcoder features reuse the same index,
dashboards, labels and search through this interface.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backend.errors import UserInputError
from backend.runtime.hooks import Hook, read_site
from backend.runtime.models import ModelHandle

Record = Callable[[int, torch.Tensor], None]  # (layer, activations [B, P, units])


class UnitSet(ABC):
    kind: str  # "neuron", "feature"
    n_layers: int
    width: int  # units per layer

    @abstractmethod
    def key(self) -> str:
        """Identifies these units for index keys (the same model with other units is another index)."""

    @abstractmethod
    def hooks(self, handle: ModelHandle, record: Record) -> list[Hook]:
        """Hooks calling ``record(layer, activations)`` for every layer during a forward pass."""

    @abstractmethod
    def output_directions(self, handle: ModelHandle, layer: int) -> torch.Tensor:
        """[d_model, width]: what one unit of activation adds to the residual stream."""

    def name(self, layer: int, index: int) -> str:
        """Short display name, e.g. "L3/N45"."""
        return f"L{layer}/{self.kind[0].upper()}{index}"

    def check(self, layer: int, index: int) -> None:
        if not 0 <= layer < self.n_layers or not 0 <= index < self.width:
            raise UserInputError(f"No {self.kind} L{layer}/{index}: layers 0..{self.n_layers - 1}, "
                                 f"{self.kind}s 0..{self.width - 1}.")


@dataclass
class Neurons(UnitSet):
    """MLP neurons: the inputs of each block's down projection (act(gate) * up when gated)."""

    n_layers: int
    width: int
    kind: str = "neuron"

    @classmethod
    def of(cls, handle: ModelHandle) -> Neurons:
        return cls(n_layers=handle.adapter.n_layers, width=handle.adapter.d_mlp)

    def key(self) -> str:
        return f"neurons-{self.n_layers}x{self.width}"

    def hooks(self, handle: ModelHandle, record: Record) -> list[Hook]:
        adapter = handle.adapter
        return [read_site(adapter.site("neurons", layer), lambda acts, layer=layer: record(layer, acts))
                for layer in range(adapter.n_layers)]

    def output_directions(self, handle: ModelHandle, layer: int) -> torch.Tensor:
        return handle.adapter.down_proj_weight(layer)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> fingerprint


def model_fingerprint(handle: ModelHandle) -> str:
    """A hash of the model's config and a sample of every weight tensor: an index built for
    one set of weights is never read for another (a fine-tune under the same name included)."""
    cached = _FINGERPRINTS.get(handle.model)
    if cached:
        return cached
    digest = hashlib.sha256()
    config = handle.model.config.to_dict()
    digest.update(json.dumps({k: config.get(k) for k in sorted(config) if not k.startswith("_")},
                             sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(handle.model.state_dict().items()):
            digest.update(name.encode())
            sample = tensor.detach().flatten()[:256].to("cpu", torch.float32).contiguous()
            digest.update(sample.numpy().tobytes())
    value = digest.hexdigest()[:16]
    _FINGERPRINTS[handle.model] = value
    return value
