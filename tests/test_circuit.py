"""Component circuits (EAP, EAP-IG): exact identities of the component forward, EAP equal to
the brute-force first-order estimate, circuit selection and the JSON contract."""

import json

import numpy as np
import pytest
import torch

from backend.causal.circuit import (
    CircuitResult,
    circuit,
    faithfulness,
    is_scored,
    prune_dangling,
    ranked_edges,
    score_pair,
)
from backend.causal.components import ComponentReplay, component_forward, layout
from backend.causal.pairs import check_pair, make_metric
from backend.cli import main
from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from tests.tiny import tiny_handle

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def test_component_forward_is_the_model_forward(tiny):
    ids = torch.tensor([check_pair(tiny, CLEAN, CORRUPT)[0]])
    mary, john = tiny.tokenizer(" Mary")["input_ids"][0], tiny.tokenizer(" John")["input_ids"][0]
    with torch.no_grad():
        logits = tiny.model(ids).logits[0, -1]
        run = component_forward(tiny, ids, make_metric(tiny, " Mary", " John"))
    assert float(run.value) == pytest.approx(float(logits[mary] - logits[john]), abs=1e-5)
    names = layout(tiny)
    assert run.outputs.shape[0] == len(names.senders) == 1 + tiny.adapter.n_layers * (tiny.adapter.n_heads + 1)
    # the logits read the sum of every sender's output
    torch.testing.assert_close(run.final_read, run.outputs.sum(0), atol=1e-5, rtol=1e-5)


def test_heads_sharing_one_stream_give_the_same_outputs_as_one_copy_per_head(tiny):
    """The unpatched, gradient-free run (heads split only at the output projection) gives
    every sender's output and the metric exactly as the run with a stream per head."""
    ids = torch.tensor([check_pair(tiny, CLEAN, CORRUPT)[0]])
    metric = make_metric(tiny, " Mary", " John")
    with torch.no_grad():
        shared = ComponentReplay(tiny, shared=True).run(ids, metric)
        copied = ComponentReplay(tiny, shared=False).run(ids, metric)
        assert component_forward(tiny, ids, metric).inputs[0].shape[0] == 1  # the default when nothing is patched
    torch.testing.assert_close(shared.outputs, copied.outputs, atol=1e-5, rtol=1e-5)
    assert float(shared.value) == pytest.approx(float(copied.value), abs=1e-5)


@pytest.mark.parametrize("per_position", [False, True])
def test_empty_circuit_is_corrupted_full_circuit_is_clean(tiny, per_position, normalize_small_spans):
    scored = score_pair(tiny, CLEAN, CORRUPT, " Mary", " John")
    ranked = ranked_edges(scored, per_position)
    assert faithfulness(tiny, scored, ranked[:0]) == pytest.approx(0.0, abs=1e-4)
    assert faithfulness(tiny, scored, ranked) == pytest.approx(1.0, abs=1e-4)


def test_is_scored_tells_a_cached_score_from_one_to_compute():
    handle = tiny_handle("gpt2")  # a fresh handle: nothing cached for it yet
    clean, corrupt = CLEAN, CORRUPT
    assert not is_scored(handle, clean, corrupt, " Mary", " John", "eap-ig", 3)
    score_pair(handle, clean, corrupt, " Mary", " John", "eap-ig", steps=3)
    assert is_scored(handle, clean, corrupt, " Mary", " John", "eap-ig", 3)
    assert not is_scored(handle, clean, corrupt, " Mary", " John", "eap-ig", 4)  # other settings: not cached
    assert not is_scored(handle, clean, corrupt, " Mary", " John", "eap", 3)
    assert not is_scored(handle, clean, corrupt, " Mary", " Nobodyxyz", "eap-ig", 3)  # a bad token: not an error


