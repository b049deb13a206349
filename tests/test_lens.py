"""Logit lens: exact on its last row, consistent ranks, and a JSON round trip."""

import numpy as np
import torch

from backend.analyses.lens import LensResult, logit_lens
from backend.runtime.trace import run_trace

PROMPT = "The capital of France is Paris"


def test_last_row_is_the_model_output_distribution(tiny):
    lens = logit_lens(tiny, PROMPT)
    trace = run_trace(tiny, PROMPT)
    probs = torch.as_tensor(trace.logits).softmax(-1).numpy()
    target = lens.target["id"]
    np.testing.assert_allclose(lens.target_prob[-1], probs[:, target], atol=1e-5)
    assert lens.top_prob.shape == (tiny.adapter.n_layers + 1, len(lens.tokens))
    np.testing.assert_allclose(lens.top_prob[-1], probs.max(-1), atol=1e-5)
    assert lens.target == {"token": tiny.tokenizer.decode([int(probs[-1].argmax())]), "id": int(probs[-1].argmax())}


def test_ranks_agree_with_probabilities(tiny_llama):
    lens = logit_lens(tiny_llama, PROMPT, target=" Mary", second=" John")
    top_cells = lens.target_rank == 1
    np.testing.assert_allclose(lens.target_prob[top_cells], lens.top_prob[top_cells], atol=1e-6)
    assert (lens.target_prob[~top_cells] < lens.top_prob[~top_cells] + 1e-7).all()
    assert lens.second["token"] == " John" and lens.second_prob.shape == lens.target_prob.shape
    assert all(row[0] == cell for rows, tops in zip(lens.top10_tokens, lens.top_token) for row, cell in zip(rows, tops))


def test_last_row_ranks_count_the_model_s_better_tokens(tiny_llama):
    """The rank is 1 + the number of tokens the model's own output prefers (catches an
    off-by-one, a count in the wrong direction, or ranks read from the wrong row)."""
    lens = logit_lens(tiny_llama, PROMPT, target=" Mary")
    probs = torch.as_tensor(run_trace(tiny_llama, PROMPT).logits).double().softmax(-1).numpy()
    target = lens.target["id"]
    expected = [1 + sum(p > row[target] for p in row) for row in probs]
    assert lens.target_rank[-1].tolist() == expected
    assert lens.target_rank.min() >= 1 and lens.target_rank.max() <= probs.shape[-1]


def test_json_round_trip(tiny_llama):
    lens = logit_lens(tiny_llama, PROMPT)
    again = LensResult.from_json(lens.to_json())
    assert again.tokens == lens.tokens and again.top_token == lens.top_token
    np.testing.assert_allclose(again.target_prob, lens.target_prob)
    assert again.to_json() == lens.to_json()


def test_repeat_is_served_from_cache(tiny_llama):
    first = logit_lens(tiny_llama, PROMPT + " again")
    assert logit_lens(tiny_llama, PROMPT + " again") is first


def test_every_row_equals_a_full_softmax_in_any_chunking(tiny_llama, monkeypatch):
    """Every cell against a plain softmax of the readout of run_trace's residual stream, with
    the rows read a few at a time (catches chunks concatenated out of order, a logsumexp over
    the wrong axis, a partial last chunk dropped)."""
    import backend.analyses.lens as lens_module

    prompt = PROMPT + " in chunks"
    resid = torch.as_tensor(run_trace(tiny_llama, prompt).resid)
    probs = tiny_llama.adapter.logits_from_residual(resid).double().softmax(-1)
    for cells in (3 * resid.shape[1] - 1, 10_000):  # rows 0-1, 2-3, ... and all rows in one product
        monkeypatch.setattr(lens_module, "LENS_CHUNK_CELLS", cells)
        lens = lens_module._lens(tiny_llama, prompt, " Mary", " John")
        mary, john = lens.target["id"], lens.second["id"]
        np.testing.assert_allclose(lens.target_prob, probs[..., mary].numpy(), atol=1e-6)
        np.testing.assert_allclose(lens.second_prob, probs[..., john].numpy(), atol=1e-6)
        top = probs.topk(10, dim=-1)
        np.testing.assert_allclose(lens.top10_probs, top.values.numpy(), atol=1e-6)
        assert lens.target_rank.tolist() == (1 + (probs > probs[..., mary:mary + 1]).sum(-1)).tolist()
