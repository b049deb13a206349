"""Our own training loop for ReLU and JumpReLU transcoders, per-layer or cross-layer.

EleutherAI's sparsify (the loop behind our TopK sets) trains TopK coders only, and not
cross-layer ones; SAELens pins other transformers versions. So these are fitted here, on
the activations ``fit.collect`` stored, by one model that covers both kinds:

- **Encoder** per layer i: ``pre_i = x_i W_enc_iᵀ + b_enc_i`` on the MLP input x_i.
- **Activation**: ReLU, ``f = max(pre, 0)``; or JumpReLU (Rajamanoharan et al. 2024, the
  GemmaScope recipe), ``f = pre · H(pre − θ)`` with a learned threshold θ = exp(log θ) > 0,
  trained by their straight-through estimator: ``∂f/∂θ = −(θ/ε)·K((pre − θ)/ε)`` and
  ``∂H/∂θ = −(1/ε)·K((pre − θ)/ε)`` with the rectangle kernel K(u) = 1 for |u| < ½, ε = 1e-3,
  and no gradient from H to pre.
- **Decoder**: per-layer, ``ŷ_i = f_i W_dec_i + b_dec_i``; cross-layer (Anthropic's CLT, the
  layout circuit-tracer reads), layer i's features write to every later MLP output:
  ``ŷ_j = b_dec_j + Σ_{i ≤ j} f_i W_dec_i[:, j − i]``.
- **Loss**: the mean over layers of each layer's FVU (‖y − ŷ‖² over the batch / its variance)
  plus λ times the sparsity term, per token and layer: L1 weighted by the decoder norm
  (``Σ_f f·‖W_dec,f‖``, the norm over all layers a feature writes to) for ReLU; the L0 count
  ``Σ_f H(pre − θ)`` for JumpReLU.
- **λ is adapted to reach the target L0 = k** (active features per token and layer): after each
  step ``λ ← λ·exp(0.1·clip(L0/k − 1, −1, 1))``, starting where the penalty is a tenth (JumpReLU)
  or a thousandth (ReLU, whose L1 gradient pushes every active feature down) of the first
  loss. Published runs sweep a fixed λ instead; a target L0 is what a user of ``--k`` asks for.
- **Made for a few hundred steps** (the default fit on 2 CPU cores has about 330): each feature
  starts firing on about k/F of the first batch (its threshold, or minus its bias, at that
  quantile), decoder rows start at norm 0.01 and are left free (GemmaScope keeps them at unit
  norm; here that, or a larger start, switched most features off for good within the first
  steps), and Adam runs at 2e-3 / sqrt(F / 2^14), ten times sparsify's rate, at most 4e-3 (4e-3 at
  the default 4096 features; small sets lost most of their features at higher rates). Measured on
  SmolLM2 (bench ``transcoder_fitting``).
- Inputs and outputs are scaled to unit mean square while training (so ε and the initial
  decoder norm mean the same for any model); the scales are folded into the weights when
  they are written, so the saved set reads and writes the model's raw activations.

Shuffled passes are seeded per epoch, so a run resumed from its checkpoint (written after
every epoch, safetensors only, Adam's moments included) trains as an uninterrupted one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from backend.replacement.transcoders import LayerTranscoder

BANDWIDTH = 1e-3  # ε of the JumpReLU estimator
INITIAL_THRESHOLD = 1e-3  # GemmaScope's
LAMBDA_RATE = 0.1
DECODER_INIT = 0.01  # initial norm of a decoder row (outputs at unit mean square)
LEARNING_RATE = 2e-3  # at 2^14 features, scaled by 1 / sqrt(F / 2^14) as sparsify's, at most MAX_LEARNING_RATE
MAX_LEARNING_RATE = 4e-3
INITIAL_PENALTY = {"relu": 1e-3, "jumprelu": 0.1}  # the sparsity term's share of the first step's loss


@dataclass(frozen=True)
class SparseSpec:
    activation: str  # relu | jumprelu
    features: int
    k: int  # the target L0 per token and layer
    epochs: int
    batch_tokens: int
    seed: int


class _JumpReLU(torch.autograd.Function):
    """pre·H(pre − θ); the true gradient to pre, the kernel estimate to θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < BANDWIDTH / 2).to(grad.dtype)
        grad_threshold = -(threshold / BANDWIDTH) * window * grad
        return grad * (pre > threshold), grad_threshold.sum_to_size(threshold.shape)