def test_a_corruption_that_barely_moves_the_metric_is_not_normalized(tiny_llama):
    """Tiny random models: the span is far below pairs.MIN_SPAN, so faithfulness is the raw
    change from the corrupted run (full circuit = clean - corrupted) and the result says why."""
    result = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=5, n_random=0, curve_size=2)
    metric = result.metric
    assert not metric["normalized"] and "raw changes are shown" in metric["warning"]
    assert abs(metric["denominator"]) < 1 and metric["denominator"] == pytest.approx(
        metric["clean"] - metric["corrupt"]
    )
    assert result.curve[-1]["faithfulness"] == pytest.approx(metric["denominator"], abs=1e-5)
    assert result.faithfulness_note is None


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_eap_equals_brute_force_first_order(family, normalize_small_spans):
    """score(s->r) = -dm/dt where edge s->r is t * clean + (1 - t) * corrupted, by central
    differences at t = 1 on a float64 copy of the model (its norms still round through float32,
    hence the small absolute tolerance)."""
    handle = tiny_handle(family)
    handle.model.double()
    scored = score_pair(handle, CLEAN, CORRUPT, " Mary", " John", method="eap")
    ranked = ranked_edges(scored, per_position=False)
    n_senders, n_receivers, n_pos = scored.scores.shape
    picked = list(ranked[:4]) + list(ranked[len(ranked) // 2: len(ranked) // 2 + 2]) + [ranked[-1]]

    def metric(sender: int, receiver: int, t: float) -> float:
        keep = torch.ones(n_senders, n_receivers, n_pos, dtype=torch.float64)
        keep[sender, receiver] = t
        with torch.no_grad():
            run = component_forward(handle, scored.clean_ids, scored.metric, keep=keep,
                                    corrupt_outputs=scored.corrupt_outputs)
        return scored.scale(float(run.value))

    eps, floor = 3e-2, 1e-3 * np.abs(scored.scores.sum(-1)).max()
    for sender, receiver in picked:
        brute = -(metric(sender, receiver, 1 + eps) - metric(sender, receiver, 1 - eps)) / (2 * eps)
        score = scored.scores[sender, receiver].sum()
        assert score == pytest.approx(brute, rel=3e-3, abs=floor), (family, sender, receiver)


def independent_eap_ig(handle, steps: int, receiver_site: str, layer: int) -> np.ndarray:
    """EAP-IG scores into one MLP (or, with receiver_site "final", into the logits) written
    from the paper's definition with the plain model: the receiver's input is the residual
    stream that MLP reads (its norm's input), whose gradient is averaged over runs on the
    clean prompt with input embeddings corrupt + k/m (clean - corrupt), k = 0..m-1 (the
    authors' code); sender outputs come from plain runs (heads split at the output
    projection). Returns [senders] summed over positions."""
    adapter = handle.adapter
    clean_ids, corrupt_ids = check_pair(handle, CLEAN, CORRUPT)
    mary, john = handle.tokenizer(" Mary")["input_ids"][0], handle.tokenizer(" John")["input_ids"][0]

    def outputs(ids):
        kept = {}
        hooks = [Hook(adapter.layers[0].block, "pre", lambda m, a: kept.__setitem__("input", a[0][0].clone()))]
        for l, parts in enumerate(adapter.layers):
            hooks.append(Hook(parts.o_proj, "pre", lambda m, a, l=l: kept.__setitem__(("z", l), a[0][0].clone())))
            hooks.append(Hook(parts.mlp, "forward", lambda m, a, o, l=l: kept.__setitem__(("m", l), o[0].clone())))
        with hooked(handle, hooks), torch.no_grad():
            logits = handle.model(torch.tensor([ids])).logits[0, -1]
        rows = [kept["input"]]
        for l in range(adapter.n_layers):
            z = kept[("z", l)].view(len(ids), adapter.n_heads, adapter.head_dim)
            w = adapter.o_proj_weight(l).view(-1, adapter.n_heads, adapter.head_dim)
            rows += list(torch.einsum("phk,dhk->hpd", z, w)) + [kept[("m", l)]]
        return torch.stack(rows), float(logits[mary] - logits[john])

    clean_out, clean_ld = outputs(clean_ids)
    corrupt_out, corrupt_ld = outputs(corrupt_ids)
    reads = adapter.final_norm if receiver_site == "final" else adapter.layers[layer].mlp_norm
    total = torch.zeros_like(clean_out[0])
    for k in range(steps):
        embed = corrupt_out[0] + (k / steps) * (clean_out[0] - corrupt_out[0])
        kept = {}

        def replace(m, a):
            return (embed[None].clone().requires_grad_(True),) + tuple(a[1:])

        def keep(m, a):  # the norm's own copy: its gradient is the MLP path's only, not the skip path's
            kept["read"] = a[0].clone()
            return (kept["read"],) + tuple(a[1:])

        with hooked(handle, [Hook(adapter.layers[0].block, "pre", replace), Hook(reads, "pre", keep)]), \
                torch.enable_grad():
            logits = handle.model(torch.tensor([clean_ids])).logits[0, -1]
            (grad,) = torch.autograd.grad(logits[mary] - logits[john], kept["read"])
        total += grad[0]
    return torch.einsum("spd,pd->s", corrupt_out - clean_out, total / steps).numpy() / (clean_ld - corrupt_ld)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eap_ig_equals_an_independent_implementation(family, normalize_small_spans):
    """Into MLPs and the logits (receivers whose input is one tensor of the plain model)."""
    handle = tiny_handle(family)
    scored = score_pair(handle, CLEAN, CORRUPT, " Mary", " John", "eap-ig", steps=3)
    names = layout(handle)
    for receiver, site, layer in [("m1", "mlp", 1), ("m2", "mlp", 2), ("logits", "final", 0)]:
        r = names.receivers.index(receiver)
        expected = independent_eap_ig(handle, 3, site, layer)
        upstream = names.upstream[r]
        # float32 noise divided by the tiny model's small span (~1e-5 of the largest score)
        np.testing.assert_allclose(scored.scores[:upstream, r].sum(-1), expected[:upstream], rtol=1e-3,
                                   atol=1e-4 * np.abs(expected[:upstream]).max())
    eap = score_pair(handle, CLEAN, CORRUPT, " Mary", " John", "eap")
    assert not np.allclose(eap.scores, scored.scores)
    assert (scored.scores[~scored.allowed] == 0).all()


def reference_prune(names, edges: set) -> set:
    """EAP-IG's Graph.prune, written over sets of (sender, receiver) names: a component stays
    while it sends and receives an edge (the input always receives); an edge stays while its
    sender and its receiver's component (or the logits) stay."""
    while True:
        senders = {s for s, _ in edges}
        receivers = {r for _, r in edges}
        nodes = {n for n in senders if n == "input" or n in receivers}
        kept = {(s, r) for s, r in edges if s in nodes and (r == "logits" or r in nodes)}
        if kept == edges:
            return kept
        edges = kept


def test_dangling_edges_are_pruned_as_eap_ig_does(tiny_llama):
    scored = score_pair(tiny_llama, CLEAN, CORRUPT, " Mary", " John")
    names = layout(tiny_llama)
    ranked = ranked_edges(scored, per_position=False)
    for n in (3, 10, 40, 120):
        ours = {(names.senders[s], names.receivers[r]) for s, r in prune_dangling(names, ranked[:n])}
        top = {(names.senders[s], names.receivers[r]) for s, r in ranked[:n]}
        assert ours == reference_prune(names, top)
    pruned = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=40, n_random=0, curve_size=4)
    unpruned = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=40, n_random=0, curve_size=4, prune=False)
    assert len(unpruned.circuit) == 40 and len(pruned.circuit) < 40
    sending = {e["source"] for e in pruned.circuit}
    receiving = {e["target"] for e in pruned.circuit}
    assert all(e["source"] == "input" or e["source"] in receiving for e in pruned.circuit)
    assert all(e["target"] == "logits" or e["target"] in sending for e in pruned.circuit)


