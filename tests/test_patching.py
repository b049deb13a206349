"""Patching: exact equals independent forwards, AtP equals the brute-force first-order term,
RelP equals the LRP rules applied by an independent forward (tests/manual.py); pairs, their
default tokens and the refusal to normalize a metric the corruption barely moves."""

import time

import numpy as np
import pytest
import torch

from backend.causal import patching as patching_module
from backend.causal.pairs import MIN_SPAN, check_pair, default_answer_wrong, make_scale, propose_corruption
from backend.causal.patching import PatchResult, exact_grid, patch_one, patching, prepare_pair
from backend.errors import UserInputError
from backend.runtime.hooks import Hook, hooked
from backend.runtime.prompts import resolve_token
from tests.manual import ManualModel
from tests.tiny import tiny_handle

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def ld(handle, ids) -> float:
    answer, wrong = resolve_token(handle, " Mary"), resolve_token(handle, " John")
    with torch.no_grad():
        logits = handle.model(torch.tensor([ids])).logits[0, -1]
    return float(logits[answer] - logits[wrong])


@pytest.fixture
def result_llama(tiny_llama, normalize_small_spans):
    return patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", batch_size=16)


def test_exact_embedding_patch_equals_swapping_the_token(tiny, normalize_small_spans):
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
    last = patch_one(tiny_llama, CLEAN, CORRUPT, " Mary", " John", "resid_pre", tiny_llama.adapter.n_layers - 1,
                     len(clean_ids) - 1)
    assert last["scaled"] == pytest.approx(grid[-1, -1], abs=1e-5)


def _patched_logit_diff(handle, site: str, layer: int, index: int, clean_ids, corrupt_ids) -> float:
    """One whole forward of the corrupted prompt with one site's value at one position (for
    heads: one head's slice of the output projection's input at every position) taken from a
    separate clean run: plain torch hooks, no batch, no cache, nothing skipped."""
    where = handle.adapter.site(site, layer)
    pre = where.kind == "pre"
    width = handle.adapter.head_dim
    cell = (0, slice(None), slice(index * width, (index + 1) * width)) if site == "heads" else (0, index)
    kept = {}

    def edit(value, patch: bool):
        tensor = value[0] if isinstance(value, tuple) else value
        if not patch:
            kept["clean"] = tensor[cell].clone()
            return value
        tensor = tensor.clone()
        tensor[cell] = kept["clean"]
        return (tensor,) + tuple(value[1:]) if isinstance(value, tuple) else tensor

    for patch, ids in ((False, clean_ids), (True, corrupt_ids)):
        if pre:
            hook = where.module.register_forward_pre_hook(lambda module, args: edit(args, patch))
        else:
            hook = where.module.register_forward_hook(lambda module, args, output: edit(output, patch))
        try:
            value = ld(handle, ids)
        finally:
            hook.remove()
    return value


def test_exact_grids_equal_one_whole_patched_forward_per_cell(tiny, normalize_small_spans):
    """Every cell of every site, on every family, against its own whole patched forward
    (catches a cached prefix that is wrong or mislaid, a patch written at the wrong offset, a
    cell skipped as unchanged that was not)."""
    clean_ids, corrupt_ids = check_pair(tiny, CLEAN, CORRUPT)
    result = patching(tiny, CLEAN, CORRUPT, " Mary", " John", methods=("exact",), batch_size=3)
    for site in patching_module.SITES:  # compared raw: tiny models' spans are ~1e-3
        raw = result.grids[site]["exact"] * result.metric["denominator"] + result.metric["corrupt"]
        columns = tiny.adapter.n_heads if site == "heads" else len(clean_ids)
        expected = [[_patched_logit_diff(tiny, site, layer, i, clean_ids, corrupt_ids) for i in range(columns)]
                    for layer in range(tiny.adapter.n_layers)]
        np.testing.assert_allclose(raw, expected, rtol=0, atol=2e-6, err_msg=site)


