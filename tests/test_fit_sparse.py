"""Fitting ReLU, JumpReLU and cross-layer transcoders with our own loop (sparse_training):
the JumpReLU estimator against the derivative of its kernel-smoothed step, fitted sets that
load with the activation they were fitted with and reconstruct the MLP (recomputed here from
hooks on the modules and the reader's decoder rows), the target L0 reached, a cross-layer fit
resumed from its checkpoint equal to an uninterrupted one, and bad settings refused."""

from __future__ import annotations

import json

import pytest
import torch

from backend.errors import UserInputError
from backend.graphs.features import feature_graph
from backend.replacement.fit import FitSettings, fit_transcoders
from backend.replacement.sparse_training import BANDWIDTH, SparseSpec, SparseTranscoders, heaviside, jump_relu
from backend.replacement.transcoders import load_transcoders
from backend.runtime.prompts import document_start
from backend.units.corpus import Corpus
from tests.test_graph import relative_conservation_error
from tests.test_units import make_corpus
from tests.tiny import recorded_alone, tiny_handle

TEXT = "Mary went to the river bank and gave the quick brown fox a drink while John read"


def test_jumprelu_threshold_gradient_is_the_derivative_of_the_smoothed_step():
    """The estimator of Rajamanoharan et al.: ∂H(z − θ)/∂θ is the derivative of the step
    smoothed by the rectangle kernel, S(θ) = clip((z − θ)/ε + ½, 0, 1), taken here by finite
    differences; ∂JumpReLU/∂θ is θ times it; pre gets H's true gradient from JumpReLU, none from H."""
    torch.manual_seed(0)
    threshold = torch.full((6,), 0.01, dtype=torch.float64).requires_grad_()
    pre = (0.01 + BANDWIDTH * (torch.rand(50, 6, dtype=torch.float64) - 0.5) * 3).requires_grad_()
    heaviside(pre, threshold).sum().backward()

    def smoothed(theta: float, column: int) -> float:
        return float(((pre[:, column].detach() - theta) / BANDWIDTH + 0.5).clamp(0, 1).sum())

    h = 1e-9
    expected = [(smoothed(0.01 + h, c) - smoothed(0.01 - h, c)) / (2 * h) for c in range(6)]
    assert torch.allclose(threshold.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-4)
    assert pre.grad is None or not pre.grad.any()
    assert (threshold.grad < 0).all()  # raising θ switches features off

    step_grad = threshold.grad.clone()
    threshold.grad, pre.grad = None, None
    upstream = torch.ones(50, 6, dtype=torch.float64)
    out = jump_relu(pre, threshold)
    assert torch.equal(out.detach(), pre.detach() * (pre.detach() > 0.01))
    out.backward(upstream)
    assert torch.allclose(threshold.grad, 0.01 * step_grad)
    assert torch.equal(pre.grad, (pre.detach() > 0.01).double())