class _Step(torch.autograd.Function):
    """H(pre − θ); no gradient to pre, the kernel estimate to θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < BANDWIDTH / 2).to(grad.dtype)
        return None, (-(1 / BANDWIDTH) * window * grad).sum_to_size(threshold.shape)


jump_relu = _JumpReLU.apply
heaviside = _Step.apply


class SparseTranscoders(nn.Module):
    """``n_layers`` encoders; decoders spanning 1 layer (per-layer) or every later one (cross-layer)."""

    def __init__(self, n_layers: int, d_model: int, spec: SparseSpec, cross_layer: bool, skip: bool,
                 y_mean: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        F = spec.features
        self.activation = spec.activation
        self.W_enc = nn.Parameter(torch.randn(n_layers, F, d_model, generator=generator) / math.sqrt(d_model))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, F))
        self.log_threshold = nn.Parameter(torch.full((n_layers, F), math.log(INITIAL_THRESHOLD)))
        spans = [n_layers - i if cross_layer else 1 for i in range(n_layers)]
        self.W_dec = nn.ParameterList(
            nn.Parameter(_unit_rows(torch.randn(F, span, d_model, generator=generator)) * DECODER_INIT)
            for span in spans)
        self.b_dec = nn.Parameter(y_mean.clone().float())
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if skip else None
        if self.activation not in ("relu", "jumprelu"):
            raise ValueError(f"activation {self.activation!r}: this loop trains relu or jumprelu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [L, B, d] (scaled) -> prediction [L, B, d], sparsity term and L0, each per token and layer."""
        pre = torch.einsum("lbd,lfd->lbf", x, self.W_enc) + self.b_enc[:, None]
        if self.activation == "relu":
            features = torch.relu(pre)
            sparsity = sum((features[i] * _row_norms(w)).sum() for i, w in enumerate(self.W_dec))
            l0 = (features > 0).float().sum()
        else:
            threshold = self.log_threshold.exp()[:, None]
            features = jump_relu(pre, threshold)
            sparsity = heaviside(pre, threshold).sum()
            l0 = sparsity.detach()
        # written[i][s]: layer i's features into layer i + s. Summed out of place: adding into
        # slices of one tensor made each step's backward copy and zero-fill that whole tensor
        # once per layer (a CLT step on SmolLM2 took ~10 s instead of ~1 s)
        written = [torch.einsum("bf,fsd->sbd", features[i], w).unbind(0) for i, w in enumerate(self.W_dec)]
        prediction = torch.stack([
            sum((written[i][j - i] for i in range(j + 1) if j - i < len(written[i])), self.b_dec[j].expand_as(x[j]))
            for j in range(x.shape[0])])
        if self.W_skip is not None:
            prediction = prediction + torch.einsum("lbd,led->lbe", x, self.W_skip)
        per_token = x.shape[0] * x.shape[1]
        return prediction, sparsity / per_token, l0 / per_token

    @torch.no_grad()
    def start_at_target_l0(self, x: torch.Tensor, k: int) -> None:
        """Each feature fires on about k/F of the tokens x [L, B, d] at the start: its
        threshold (JumpReLU) or minus its bias (ReLU) at that quantile of its pre-activation."""
        pre = torch.einsum("lbd,lfd->lbf", x, self.W_enc)
        rank = min(pre.shape[1], max(1, round((1 - k / pre.shape[-1]) * pre.shape[1])))
        quantile = pre.kthvalue(rank, dim=1).values  # [L, F] (torch.quantile refuses > 2^24 values)
        if self.activation == "jumprelu":
            self.log_threshold.copy_(quantile.clamp_min(INITIAL_THRESHOLD).log())
        else:
            self.b_enc.copy_(-quantile)

    @torch.no_grad()
    def written(self, x_scale: float, y_scale: float) -> tuple[list[LayerTranscoder], list[torch.Tensor]]:
        """Per layer the encoder side and its decoder [F, span, d], for raw activations."""
        layers = [LayerTranscoder(W_enc=(self.W_enc[i] / x_scale).cpu().clone(), b_enc=self.b_enc[i].cpu().clone(),
                                  W_dec=None, b_dec=(self.b_dec[i] * y_scale).cpu().clone(),
                                  threshold=self.log_threshold[i].exp().cpu().clone()
                                  if self.activation == "jumprelu" else None,
                                  W_skip=None if self.W_skip is None
                                  else (self.W_skip[i] * y_scale / x_scale).cpu().clone())
                  for i in range(self.W_enc.shape[0])]
        return layers, [(w * y_scale).cpu().clone() for w in self.W_dec]