def test_atp_equals_the_finite_difference_first_order_term(result_llama, tiny_llama):
    pair = prepare_pair(tiny_llama, CLEAN, CORRUPT, " Mary", " John")
    corrupt_pair = prepare_pair(tiny_llama, CORRUPT, CLEAN, " Mary", " John")  # its clean_acts = the corrupted run's
    span = result_llama.metric["clean"] - result_llama.metric["corrupt"]
    answer, wrong = resolve_token(tiny_llama, " Mary"), resolve_token(tiny_llama, " John")
    adapter = tiny_llama.adapter
    for site, layer, index in [("resid_pre", 1, 9), ("attn_out", 2, 13), ("mlp_out", 0, 9), ("heads", 1, 2)]:
        delta = pair.clean_acts[site][layer] - corrupt_pair.clean_acts[site][layer]

        def run(eps: float) -> float:
            module = {"resid_pre": adapter.layers[layer].block, "attn_out": adapter.layers[layer].attn_out,
                      "mlp_out": adapter.layers[layer].mlp_out, "heads": adapter.layers[layer].o_proj}[site]

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
                hook = Hook(module, "forward", lambda m, a, out: (nudge(out[0]),) + tuple(out[1:])
                            if isinstance(out, tuple) else nudge(out))
            with hooked(tiny_llama, [hook]), torch.no_grad():
                logits = tiny_llama.model(torch.tensor([pair.corrupt_ids])).logits[0, -1]
            return float(logits[answer] - logits[wrong])

        eps = 1e-2
        derivative = (run(eps) - run(-eps)) / (2 * eps) / span
        assert result_llama.grids[site]["atp"][layer][index] == pytest.approx(derivative, rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("freeze_attention", [False, True])
def test_relp_applies_the_lrp_rules(family, freeze_attention, normalize_small_spans):
    """RelP = (a_clean - a_corrupt) · ∂LD/∂a through the corrupted run with norm scales frozen,
    the identity rule on activations, the half rule on gated products and attention live (or
    frozen): recomputed by tests/manual.py, which applies those rules by hand."""
    handle = tiny_handle(family)
    result = patching(handle, CLEAN, CORRUPT, " Mary", " John", methods=("relp",), freeze_attention=freeze_attention)
    clean_ids, corrupt_ids = check_pair(handle, CLEAN, CORRUPT)
    model = ManualModel(handle.model, family)
    model.clean(clean_ids)
    clean_sites = dict(model.sites)
    frozen, _ = model.clean(corrupt_ids)
    corrupt_sites = dict(model.sites)
    out = model.run(frozen, model.embed(corrupt_ids).detach(), frozen_attention=freeze_attention, taps=True)
    answer, wrong = resolve_token(handle, " Mary"), resolve_token(handle, " John")
    value = out.logits[-1, answer] - out.logits[-1, wrong]
    span = result.metric["clean"] - result.metric["corrupt"]
    for site in ("resid_pre", "attn_out", "mlp_out"):
        layers = range(handle.adapter.n_layers)
        grads = torch.autograd.grad(value, [out.taps[(site, l)] for l in layers], retain_graph=True)
        expected = np.stack([((clean_sites[(site, l)] - corrupt_sites[(site, l)]) * g).sum(-1).numpy()
                             for l, g in zip(layers, grads)]) / span
        np.testing.assert_allclose(result.grids[site]["relp"], expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_pieces_are_cached_so_a_rerun_recomputes_nothing(tiny_llama, monkeypatch, normalize_small_spans):
    calls = []
    real = patching_module._exact_raw
    monkeypatch.setattr(patching_module, "_exact_raw", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", batch_size=16)
    again = patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", batch_size=16)
    assert sorted(calls) == sorted(patching_module.SITES)  # each site once, not twice
    np.testing.assert_array_equal(first.grids["heads"]["exact"], again.grids["heads"]["exact"])


def test_exact_time_is_the_computation_s_also_when_the_grids_were_streamed_first(tiny_llama, normalize_small_spans):
    """The patching page streams each exact grid, then asks ``patching`` for the result: the
    time shown must be what the grids cost, not the cache read (it showed 0.00 s)."""
    streamed = [exact_grid(tiny_llama, CLEAN, CORRUPT, " Mary", " John", site) for site in patching_module.SITES]
    result = patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", methods=("exact",))
    start = time.perf_counter()
    costs = [patching_module.timed_exact_grid(tiny_llama, CLEAN, CORRUPT, " Mary", " John", site)[1]
             for site in patching_module.SITES]
    reading = time.perf_counter() - start  # four cache reads
    assert min(costs) > reading  # each grid's computation, not the time of reading it
    assert result.seconds["exact"] == pytest.approx(sum(costs))
    np.testing.assert_allclose(result.grids["heads"]["exact"], streamed[-1], rtol=1e-6)  # stored as float32


def test_exact_grids_stream_partial_results(tiny_llama, normalize_small_spans):
    seen = []
    patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", methods=("exact",), sites=("heads",), batch_size=4,
             on_partial=lambda site, grid: seen.append(int(np.isfinite(grid).sum())))
    assert (
        seen == sorted(seen) and seen[0] == 4 and seen[-1] == tiny_llama.adapter.n_layers * tiny_llama.adapter.n_heads
    )


def test_result_json_round_trip_restores_arrays(result_llama):
    again = PatchResult.from_json(result_llama.to_json())
    assert isinstance(again.grids["heads"]["exact"], np.ndarray)
    assert again.to_json() == result_llama.to_json()


# ---------------------------------------------------------------- pairs


def test_bad_pairs_are_refused(tiny_llama):
    with pytest.raises(UserInputError, match="equal token lengths"):
        patching(tiny_llama, CLEAN, "When Mary went", " Mary", " John")
    with pytest.raises(UserInputError, match="same"):
        patching(tiny_llama, CLEAN, CLEAN, " Mary", " John")
    with pytest.raises(UserInputError):
        patching(tiny_llama, CLEAN, CORRUPT, " Mary", " Mary")
    with pytest.raises(UserInputError):
        patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", methods=("magic",))


def test_a_corruption_that_barely_moves_the_metric_is_shown_raw(tiny_llama):
    """Tiny random models move the logit difference by far less than MIN_SPAN: the grids are
    raw changes from the corrupted run, and the result says why."""
    result = patching(tiny_llama, CLEAN, CORRUPT, " Mary", " John", methods=("exact",), sites=("resid_pre",))
    metric = result.metric
    assert abs(metric["denominator"]) < MIN_SPAN and not metric["normalized"] and "raw changes" in metric["warning"]
    clean_ids, corrupt_ids = check_pair(tiny_llama, CLEAN, CORRUPT)
    swapped = list(corrupt_ids)
    swapped[-1] = clean_ids[-1]
    last = len(clean_ids) - 1
    assert result.grids["resid_pre"]["exact"][0][last] == pytest.approx(
        ld(tiny_llama, swapped) - ld(tiny_llama, corrupt_ids), abs=1e-4
    )


def test_the_scale_rule():
    assert make_scale(3.0, -2.0).normalized and make_scale(3.0, -2.0)(0.5) == pytest.approx(0.5)
    small = make_scale(0.54, 0.45)  # the Gemma case of the issue: a 0.09 denominator
    assert not small.normalized and small(0.70) == pytest.approx(0.25) and "0.090" in small.warning
    with pytest.raises(UserInputError, match="nothing to localize"):
        make_scale(1.0, 1.0)


def test_default_tokens_follow_where_the_runs_differ(tiny_llama):
    """The clean top against the corrupted top when they differ; when both runs predict the
    same token, the tokens whose probability the corruption lowers and raises most."""
    choice = default_answer_wrong(tiny_llama, CLEAN, CORRUPT)
    clean_ids, corrupt_ids = check_pair(tiny_llama, CLEAN, CORRUPT)
    with torch.no_grad():
        p_clean = tiny_llama.model(torch.tensor([clean_ids])).logits[0, -1].softmax(-1)
        p_corrupt = tiny_llama.model(torch.tensor([corrupt_ids])).logits[0, -1].softmax(-1)
    text = lambda i: tiny_llama.tokenizer.decode([int(i)])  # noqa: E731
    if p_clean.argmax() != p_corrupt.argmax():
        assert (choice.answer, choice.wrong) == (text(p_clean.argmax()), text(p_corrupt.argmax()))
    else:
        rise = p_corrupt - p_clean
        answer = int((p_clean - p_corrupt).argmax())
        rise[answer] = -1
        assert (choice.answer, choice.wrong) == (text(answer), text(rise.argmax()))
        assert "lowers most" in choice.reason and "raises most" in choice.reason


def test_propose_corruption_swaps_the_repeated_name_or_a_word_of_the_same_length(tiny_llama):
    assert propose_corruption(CLEAN) == CORRUPT
    france = "The capital of France is"
    corrupted = propose_corruption(france, tiny_llama)
    assert corrupted != france and corrupted.startswith("The capital of ") and corrupted.endswith(" is")
    assert len(check_pair(tiny_llama, france, corrupted)[1]) == len(tiny_llama.tokenizer(france)["input_ids"])
    with pytest.raises(UserInputError):
        propose_corruption("the cat sat on the mat")
