"""Component circuits on SmolLM2 with the IOI pair: the top 5% of edges by EAP-IG, pruned of
dangling edges, carry the behaviour; random edge sets of the same size do not. And the edge
where EAP's first-order score has the wrong sign, which is why EAP-IG is the default."""

import numpy as np
import pytest

from backend.causal.circuit import (
    circuit,
    faithfulness,
    is_scored,
    ranked_edges,
    score_pair,
    scored_cache,
    suggest_tokens_scoring_eap,
)
from backend.causal.components import layout
from backend.causal.pairs import default_answer_wrong, suggestion_ready
from backend.runtime.cache import clear_all
from tests.test_patching_smollm2 import PAIR


@pytest.fixture(scope="module")
def ioi(smollm2):
    return circuit(smollm2, PAIR["clean"], PAIR["corrupt"], PAIR["answer"], PAIR["wrong"], top_fraction=0.05,
                   n_random=5, curve_size=8)


def test_top_edges_recover_the_metric(ioi):
    assert ioi.method == "eap-ig" and ioi.settings["prune"]
    assert ioi.settings["top_n"] == round(0.05 * ioi.n_edges) and len(ioi.circuit) < ioi.settings["top_n"]
    assert ioi.faithfulness > 0.6  # 0.94 measured
    assert max(ioi.random_faithfulness) < 0.2  # 0.00 measured
    assert ioi.metric["normalized"] and ioi.faithfulness_note is None


def test_curve_ends_at_corrupted_and_clean(ioi):
    assert ioi.curve[0]["faithfulness"] == pytest.approx(0, abs=1e-3)
    assert ioi.curve[-1]["faithfulness"] == pytest.approx(1, abs=1e-3)


def test_late_heads_write_the_answer(ioi):
    """The strongest edges into the logits come from heads of the last third of the model, and
    the strongest head there raises logit(Mary) - logit(John) directly (a name mover)."""
    into_logits = [e for e in ioi.edges if e["target"] == "logits"][:3]
    assert all(e["source"].startswith("a") and int(e["source"][1:].split(".")[0]) >= 20 for e in into_logits)
    direct = ioi.direct_logit[into_logits[0]["source"]]
    assert direct["answer"] - direct["wrong"] > 0.5


def test_eap_ig_gets_the_sign_of_an_edge_eap_gets_wrong(smollm2):
    """France/Italy, a23.h4 -> m25: EAP +0.124, the exact effect of corrupting that edge alone
    -0.080, EAP-IG -0.051 (a review's finding, reproduced)."""
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    names = layout(smollm2)
    sender, receiver = names.senders.index("a23.h4"), names.receivers.index("m25")
    eap = score_pair(smollm2, clean, corrupt, " Paris", " Rome", "eap")
    ig = score_pair(smollm2, clean, corrupt, " Paris", " Rome", "eap-ig")
    everything = ranked_edges(ig, per_position=False)
    alone = everything[~((everything[:, 0] == sender) & (everything[:, 1] == receiver))]
    exact = faithfulness(smollm2, ig, alone) - faithfulness(smollm2, ig, everything)
    assert exact < 0 and ig.scores[sender, receiver].sum() < 0 < eap.scores[sender, receiver].sum()
    assert np.sign(exact) == np.sign(ig.scores[sender, receiver].sum())


@pytest.mark.parametrize("metric", ["logit_diff", "logprob"])
def test_tokens_suggested_from_eap_runs_are_the_plain_suggestion_and_cache_eap_scores(smollm2, metric):
    """The circuit page's suggestion (EAP's own two runs) chooses the tokens the plain batched
    forward chooses (Mary against John), and the EAP scores it caches on the way are those
    score_pair computes from scratch for that choice (fails on a choice read from the wrong
    stream or position, or on scores cached under another metric)."""
    clean, corrupt = PAIR["clean"], PAIR["corrupt"]
    plain = default_answer_wrong(smollm2, clean, corrupt)
    assert (plain.answer, plain.wrong) == (PAIR["answer"], PAIR["wrong"])
    clear_all()  # the suggestion and the scores are computed again
    choice = suggest_tokens_scoring_eap(smollm2, clean, corrupt, None, metric)
    assert choice == plain and suggestion_ready(smollm2, clean, corrupt)
    wrong = choice.wrong if metric == "logit_diff" else None
    assert is_scored(smollm2, clean, corrupt, choice.answer, wrong, "eap", 1, metric)
    from_suggestion = score_pair(smollm2, clean, corrupt, choice.answer, wrong, "eap", 1, metric)
    scored_cache.clear()
    fresh = score_pair(smollm2, clean, corrupt, choice.answer, wrong, "eap", 1, metric)
    np.testing.assert_allclose(from_suggestion.scores, fresh.scores, rtol=1e-6, atol=1e-9)
    assert from_suggestion.scale == fresh.scale and from_suggestion.metric == fresh.metric