@pytest.mark.parametrize("cross_layer", [True, False])
def test_the_training_prediction_is_each_layers_decoder_sum(cross_layer):
    """The model's prediction for layer j equals b_dec_j + sum over i <= j of layer i's
    features times its decoder slice j - i (cross-layer), or layer j's own term, written as a
    plain loop over (i, j) pairs."""
    torch.manual_seed(0)
    n_layers, d_model, n_features, n_tokens = 4, 6, 5, 7
    spec = SparseSpec("jumprelu", n_features, 2, 1, n_tokens, 0)
    model = SparseTranscoders(n_layers, d_model, spec, cross_layer, False, torch.randn(n_layers, d_model),
                              torch.Generator().manual_seed(0))
    with torch.no_grad():
        for w in model.W_dec:
            w.normal_()
        model.log_threshold.fill_(-3.0)
    x = torch.randn(n_layers, n_tokens, d_model)
    prediction, _, _ = model(x)
    pre = torch.einsum("lbd,lfd->lbf", x, model.W_enc) + model.b_enc[:, None]
    features = pre * (pre > model.log_threshold.exp()[:, None])
    for j in range(n_layers):
        expected = model.b_dec[j].expand(n_tokens, d_model).clone()
        for i in range(j + 1):
            if cross_layer or i == j:
                expected += features[i] @ model.W_dec[i][:, j - i]
        torch.testing.assert_close(prediction[j], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_features_start_at_the_target_l0_even_above_torch_quantiles_size_limit(activation):
    """30 layers x 1024 tokens x 1024 features: 31M pre-activations (torch.quantile takes 16M)."""
    model = SparseTranscoders(30, 16, SparseSpec(activation, 1024, 8, 1, 1024, 0), cross_layer=True, skip=False,
                              y_mean=torch.zeros(30, 16), generator=torch.Generator().manual_seed(0))
    x = torch.randn(30, 1024, 16, generator=torch.Generator().manual_seed(1))
    model.start_at_target_l0(x, 8)
    with torch.no_grad():
        pre = torch.einsum("lbd,lfd->lbf", x, model.W_enc) + model.b_enc[:, None]
        on = pre > (model.log_threshold.exp()[:, None] if activation == "jumprelu" else 0)
    assert abs(float(on.float().sum(-1).mean()) - 8) < 0.1  # k / F of the tokens per feature: L0 = k


def fit(tmp_path, name: str, **settings):
    handle = tiny_handle("llama")
    if not (tmp_path / "corpus.txt").exists():
        make_corpus(tmp_path / "corpus.txt", n_docs=400)
    values = {"features": 32, "k": 4, "tokens": 2500, "context": 24, "epochs": 40, **settings}
    reports = fit_transcoders(handle, Corpus(str(tmp_path / "corpus.txt")), tmp_path / name, FitSettings(**values))
    return handle, reports


def mlp_io(handle):
    ids = handle.tokenizer(document_start(handle) + TEXT)["input_ids"]
    x = recorded_alone(handle, ids, lambda parts: parts.mlp_norm)
    y = recorded_alone(handle, ids, lambda parts: parts.mlp_out)
    return [x[i][1:] for i in sorted(x)], [y[i][1:] for i in sorted(y)]  # the document-start token is not fitted


def reconstruction(loaded, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Each MLP output as the set predicts it, from the reader's decoder rows (every feature of
    every layer that writes there), and the mean number of active features per token and layer."""
    n_layers = len(x)
    predicted = [loaded.layers[j].b_dec.clone() + 0 * x[j] for j in range(n_layers)]
    active = 0.0
    for i in range(n_layers):
        features = loaded.encode(i, x[i])
        active += float((features != 0).float().sum(1).mean()) / n_layers
        rows = loaded.decoder_rows(i, torch.arange(loaded.width))  # [F, span, d]
        for slot in range(rows.shape[1]):
            predicted[i + slot] = predicted[i + slot] + features @ rows[:, slot]
        skip = loaded.skip(i, x[i])
        if skip is not None:
            predicted[i] = predicted[i] + skip
    return predicted, active


def fvu(y: torch.Tensor, predicted: torch.Tensor) -> float:
    return float((y - predicted).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_relu_and_jumprelu_sets_fit_load_and_reach_their_target_l0(tmp_path, activation):
    handle, reports = fit(tmp_path, activation, activation=activation)
    loaded = load_transcoders(tmp_path / activation, handle)
    assert loaded.activation == activation and loaded.k is None and loaded.cross_layer is None
    if activation == "jumprelu":
        assert all(t.threshold is not None and (t.threshold > 0).all() for t in loaded.layers)
    x, y = mlp_io(handle)
    predicted, l0 = reconstruction(loaded, x)
    assert all(fvu(y[j], predicted[j]) < 0.9 for j in range(len(y)))  # a fit, not noise: the mean gives 1
    assert 4 / 3 <= l0 <= 4 * 3, l0  # the target L0 is 4
    assert all(r.fvu < 0.9 and 0 <= r.dead_fraction < 1 for r in reports)


def test_a_skip_connection_is_fitted_written_and_read_in_circuit_tracers_orientation(tmp_path):
    handle, _ = fit(tmp_path, "skip", activation="relu", skip=True, epochs=20)
    loaded = load_transcoders(tmp_path / "skip", handle)
    assert all(t.W_skip is not None and t.W_skip.abs().max() > 0 for t in loaded.layers)
    x, y = mlp_io(handle)
    predicted, _ = reconstruction(loaded, x)
    with_skip = [fvu(y[j], predicted[j]) for j in range(len(y))]
    assert all(f < 0.9 for f in with_skip)
    for t in loaded.layers:  # the skip read as written (x @ W_skipᵀ) carries part of the fit
        t.W_skip = None
    without, _ = reconstruction(loaded, x)
    assert all(fvu(y[j], without[j]) > with_skip[j] + 0.05 for j in range(len(y))), with_skip


@pytest.fixture(scope="module")
def cross_layer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clt")
    handle, reports = fit(folder, "clt", kind="clt", activation="jumprelu")
    return handle, folder / "clt", reports


def test_a_fitted_cross_layer_set_writes_every_later_layer_and_draws_a_conserving_graph(cross_layer):
    handle, folder, reports = cross_layer
    loaded = load_transcoders(folder, handle)
    n_layers = handle.adapter.n_layers
    assert loaded.cross_layer is not None and loaded.activation == "jumprelu"
    assert [loaded.span(i) for i in range(n_layers)] == [n_layers - i for i in range(n_layers)]
    x, y = mlp_io(handle)
    predicted, l0 = reconstruction(loaded, x)
    fvus = [fvu(y[j], predicted[j]) for j in range(n_layers)]
    assert all(f < 0.9 for f in fvus), fvus
    assert 4 / 3 <= l0 <= 4 * 3, l0
    # the last MLP output is written by every layer's features: its own layer's alone fit it worse
    last = n_layers - 1
    own = loaded.layers[last].b_dec + loaded.encode(last, x[last]) @ loaded.decoder_rows(
        last, torch.arange(loaded.width))[:, 0]
    assert fvu(y[last], own) > fvus[last]
    written = json.loads((folder / "report.json").read_text())
    assert [r["layer"] for r in written] == list(range(n_layers)) and not (folder / "work").exists()
    graph = feature_graph(handle, TEXT, str(folder), max_nodes=12, batch_size=8)
    assert graph.features and relative_conservation_error(graph) < 1e-4


def test_a_cross_layer_fit_resumed_from_its_checkpoint_equals_an_uninterrupted_one(cross_layer, tmp_path):
    handle, folder, _ = cross_layer
    make_corpus(tmp_path / "corpus.txt", n_docs=400)
    corpus = Corpus(str(tmp_path / "corpus.txt"))
    settings = FitSettings(features=32, k=4, tokens=2500, context=24, epochs=40, kind="clt", activation="jumprelu")

    def stop_mid_run(fraction: float, message: str) -> None:
        if "step 60/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_transcoders(handle, corpus, tmp_path / "resumed", settings, stop_mid_run)
    assert (tmp_path / "resumed" / "work" / "clt_checkpoint.safetensors").exists()
    with pytest.raises(UserInputError, match="no config.yaml"):
        load_transcoders(tmp_path / "resumed")
    resumed_steps: list[str] = []
    fit_transcoders(handle, corpus, tmp_path / "resumed", settings,
                    lambda f, m: resumed_steps.append(m) if "step" in m else None)
    # the checkpoint of epoch 19 (step 57) was the last one written: the rerun goes on from there
    assert "step 60/120" in resumed_steps[0] and not any("step 40/" in m for m in resumed_steps)
    for name in [f"W_enc_{i}.safetensors" for i in range(3)] + [f"W_dec_{i}.safetensors" for i in range(3)]:
        assert (tmp_path / "resumed" / name).read_bytes() == (folder / name).read_bytes()


@pytest.mark.parametrize("settings, message", [
    ({"kind": "xlt"}, "--kind 'xlt'"),
    ({"activation": "gelu"}, "--activation 'gelu'"),
    ({"kind": "clt", "activation": "topk"}, "TopK is per-layer only"),
    ({"kind": "clt", "activation": "relu", "skip": True}, "no skip connection"),
])
def test_bad_fit_settings_get_one_clear_message(tmp_path, settings, message):
    with pytest.raises(UserInputError, match=message):
        fit(tmp_path, "bad", **settings)
    assert not (tmp_path / "bad" / "config.yaml").exists()
