"""Transcoders: circuit-tracer's formats read as written by hand here, the forward as the
formula says, bad sets refused with one message each, fitting on a tiny model (held-out
FVU, resumable per layer, nothing loadable until complete) and features as units of the
corpus index (against a brute-force scan)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from backend.errors import UserInputError
from backend.replacement.fit import FitSettings, fit_transcoders
from backend.replacement.transcoders import TranscoderFeatures, load_transcoders
from backend.runtime.prompts import document_start
from backend.units.build import build_index
from backend.units.corpus import Corpus
from backend.units.dashboard import unit_dashboard
from backend.units.service import open_index
from tests.test_units import make_corpus
from tests.tiny import recorded_alone, tiny_handle

D_MODEL, WIDTH = 8, 12


def layer_tensors(seed: int, *, threshold: bool = False, skip: bool = False,
                  d_model: int = D_MODEL) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(WIDTH, d_model, generator=g), "W_dec": torch.randn(WIDTH, d_model, generator=g),
               "b_enc": torch.randn(WIDTH, generator=g), "b_dec": torch.randn(d_model, generator=g)}
    if threshold:
        tensors["activation_function.threshold"] = torch.rand(WIDTH, generator=g)
    if skip:
        tensors["W_skip"] = torch.randn(d_model, d_model, generator=g)
    return tensors


def write_set(folder, layers: list[dict], **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, tensors in enumerate(layers):
        save_file(tensors, str(folder / f"layer_{i}.safetensors"))
    spec = {"model_kind": "transcoder_set", "scan": "test", "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out", **config}
    (folder / "config.yaml").write_text(yaml.safe_dump(spec))


def test_relu_jumprelu_and_skip_compute_the_formula(tmp_path):
    x = torch.randn(5, D_MODEL)
    relu = layer_tensors(0, skip=True)
    write_set(tmp_path / "relu", [relu])
    loaded = load_transcoders(tmp_path / "relu")
    assert loaded.activation == "relu"
    pre = x @ relu["W_enc"].T + relu["b_enc"]
    f = loaded.encode(0, x)
    torch.testing.assert_close(f, pre.clamp(min=0))
    torch.testing.assert_close(loaded.decode(0, f, x), f @ relu["W_dec"] + relu["b_dec"] + x @ relu["W_skip"].T)

    jump = layer_tensors(1, threshold=True)
    pre = x @ jump["W_enc"].T + jump["b_enc"]
    jump["activation_function.threshold"][3] = float(pre[0, 3])  # exactly at the threshold: off (strict >)
    write_set(tmp_path / "jump", [jump])
    loaded = load_transcoders(tmp_path / "jump")
    assert loaded.activation == "jumprelu"
    f = loaded.encode(0, x)
    assert f[0, 3] == 0
    expected = torch.where(pre > jump["activation_function.threshold"], pre, torch.zeros_like(pre))
    torch.testing.assert_close(f, expected)


def test_topk_keeps_the_k_largest_pre_activations_signed_or_rectified(tmp_path):
    tensors = layer_tensors(2)
    tensors["b_enc"] -= 2.0  # many negative pre-activations: the two TopK kinds differ
    x = torch.randn(6, D_MODEL)
    pre = (x @ tensors["W_enc"].T + tensors["b_enc"]).numpy()
    for activation in ("topk", "relu_topk"):
        write_set(tmp_path / activation, [tensors], activation=activation, k=3)
        f = load_transcoders(tmp_path / activation).encode(0, x).numpy()
        for row in range(6):
            top = np.argsort(-pre[row])[:3]
            expected = np.zeros(WIDTH, dtype=np.float32)
            expected[top] = pre[row, top] if activation == "topk" else np.maximum(pre[row, top], 0)
            np.testing.assert_allclose(f[row], expected, rtol=1e-6)
    assert (pre < 0).sum(1).max() > WIDTH - 3  # some token had a negative value among its top 3


def test_gemmascope_npz_and_gemmascope2_read_as_the_same_weights(tmp_path):
    t = layer_tensors(3, threshold=True)
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", W_enc=t["W_enc"].T.numpy(), W_dec=t["W_dec"].numpy(),
             b_enc=t["b_enc"].numpy(), b_dec=t["b_dec"].numpy(), threshold=t["activation_function.threshold"].numpy())
    (tmp_path / "gs" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "blocks.0.ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": ["params.npz"]}))
    skip = torch.randn(D_MODEL, D_MODEL)
    (tmp_path / "gs2").mkdir()
    save_file({"w_enc": t["W_enc"].T.contiguous(), "w_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
               "threshold": t["activation_function.threshold"], "affine_skip_connection": skip.T.contiguous()},
              str(tmp_path / "gs2" / "l0.safetensors"))
    (tmp_path / "gs2" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "transcoders": ["l0.safetensors"]}))
    for name in ("gs", "gs2"):
        layer = load_transcoders(tmp_path / name).layers[0]
        torch.testing.assert_close(layer.W_enc, t["W_enc"])
        torch.testing.assert_close(layer.threshold, t["activation_function.threshold"])
    torch.testing.assert_close(load_transcoders(tmp_path / "gs2").layers[0].W_skip, skip)


@pytest.mark.parametrize("break_it, message", [
    (lambda f: (f / "config.yaml").unlink(), "no config.yaml"),
    (lambda f: (f / "layer_1.safetensors").unlink(), "layer_1.safetensors is missing"),
    (lambda f: [(f / name).unlink() for name in ("layer_1.safetensors", "layer_2.safetensors")
                if (f / name).exists()], "has 1 layers"),
    (lambda f: _rewrite(f, activation="gelu"), "unknown activation"),
    (lambda f: _rewrite(f, activation="topk"), "needs an integer k"),
    (lambda f: _rewrite(f, model_kind="cross_layer_transcoder"), "cross-layer"),
    (lambda f: _rewrite(f, feature_input_hook="attn.hook_z"), "feature_input_hook"),
    (lambda f: _rewrite(f, transcoders=["layer_0.safetensors", "missing.safetensors"]), "missing"),
    (lambda f: _rewrite(f, transcoders=["layer_0.safetensors", "weights.pt"]), "pickles are never loaded"),
    (lambda f: (f / "layer_1.safetensors").write_bytes((f / "layer_1.safetensors").read_bytes()[:200]),
     "truncated"),
    (lambda f: _with(f, "layer_1.safetensors", b_dec=torch.zeros(3)), "b_dec has shape"),
])
def test_bad_sets_get_one_clear_message(tmp_path, break_it, message):
    handle = tiny_handle("llama")
    folder = tmp_path / "set"
    layers = [layer_tensors(i, d_model=handle.adapter.d_model) for i in range(handle.adapter.n_layers)]
    write_set(folder, layers)
    (folder / "weights.pt").write_bytes(b"not a pickle we would ever open")
    load_transcoders(folder, handle)  # the intact set fits the model
    break_it(folder)
    with pytest.raises(UserInputError, match=message):
        load_transcoders(folder, handle)


def _with(folder, name: str, **changes) -> None:
    from safetensors.torch import load_file

    save_file({**load_file(str(folder / name)), **changes}, str(folder / name))


def _rewrite(folder, **changes) -> None:
    spec = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**spec, **changes}))


def test_a_set_for_another_model_is_refused(tmp_path):
    write_set(tmp_path, [layer_tensors(i) for i in range(2)])
    handle = tiny_handle("llama")
    with pytest.raises(UserInputError, match="layers|size"):
        load_transcoders(tmp_path, handle)


SETTINGS = FitSettings(features=32, k=4, tokens=2500, context=24, epochs=40)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    handle = tiny_handle("llama")
    folder = tmp_path_factory.mktemp("fit")
    make_corpus(folder / "corpus.txt", n_docs=400)
    reports = fit_transcoders(handle, Corpus(str(folder / "corpus.txt")), folder / "set", SETTINGS)
    return handle, folder, reports


def test_a_fitted_set_loads_and_reconstructs_the_mlp(fitted):
    handle, folder, reports = fitted
    loaded = load_transcoders(folder / "set", handle)
    assert loaded.activation == "relu_topk" and loaded.k == SETTINGS.k and loaded.width == SETTINGS.features
    assert len(reports) == handle.adapter.n_layers
    assert all(0 <= r.dead_fraction <= 1 and r.held_out_tokens > 0 for r in reports)
    # held-out FVU, recomputed independently: run a prompt, read the MLP's input and output by hooks
    # registered here on the modules, and compare the set's prediction with the real output
    ids = handle.tokenizer(document_start(handle) + "Mary went to the river bank and gave the quick brown fox "
                                                    "a drink")["input_ids"]
    x = recorded_alone(handle, ids, lambda parts: parts.mlp_norm)[0][1:]
    y = recorded_alone(handle, ids, lambda parts: parts.mlp_out)[0][1:]
    predicted = loaded.decode(0, loaded.encode(0, x), x)
    fvu = float((y - predicted).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.9, fvu  # a fit, not noise: predicting the mean would give 1
    assert reports[0].fvu < 0.9
    written = json.loads((folder / "set" / "report.json").read_text())
    assert [r["layer"] for r in written] == list(range(handle.adapter.n_layers))
    assert not (folder / "set" / "work").exists()


def test_an_interrupted_fit_is_not_a_set_and_resumes_per_layer(tmp_path):
    handle = tiny_handle("llama")
    make_corpus(tmp_path / "corpus.txt", n_docs=400)
    corpus = Corpus(str(tmp_path / "corpus.txt"))
    out = tmp_path / "set"
    settings = FitSettings(features=16, k=2, tokens=2500, context=24, epochs=1)

    def stop_in_layer_1(fraction: float, message: str) -> None:
        if message.startswith("Layer 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_transcoders(handle, corpus, out, settings, stop_in_layer_1)
    assert (out / "layer_0.safetensors").exists() and not (out / "layer_1.safetensors").exists()
    with pytest.raises(UserInputError, match="no config.yaml"):
        load_transcoders(out)
    first = (out / "layer_0.safetensors").read_bytes()
    with pytest.raises(UserInputError, match="other settings"):
        fit_transcoders(handle, corpus, out, FitSettings(features=16, k=3, tokens=2500, context=24, epochs=1))
    layers_trained = []
    fit_transcoders(handle, corpus, out, settings,
                    lambda f, m: layers_trained.append(m.split(":")[0]) if m.startswith("Layer") else None)
    assert "Layer 1/3" not in layers_trained and "Layer 2/3" in layers_trained  # layer 0 was not refitted
    assert (out / "layer_0.safetensors").read_bytes() == first
    load_transcoders(out, handle)


def test_too_small_a_corpus_is_refused(tmp_path):
    handle = tiny_handle("llama")
    make_corpus(tmp_path / "corpus.txt", n_docs=5)
    with pytest.raises(UserInputError, match="usable tokens"):
        fit_transcoders(handle, Corpus(str(tmp_path / "corpus.txt")), tmp_path / "set", SETTINGS)
    assert not (tmp_path / "set" / "config.yaml").exists()


def test_features_are_units_of_the_corpus_index(fitted):
    """The index of features: each feature's corpus maximum equals a brute-force scan (every
    document alone, the MLP input read by a hook on the norm, encoded by the set)."""
    handle, folder, _ = fitted
    features = TranscoderFeatures(load_transcoders(folder / "set", handle))
    docs = make_corpus(folder / "small.txt", n_docs=30, seed=1)
    directory = build_index(handle, Corpus(str(folder / "small.txt")), context=24, tokens=5000, units=features,
                            directory=folder / "index", batch_tokens=64)
    index = open_index(directory)
    assert (index.n_layers, index.width) == (handle.adapter.n_layers, SETTINGS.features)
    expected = np.full((handle.adapter.n_layers, SETTINGS.features), -np.inf)
    for text in docs:
        ids = handle.tokenizer(document_start(handle) + text)["input_ids"][:24]
        inputs = recorded_alone(handle, ids, lambda parts: parts.mlp_norm)
        for layer, x in inputs.items():
            acts = features.transcoders.encode(layer, x[1:]).numpy()  # position 0 is the sink
            expected[layer] = np.maximum(expected[layer], acts.max(0))
    for layer in range(handle.adapter.n_layers):
        for feature in range(SETTINGS.features):
            top = index.examples("top", layer, feature)
            if expected[layer, feature] > 0:
                assert top[0]["act"] == pytest.approx(expected[layer, feature], rel=1e-4, abs=1e-5)
    dashboard = unit_dashboard(handle, index, 0, int(np.argmax(expected[0])), units=features)
    assert dashboard.kind == "feature" and dashboard.name.startswith("L0/F")
    assert dashboard.max_act == pytest.approx(float(expected[0].max()), rel=1e-4)


def _wait(job, seconds: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while job.state == "fitting" and time.monotonic() < deadline:
        time.sleep(0.05)


def test_background_fit_stops_resumes_and_holds_one_fit_per_folder(tmp_path):
    """The graph page's Fit button: a background job that Stop interrupts (nothing loads), a
    second start resumes to a complete set; a folder another fit holds is refused."""
    from backend.replacement.service import ensure_fitting, fit_status, stop_fitting
    from backend.units.build import exclusive

    handle = tiny_handle("llama")
    make_corpus(tmp_path / "corpus.txt", n_docs=400)
    corpus = Corpus(str(tmp_path / "corpus.txt"))
    folder = tmp_path / "set"
    settings = FitSettings(features=16, k=3, tokens=2500, context=24, epochs=2)
    assert fit_status(folder)["state"] == "missing"
    with exclusive(folder):
        with pytest.raises(UserInputError, match="Another process"):
            fit_transcoders(handle, corpus, folder, settings)
    job = ensure_fitting(handle, folder, settings, corpus)
    stop_fitting(folder)
    _wait(job)
    assert job.state == "cancelled" and not (folder / "config.yaml").exists()
    assert fit_status(folder)["state"] == "cancelled"
    job = ensure_fitting(handle, folder, settings, corpus)
    assert ensure_fitting(handle, folder, settings, corpus) is job or job.state != "fitting"  # one job per folder
    _wait(job)
    assert job.state == "done", job.message
    assert fit_status(folder)["state"] == "ready"
    assert len(load_transcoders(folder, handle).layers) == 3