def learning_rate(features: int) -> float:
    """Adam's rate for every kind we fit: 2e-3 / sqrt(F / 2^14) (ten times sparsify's rule), at most 4e-3."""
    return min(LEARNING_RATE / math.sqrt(features / 2 ** 14), MAX_LEARNING_RATE)


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1)


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / _row_norms(w).clamp_min(1e-12)[:, None, None]


def train_sparse(x: np.ndarray, y: np.ndarray, spec: SparseSpec, cross_layer: bool, skip: bool, device: torch.device,
                 report, checkpoint: Path | None = None) -> tuple[list[LayerTranscoder], list[torch.Tensor]]:
    """Fit on x, y [L, N, d] (training tokens only). ``report(fraction, message)`` after steps
    (it may raise to stop); with ``checkpoint``, resumes from it and rewrites it after every epoch."""
    n_layers, n, d = x.shape
    x_scale, y_scale = _rms(x), _rms(y)
    generator = torch.Generator().manual_seed(spec.seed)
    y_mean = torch.from_numpy(np.stack([np.asarray(y[i], dtype=np.float64).mean(0) for i in range(n_layers)])) / y_scale
    variance = torch.from_numpy(np.array([np.asarray(y[i], dtype=np.float64).var(0).sum() / y_scale ** 2
                                          for i in range(n_layers)])).float().clamp_min(1e-12).to(device)
    model = SparseTranscoders(n_layers, d, spec, cross_layer, skip, y_mean, generator).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate(spec.features))
    state = {"epoch": 0, "step": 0, "lambda": 0.0}
    if checkpoint is not None and checkpoint.exists():
        state = _restore(checkpoint, model, optimizer)
    steps = spec.epochs * math.ceil(n / spec.batch_tokens)
    for epoch in range(int(state["epoch"]), spec.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed * 1000 + epoch)).numpy()
        for start in range(0, n, spec.batch_tokens):
            rows = np.sort(order[start:start + spec.batch_tokens])
            xb = torch.from_numpy(np.asarray(x[:, rows], dtype=np.float32)).to(device) / x_scale
            yb = torch.from_numpy(np.asarray(y[:, rows], dtype=np.float32)).to(device) / y_scale
            if state["step"] == 0:
                model.start_at_target_l0(xb, spec.k)
            prediction, sparsity, l0 = model(xb)
            fvu = ((yb - prediction).pow(2).sum((1, 2)) / len(rows) / variance).mean()
            if state["lambda"] == 0.0:  # first step: the penalty starts at a share of the loss
                share = INITIAL_PENALTY[spec.activation]
                state["lambda"] = share * float(fvu.detach()) / max(float(sparsity.detach()), 1e-12)
            (fvu + state["lambda"] * sparsity).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["lambda"] *= math.exp(LAMBDA_RATE * max(-1.0, min(1.0, float(l0) / spec.k - 1)))
            state["step"] += 1
            if state["step"] % 20 == 0 or state["step"] == steps:
                report(state["step"] / steps, f"step {state['step']}/{steps}, training FVU {float(fvu.detach()):.3f}, "
                                              f"L0 {float(l0):.1f} (target {spec.k})")
        state["epoch"] = epoch + 1
        if checkpoint is not None:
            _save(checkpoint, model, optimizer, state)
    return model.written(x_scale, y_scale)


def _rms(a: np.ndarray) -> float:
    """Root mean square over every layer, token and component (layer by layer: a is a memory map)."""
    return float(np.sqrt(np.mean([np.mean(np.square(a[i], dtype=np.float64)) for i in range(a.shape[0])]))) or 1.0


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["state"] = torch.tensor([state["epoch"], state["step"], state["lambda"]], dtype=torch.float64)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial))
    partial.replace(path)


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    saved = optimizer.state_dict()
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            saved["state"].setdefault(int(index), {})[key] = value
    optimizer.load_state_dict(saved)
    epoch, step_count, lam = tensors["state"].tolist()
    return {"epoch": int(epoch), "step": int(step_count), "lambda": lam}
