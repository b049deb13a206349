"""Normalization layers read in one place: LayerNorm and the RMSNorms of every family.

A norm computes y = centre(x) · scale(x) · w + b, where centre subtracts the mean for
LayerNorm only, scale = 1 / sqrt(mean(centre(x)²) + eps), and w is the stored weight (Gemma
stores w - 1: its effective weight is 1 + w). Analyses that freeze a norm keep ``scale``
from a clean run and apply the rest, which is then linear in x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backend.runtime.arch import parameter


@dataclass(frozen=True)
class NormParts:
    centred: bool  # LayerNorm subtracts the mean; RMSNorm does not
    weight: torch.Tensor | None  # effective weight (Gemma's 1 + w already added)
    bias: torch.Tensor | None
    eps: float


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def norm_modules(root: nn.Module) -> list[nn.Module]:
    """Every normalization layer under ``root``."""
    return [m for m in root.modules() if is_norm(m)]


def norm_parts(module: nn.Module) -> NormParts:
    if isinstance(module, nn.LayerNorm):
        return NormParts(True, parameter(module, "weight"), parameter(module, "bias"), module.eps)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    weight = parameter(module, "weight")
    if weight is not None and type(module).__name__.startswith("Gemma"):
        weight = 1.0 + weight
    return NormParts(False, weight, None, eps)


def centre(x: torch.Tensor, centred: bool) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True) if centred else x


def norm_scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The factor the norm multiplies the (centred) input by: [..., 1]."""
    parts = norm_parts(module)
    xc = centre(x, parts.centred)
    return torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + parts.eps)


def apply_frozen(module: nn.Module, x: torch.Tensor, scale: torch.Tensor, bias_share: float = 1.0) -> torch.Tensor:
    """The norm with a given (frozen) scale: linear in x plus ``bias_share`` of the bias.
    Splitting an input into parts, each part gets bias_share = 1 / number of parts."""
    parts = norm_parts(module)
    y = centre(x, parts.centred) * scale
    if parts.weight is not None:
        y = y * parts.weight
    if parts.bias is not None:
        y = y + bias_share * parts.bias
    return y.to(x.dtype)


def read_direction(module: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """The vector v with (frozen norm output) · direction = scale · (v · x): the direction
    seen through the norm's weight (and centring, which only keeps the centred part)."""
    parts = norm_parts(module)
    if parts.weight is not None:
        direction = direction * parts.weight
    return centre(direction, parts.centred)


def write_direction(module: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """What the norm outputs, per unit of its scale, for a write ``direction`` into its input."""
    parts = norm_parts(module)
    direction = centre(direction, parts.centred)
    return direction * parts.weight if parts.weight is not None else direction
