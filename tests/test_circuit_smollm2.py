"""Component circuits on SmolLM2 with the IOI pair: the top 5% of edges carry the behaviour,
random edge sets of the same size do not."""

import numpy as np
import pytest

from backend.causal.circuit import circuit, faithfulness, ranked_edges, score_pair
from tests.test_patching_smollm2 import PAIR


@pytest.fixture(scope="module")
def eap(smollm2):
    return circuit(smollm2, PAIR["clean"], PAIR["corrupt"], PAIR["answer"], PAIR["wrong"], method="eap",
                   top_fraction=0.05, n_random=5, curve_size=8)


def test_top_edges_recover_the_metric(eap):
    assert len(eap.circuit) == round(0.05 * eap.n_edges)
    assert eap.faithfulness > 0.6  # 0.80 measured
    assert max(eap.random_faithfulness) < 0.2  # 0.00 measured
    assert eap.faithfulness - np.mean(eap.random_faithfulness) > 0.5


def test_curve_ends_at_corrupted_and_clean(eap):
    assert eap.curve[0]["faithfulness"] == pytest.approx(0, abs=1e-3)
    assert eap.curve[-1]["faithfulness"] == pytest.approx(1, abs=1e-3)


def test_late_heads_write_the_answer(eap):
    """The strongest edges into the logits come from heads of the last third of the model, and
    the strongest head there raises logit(Mary) - logit(John) directly (a name mover)."""
    into_logits = [e for e in eap.edges if e["target"] == "logits"][:3]
    assert all(e["source"].startswith("a") and int(e["source"][1:].split(".")[0]) >= 20 for e in into_logits)
    direct = eap.direct_logit[into_logits[0]["source"]]
    assert direct["answer"] - direct["wrong"] > 0.5


def test_eap_ig_circuit_is_at_least_as_faithful(smollm2, eap):
    scored = score_pair(smollm2, PAIR["clean"], PAIR["corrupt"], PAIR["answer"], PAIR["wrong"], "eap-ig", steps=5)
    top = ranked_edges(scored, per_position=False)[: len(eap.circuit)]
    assert faithfulness(smollm2, scored, top) > max(0.6, eap.faithfulness - 0.05)  # 0.94 measured
