"""The corpus index on the real model and the default corpus (a 20k-token index, see conftest)."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from backend.cli import main
from backend.runtime.prompts import token_texts, with_bos
from backend.units.search import fires_on

# Country, city and nationality words of the corpus's era span, compared lower-cased and stripped.
PLACES = set("""america american americans france french paris london england english britain british germany german
berlin rome italy italian spain spanish mexico mexican canada canadian china chinese japan japanese russia russian
soviet india indian cuba cuban israel egypt iraq iran afghanistan vietnam korea korean europe european asia asian
africa african texas california york washington chicago boston philadelphia virginia florida ohio columbia panama
philippines hawaii alaska moscow beijing tokyo brazil argentina chile peru venezuela nicaragua haiti greece turkey
poland ukraine syria libya kuwait pakistan""".split())


def neuron_acts(handle, ids: list[int]) -> torch.Tensor:
    """[layers, positions, d_mlp] from hooks registered directly on the down projections."""
    kept = {}
    removers = [parts.down_proj.register_forward_pre_hook(
        lambda module, args, layer=layer: kept.__setitem__(layer, args[0][0].detach().clone()))
        for layer, parts in enumerate(handle.adapter.layers)]
    try:
        with handle.lock, torch.no_grad():
            handle.model(torch.tensor([ids]))
    finally:
        for remover in removers:
            remover.remove()
    return torch.stack([kept[layer] for layer in range(len(kept))])


def test_every_reported_example_is_what_the_model_computes(smollm2, smollm2_index):
    index = smollm2_index
    rng = random.Random(0)
    units = [(rng.randrange(index.n_layers), rng.randrange(index.width)) for _ in range(2)]
    checked = 0
    for layer, unit in units:
        for group in ("top", "bins"):
            for example in index.examples(group, layer, unit):
                ids = index.doc_ids(example["doc"]).tolist()
                if group == "bins":
                    ids = ids[:example["pos"] + 1]  # causal: the prefix decides the activation there
                acts = neuron_acts(smollm2, ids)[layer, :, unit]
                assert float(acts[example["pos"]]) == pytest.approx(example["act"], rel=1e-3, abs=1e-4)
                if group == "top":  # the maximum of its document (the sink excluded)
                    assert float(acts[1:].max()) == pytest.approx(example["act"], rel=1e-3, abs=1e-4)
                checked += 1
    assert checked >= 2 * 20


def _place_hits(handle, index, layer: int, unit: int) -> int:
    """How many of the unit's top examples have a place name at their maximum or beside it."""
    hits = 0
    for example in index.examples("top", layer, unit):
        ids = index.doc_ids(example["doc"])
        pos = example["pos"]
        around = token_texts(handle, [int(i) for i in ids[max(0, pos - 1):pos + 2]])
        hits += any(token.strip().lower() in PLACES for token in around)
    return hits


def test_neurons_firing_on_paris_have_place_names_in_their_top_examples(smollm2, smollm2_index):
    """Measured on the 20k-token index: the top 20 neurons for " Paris" had 32 of their 400
    top examples at (or beside) a place name, 20 random neurons 7.9 (mean of 10 draws of 20)."""
    result = fires_on(smollm2, with_bos(smollm2, "The capital of France is Paris"), -1, index=smollm2_index, k=20)
    assert result.query["token"] == " Paris"
    found = sum(_place_hits(smollm2, smollm2_index, u["layer"], u["neuron"]) for u in result.units)
    rng = random.Random(0)
    draws = [(rng.randrange(smollm2_index.n_layers), rng.randrange(smollm2_index.width)) for _ in range(200)]
    random_per_20 = sum(_place_hits(smollm2, smollm2_index, *d) for d in draws) / 10
    print(f"place names among top examples: search {found}/400, random {random_per_20:.1f}/400")
    assert found > 2 * random_per_20


def test_neuron_cli_contract(smollm2, smollm2_index, tmp_path):
    out = tmp_path / "neuron.json"
    assert main(["neuron", "--layer", "15", "--neuron", "1349", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for key, kind in (("label", str), ("density", float), ("top_examples", list), ("bin_examples", list),
                      ("histogram", dict), ("top_logits", list), ("bottom_logits", list)):
        assert isinstance(data[key], kind), key
    assert data["label"]
    tops = data["top_examples"]
    assert len(tops) == 20 and [e["max_act"] for e in tops] == sorted((e["max_act"] for e in tops), reverse=True)
    for example in tops[:5]:
        assert example["acts"][example["max_pos"]] == example["max_act"]
        assert len(example["tokens"]) == len(example["acts"])
        recomputed = neuron_acts(smollm2, smollm2_index.doc_ids(example["doc"]).tolist())[15, :, 1349]
        assert float(recomputed[example["start"] + example["max_pos"]]) == pytest.approx(example["max_act"], rel=1e-3)
    assert all(isinstance(t, str) and isinstance(v, float) for t, v in data["top_logits"])
    assert 0 < data["density"] < 1


def test_search_cli_and_bad_input(smollm2, smollm2_index, tmp_path, capsys):
    out = tmp_path / "search.json"
    assert main(["search", "--text", "The capital of France is Paris", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["query"]["token"] == " Paris"
    first = data["units"][0]
    assert {"layer", "neuron", "activation", "label"} <= set(first) and first["label"]
    assert main(["search", "--text", "Paris", "--position", "40", "--out", str(out)]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["neuron", "--layer", "99", "--neuron", "0", "--out", str(out)]) == 2
    assert main(["neuron", "--layer", "0", "--neuron", "0", "--corpus", str(tmp_path / "nope.txt"),
                 "--out", str(out)]) == 2


def test_a_unit_lookup_is_fast(smollm2, smollm2_index):
    """Generous bound (the bench measures it): reading one unit's examples, bins and histogram."""
    started = time.perf_counter()
    for unit in range(20):
        smollm2_index.examples("top", 12, unit)
        smollm2_index.examples("bins", 12, unit)
        smollm2_index.histogram(12, unit)
    assert (time.perf_counter() - started) / 20 < 0.5
