"""Component circuits (EAP, EAP-IG): exact identities of the component forward, EAP equal to
the brute-force first-order estimate, circuit selection and the JSON contract."""

import json

import numpy as np
import pytest
import torch

from backend.cli import main
from backend.causal.circuit import (
    CircuitResult,
    circuit,
    component_forward,
    faithfulness,
    layout,
    ranked_edges,
    score_pair,
)
from backend.errors import UserInputError
from backend.causal.patching import _logit_difference, check_pair
from backend.runtime.prompts import resolve_token
from tests.tiny import tiny_handle

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def test_component_forward_is_the_model_forward(tiny):
    ids = torch.tensor([check_pair(tiny, CLEAN, CORRUPT)[0]])
    answer, wrong = resolve_token(tiny, " Mary"), resolve_token(tiny, " John")
    with torch.no_grad():
        plain = _logit_difference(tiny, tiny.adapter.base(ids, use_cache=False).last_hidden_state, answer, wrong)[0]
        run = component_forward(tiny, ids, answer, wrong)
    assert float(run.ld) == pytest.approx(float(plain), abs=1e-5)
    names = layout(tiny)
    assert run.outputs.shape[0] == len(names.senders) == 1 + tiny.adapter.n_layers * (tiny.adapter.n_heads + 1)
    # the logits read the sum of every sender's output
    torch.testing.assert_close(run.final_read, run.outputs.sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_position", [False, True])
def test_empty_circuit_is_corrupted_full_circuit_is_clean(tiny, per_position):
    scored = score_pair(tiny, CLEAN, CORRUPT, " Mary", " John")
    ranked = ranked_edges(scored, per_position)
    assert faithfulness(tiny, scored, ranked[:0]) == pytest.approx(0.0, abs=1e-4)
    assert faithfulness(tiny, scored, ranked) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_eap_equals_brute_force_first_order(family):
    """score(s->r) = -dm/dt where edge s->r is t * clean + (1 - t) * corrupted, by central
    differences at t = 1 on a float64 copy of the model (its norms still round through float32,
    hence the small absolute tolerance)."""
    handle = tiny_handle(family)
    handle.model.double()
    scored = score_pair(handle, CLEAN, CORRUPT, " Mary", " John")
    ranked = ranked_edges(scored, per_position=False)
    n_senders, n_receivers, n_pos = scored.scores.shape
    picked = list(ranked[:4]) + list(ranked[len(ranked) // 2: len(ranked) // 2 + 2]) + [ranked[-1]]

    def metric(sender: int, receiver: int, t: float) -> float:
        keep = torch.ones(n_senders, n_receivers, n_pos, dtype=torch.float64)
        keep[sender, receiver] = t
        with torch.no_grad():
            run = component_forward(handle, scored.clean_ids, scored.answer, scored.wrong, keep=keep,
                                    corrupt_outputs=scored.corrupt_outputs)
        return scored.normalized(float(run.ld))

    eps, floor = 3e-2, 1e-3 * np.abs(scored.scores.sum(-1)).max()
    for sender, receiver in picked:
        brute = -(metric(sender, receiver, 1 + eps) - metric(sender, receiver, 1 - eps)) / (2 * eps)
        score = scored.scores[sender, receiver].sum()
        assert score == pytest.approx(brute, rel=3e-3, abs=floor), (family, sender, receiver)


def test_eap_ig_with_one_step_is_eap(tiny_llama):
    eap = score_pair(tiny_llama, CLEAN, CORRUPT, " Mary", " John", "eap")
    ig1 = score_pair(tiny_llama, CLEAN, CORRUPT, " Mary", " John", "eap-ig", steps=1)
    ig3 = score_pair(tiny_llama, CLEAN, CORRUPT, " Mary", " John", "eap-ig", steps=3)
    np.testing.assert_allclose(ig1.scores, eap.scores, atol=1e-7)
    assert not np.allclose(ig3.scores, eap.scores)
    assert (ig3.scores[~ig3.allowed] == 0).all()


def test_edges_follow_the_forward_order(tiny):
    names = layout(tiny)
    allowed = names.allowed()
    index = {name: i for i, name in enumerate(names.senders)}
    receivers = {name: i for i, name in enumerate(names.receivers)}
    assert allowed[index["input"], receivers["logits"]] and allowed[index["m1"], receivers["logits"]]
    assert allowed[index["a0.h0"], receivers["a1.h1"]] and not allowed[index["a1.h0"], receivers["a1.h1"]]
    assert not allowed[index["m1"], receivers["m0"]]
    assert allowed[index["a1.h0"], receivers["m1"]] == (not tiny.adapter.parallel)


def test_circuit_result_and_json(tiny_llama, tmp_path):
    result = circuit(tiny_llama, CLEAN, CORRUPT, " Mary", " John", top_n=10, n_random=3, curve_size=6)
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
                           curve_size=4)
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
            "--method", "eap-ig", "--steps", "2", "--top-n", "7", "--random", "2", "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert {"nodes", "edges", "circuit", "faithfulness", "curve"} <= set(data)
    assert set(data["edges"][0]) == {"source", "target", "score"} and len(data["circuit"]) == 7
    assert isinstance(data["faithfulness"], float) and data["method"] == "eap-ig"
    assert main(args[:4] + ["When Mary went"] + args[5:]) == 2
