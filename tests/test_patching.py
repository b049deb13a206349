"""Patching: exact equals independent forwards, AtP equals the brute-force first-order term,
RelP is AtP through the LRP-linearized model."""

import numpy as np
import pytest
import torch

from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from backend.causal.patching import (
    SITES,
    _logit_difference,
    _run_clean,
    check_pair,
    patch_one,
    patching,
    propose_corruption,
)
from backend.runtime.prompts import resolve_token

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def ld(handle, ids) -> float:
    answer, wrong = resolve_token(handle, " Mary"), resolve_token(handle, " John")
    with torch.no_grad():
        logits = handle.model(torch.tensor([ids])).logits[0, -1]
    return float(logits[answer] - logits[wrong])


@pytest.fixture(scope="module")
def result_llama(tiny_llama):
    return patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", batch_size=16)


def test_exact_embedding_patch_equals_swapping_the_token(tiny):
    """resid_pre at layer 0, position p = the corrupted prompt with token p taken from the clean one."""
    result = patching(tiny, CLEAN, CORRUPT, " Mary", " John", methods=("exact",), batch_size=50)
    clean_ids, corrupt_ids = check_pair(tiny, CLEAN, CORRUPT)
    clean_ld, corrupt_ld = ld(tiny, clean_ids), ld(tiny, corrupt_ids)
    assert result.metric["clean"] == pytest.approx(clean_ld, abs=1e-4)
    for pos in range(len(clean_ids)):
        swapped = list(corrupt_ids)
        swapped[pos] = clean_ids[pos]
        expected = (ld(tiny, swapped) - corrupt_ld) / (clean_ld - corrupt_ld)
        assert result.grids["resid_pre"]["exact"][0][pos] == pytest.approx(expected, abs=1e-3)


def test_exact_patching_invariants(result_llama, tiny_llama):
    clean_ids, corrupt_ids = check_pair(tiny_llama, CLEAN, CORRUPT)
    first_diff = next(i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b)
    for site in ("resid_pre", "attn_out", "mlp_out"):
        grid = np.asarray(result_llama.grids[site]["exact"])
        assert np.abs(grid[:, :first_diff]).max() < 1e-5  # identical activations before the change
    grid = np.asarray(result_llama.grids["resid_pre"]["exact"])
    # the last position's residual stream carries everything the output reads
    last = patch_one(tiny_llama, CLEAN, CORRUPT, " Mary", " John", "resid_pre", tiny_llama.adapter.n_layers - 1, len(clean_ids) - 1)
    assert last["normalized"] == pytest.approx(grid[-1, -1], abs=1e-5)


def test_atp_equals_the_finite_difference_first_order_term(result_llama, tiny_llama):
    clean_ids, corrupt_ids = check_pair(tiny_llama, CLEAN, CORRUPT)
    answer, wrong = resolve_token(tiny_llama, " Mary"), resolve_token(tiny_llama, " John")
    cache, _ = _run_clean(tiny_llama, torch.tensor([clean_ids]), answer, wrong)
    corrupt_cache, _ = _run_clean(tiny_llama, torch.tensor([corrupt_ids]), answer, wrong)
    span = result_llama.metric["clean"] - result_llama.metric["corrupt"]
    adapter = tiny_llama.adapter
    for site, layer, index in [("resid_pre", 1, 9), ("attn_out", 2, 13), ("mlp_out", 0, 9), ("heads", 1, 2)]:
        def run(eps: float) -> float:
            module = {"resid_pre": adapter.layers[layer].block, "attn_out": adapter.layers[layer].attn_out,
                      "mlp_out": adapter.layers[layer].mlp_out, "heads": adapter.layers[layer].o_proj}[site]
            delta = cache[site][layer] - corrupt_cache[site][layer]

            def nudge(tensor):
                tensor = tensor.clone()
                if site == "heads":
                    h = slice(index * adapter.head_dim, (index + 1) * adapter.head_dim)
                    tensor[0, :, h] += eps * delta[:, h]
                else:
                    tensor[0, index] += eps * delta[index]
                return tensor

            if site in ("resid_pre", "heads"):
                hook = Hook(module, "pre", lambda m, args: (nudge(args[0]),) + tuple(args[1:]))
            else:
                hook = Hook(module, "forward", lambda m, a, out: (nudge(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else nudge(out))
            with hooked(tiny_llama, [hook]), torch.no_grad():
                final = adapter.base(torch.tensor([corrupt_ids])).last_hidden_state
            return float(_logit_difference(tiny_llama, final, answer, wrong)[0])

        eps = 1e-2
        derivative = (run(eps) - run(-eps)) / (2 * eps) / span
        assert result_llama.grids[site]["atp"][layer][index] == pytest.approx(derivative, rel=1e-2, abs=1e-4)


def test_relp_with_frozen_attention_differs_and_everything_correlates(tiny_llama, result_llama):
    frozen = patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", methods=("relp",), freeze_attention=True)
    assert not np.allclose(frozen.grids["heads"]["relp"], result_llama.grids["heads"]["relp"])
    assert set(result_llama.pearson) == set(SITES)
    assert all(-1 <= r <= 1 for rs in result_llama.pearson.values() for r in rs.values() if r is not None)
    assert set(result_llama.seconds) == {"exact", "atp", "relp"}
    shapes = {site: np.asarray(result_llama.grids[site]["exact"]).shape for site in SITES}
    assert shapes["heads"] == (tiny_llama.adapter.n_layers, tiny_llama.adapter.n_heads)


def test_bad_pairs_are_refused(tiny_llama):
    with pytest.raises(UserInputError, match="equal token lengths"):
        patching(tiny_llama, CLEAN, "When Mary went", " Mary", " John")
    with pytest.raises(UserInputError, match="same"):
        patching(tiny_llama, CLEAN, CLEAN, " Mary", " John")
    with pytest.raises(UserInputError):
        patching(tiny_llama, CLEAN, CORRUPT, " Mary", " Mary")
    with pytest.raises(UserInputError):
        patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", methods=("magic",))


def test_propose_corruption_swaps_the_repeated_name_or_a_word_of_the_same_length(tiny_llama):
    assert propose_corruption(CLEAN) == CORRUPT
    france = "The capital of France is"
    corrupted = propose_corruption(france, tiny_llama)
    assert corrupted != france and corrupted.startswith("The capital of ") and corrupted.endswith(" is")
    assert len(check_pair(tiny_llama, france, corrupted)[1]) == len(tiny_llama.tokenizer(france)["input_ids"])
    with pytest.raises(UserInputError):
        propose_corruption("the cat sat on the mat")


def test_result_json_round_trip(result_llama):
    from backend.causal.patching import PatchResult

    again = PatchResult.from_json(result_llama.to_json())
    assert again.to_json() == result_llama.to_json()
