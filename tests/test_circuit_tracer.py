"""Our transcoder-feature graph against circuit-tracer's own ``attribute()`` (0.5.0, run in
.venv-ct by bench/circuit_tracer_child.py; `make test` builds that venv): a tiny Llama saved
to disk, a relu set with skip connections and a cross-layer set, the same tokens (a special token first, which
both treat as the sink).

Layouts: circuit-tracer's adjacency is [active features, L×P errors, P tokens, T logits];
ours [K features, L×P errors, P embeddings, bias, T logits]. With K = every active feature our
error node is exactly theirs, except at the sink, where theirs is zero and ours holds the
MLP's whole output there (we keep what they drop, so conservation holds)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from backend.graphs.features import feature_graph
from backend.replacement.fit import FitSettings, fit_transcoders
from backend.runtime.prompts import encode_prompt
from backend.units.corpus import Corpus
from tests.test_feature_graph import clt_layers, write_clt
from tests.test_graph import PROMPT
from tests.test_transcoders import layer_tensors, write_set
from tests.test_units import make_corpus
from tests.tiny import tiny_handle

CT_PYTHON = Path(__file__).resolve().parents[1] / ".venv-ct" / "bin" / "python"
CHILD = Path(__file__).resolve().parents[1] / "bench" / "circuit_tracer_child.py"

pytestmark = pytest.mark.skipif(not CT_PYTHON.exists(), reason="circuit-tracer's venv is missing: make ct-venv")


def run_circuit_tracer(model_dir: Path, transcoders: Path, ids: list[int], out: Path, **options) -> dict:
    args = [str(CT_PYTHON), str(CHILD), str(model_dir), str(transcoders), ",".join(map(str, ids)), str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    log = out.with_suffix(".log")
    with log.open("w") as stream:
        code = subprocess.call(args, stdout=stream, stderr=subprocess.STDOUT, env={"HF_HUB_OFFLINE": "1"})
    assert code == 0, log.read_text()[-3000:]
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    handle = tiny_handle("llama")
    handle.model.save_pretrained(root / "model")
    handle.tokenizer.save_pretrained(root / "model")
    layers = [layer_tensors(10 + i, d_model=32, skip=True) for i in range(3)]
    for t in layers:  # scaled like a trained set (see test_feature_graph.skip_set)
        t["W_dec"] *= 0.05
        t["W_skip"] *= 0.02
        t["b_dec"] *= 0.05
    write_set(root / "tc", layers)
    write_clt(root / "clt", clt_layers(40))
    make_corpus(root / "corpus.txt", n_docs=400)
    for name, kind in (("fitted-jumprelu", "plt"), ("fitted-clt", "clt")):  # our writers, read by their loaders
        settings = FitSettings(features=32, k=4, tokens=2500, context=24, epochs=10, kind=kind, activation="jumprelu")
        fit_transcoders(handle, Corpus(str(root / "corpus.txt")), root / name, settings)
    prompt = "<eos>" + PROMPT
    return handle, root, prompt, encode_prompt(handle, prompt)


@pytest.mark.parametrize("kind", ["tc", "clt", "fitted-jumprelu", "fitted-clt"])
def test_every_active_feature_graph_equals_circuit_tracers(setup, kind):
    """Per-layer (relu, skip) and cross-layer sets written by hand; JumpReLU sets, per-layer
    and cross-layer, fitted and written by fit-transcoders."""
    handle, root, prompt, ids = setup
    theirs = run_circuit_tracer(root / "model", root / kind, ids, root / f"all-{kind}.npz")
    ours = feature_graph(handle, prompt, str(root / kind), max_nodes=5000)
    n, L, P = len(theirs["active_features"]), ours.n_layers, ours.n_pos
    assert ours.sink == 0
    np.testing.assert_array_equal(np.array(ours.features), theirs["active_features"])
    # TransformerLens and Hugging Face compute in float32 in different orders: agreement to 1e-4 of the scale
    values = theirs["activation_values"]
    np.testing.assert_allclose(ours.activations, values, atol=1e-4 * np.abs(values).max())
    assert [t["id"] for t in ours.logit_targets] == theirs["logit_targets"].tolist()
    np.testing.assert_allclose([t["prob"] for t in ours.logit_targets], theirs["logit_probabilities"], atol=1e-6)

    A = theirs["adjacency"]
    scale = np.abs(A).max()
    rows_ours = list(range(n)) + list(range(ours.logit_slice.start, ours.n_nodes))
    rows_theirs = list(range(n)) + list(range(n + L * P + P, A.shape[0]))
    columns = {
        "features": (list(range(n)), list(range(n))),
        "errors": ([ours.other_index(l, p) for l in range(L) for p in range(1, P)],
                   [n + l * P + p for l in range(L) for p in range(1, P)]),
        "tokens": (list(range(ours.embed_slice.start, ours.embed_slice.stop)), list(range(n + L * P, n + L * P + P))),
    }
    for name, (mine, its) in columns.items():
        difference = np.abs(ours.adjacency[np.ix_(rows_ours, mine)] - A[np.ix_(rows_theirs, its)]).max()
        assert difference < 1e-4 * scale, f"{name}: {difference:.3g} (scale {scale:.3g})"
    assert not A[:, [n + l * P for l in range(L)]].any()  # their sink errors are zero
    assert ours.adjacency[rows_ours][:, [ours.other_index(l, 0) for l in range(L)]].any()  # ours keep them


def test_the_first_batch_selects_the_same_features(setup):
    """With K at most one batch, both choose the K most influential features from the logit
    rows alone; their edges (feature and token columns) agree."""
    handle, root, prompt, ids = setup
    theirs = run_circuit_tracer(root / "model", root / "tc", ids, root / "k12.npz", max_feature_nodes=12,
                                batch_size=32)
    ours = feature_graph(handle, prompt, str(root / "tc"), max_nodes=12, batch_size=32)
    chosen = theirs["active_features"][theirs["selected_features"]]
    np.testing.assert_array_equal(np.array(ours.features), chosen)
    A, k, L, P = theirs["adjacency"], 12, ours.n_layers, ours.n_pos
    rows_ours = list(range(k)) + list(range(ours.logit_slice.start, ours.n_nodes))
    rows_theirs = list(range(k)) + list(range(k + L * P + P, A.shape[0]))
    np.testing.assert_allclose(ours.adjacency[np.ix_(rows_ours, range(k))], A[np.ix_(rows_theirs, range(k))],
                               atol=1e-4 * np.abs(A).max())
    np.testing.assert_allclose(ours.adjacency[np.ix_(rows_ours, range(ours.embed_slice.start, ours.embed_slice.stop))],
                               A[np.ix_(rows_theirs, range(k + L * P, k + L * P + P))], atol=1e-4 * np.abs(A).max())