def test_eap_ig_is_the_default(tiny_llama):
    assert circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=5, n_random=0, curve_size=2).method == "eap-ig"


def test_edges_follow_the_forward_order(tiny):
    names = layout(tiny)
    allowed = names.allowed()
    index = {name: i for i, name in enumerate(names.senders)}
    receivers = {name: i for i, name in enumerate(names.receivers)}
    assert allowed[index["input"], receivers["logits"]] and allowed[index["m1"], receivers["logits"]]
    assert allowed[index["a0.h0"], receivers["a1.h1"]] and not allowed[index["a1.h0"], receivers["a1.h1"]]
    assert not allowed[index["m1"], receivers["m0"]]
    assert allowed[index["a1.h0"], receivers["m1"]] == (not tiny.adapter.parallel)


def test_circuit_result_and_json(tiny_llama, tmp_path, normalize_small_spans):
    result = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=10, n_random=3, curve_size=6, prune=False)
    assert len(result.circuit) == 10 and result.circuit == result.edges[:10]
    assert [abs(e["score"]) for e in result.edges] == sorted((abs(e["score"]) for e in result.edges), reverse=True)
    assert len(result.edges) == result.n_edges == int(layout(tiny_llama).allowed().sum())
    sizes = [p["n"] for p in result.curve]
    assert sizes == sorted(sizes) and sizes[0] == 0 and sizes[-1] == result.n_edges and 10 in sizes
    assert result.curve[0]["faithfulness"] == pytest.approx(0, abs=1e-4)
    assert result.curve[-1]["faithfulness"] == pytest.approx(1, abs=1e-4)
    assert len(result.random_faithfulness) == 3
    assert {n["name"] for n in result.nodes} >= {"input", "a0.h0", "m1", "logits"}
    assert CircuitResult.from_json(result.to_json()).to_dict() == result.to_dict()

    target = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", target_faithfulness=0.9, n_random=0, curve_size=6)
    reaching = [p["n"] for p in target.curve if p["faithfulness"] >= 0.9]
    assert target.settings["top_n"] == reaching[0] and target.faithfulness >= 0.9

    per_position = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=5, per_position=True, n_random=0,
                           curve_size=4, prune=False)
    assert all("position" in e for e in per_position.circuit)
    assert per_position.n_edges == result.n_edges * len(result.tokens)


def test_circuit_input_errors(tiny_llama):
    with pytest.raises(UserInputError, match="equal token lengths"):
        circuit(tiny_llama, CLEAN, "When Mary went", " Mary", " John")
    with pytest.raises(UserInputError, match="Unknown method"):
        circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", method="acdc")
    with pytest.raises(UserInputError, match="circuit size"):
        circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=10**9)
    with pytest.raises(UserInputError, match="same token"):
        circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " Mary")


def test_cli_circuit_json(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("backend.cli.get_model", lambda name: tiny_llama)
    out = tmp_path / "circuit.json"
    args = ["circuit", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary", "--wrong", " John",
            "--method", "eap-ig", "--steps", "2", "--top-n", "7", "--n-random", "2", "--no-prune", "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert {"nodes", "edges", "circuit", "faithfulness", "curve"} <= set(data)
    assert set(data["edges"][0]) == {"source", "target", "score"} and len(data["circuit"]) == 7
    assert isinstance(data["faithfulness"], float) and data["method"] == "eap-ig"
    assert main(args[:4] + ["When Mary went"] + args[5:]) == 2
