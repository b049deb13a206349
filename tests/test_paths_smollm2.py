"""NeuronPath on SmolLM2, "The capital of France is" -> " Paris" (the paper's evaluation)."""

import pytest

from backend.causal.paths import neuron_path
from tests.conftest import FRANCE_PROMPT


@pytest.fixture(scope="module")
def paris(smollm2):
    return neuron_path(smollm2, FRANCE_PROMPT, " Paris")


def test_removing_the_path_hurts_more_than_the_activation_baseline_and_chance(paris):
    remove = paris.evaluation["remove"]
    assert remove["path"] < remove["activation_baseline"]
    assert remove["path"] < remove["random_mean"] - 5 * remove["random_std"]


def test_path_shape_and_scores(paris, smollm2):
    assert [row["layer"] for row in paris.path] == list(range(smollm2.adapter.n_layers))
    assert paris.jas > paris.baseline_jas["activation_baseline"]
    assert paris.timings["search_s"] < 120  # 38-45 s measured on 2 idle cores; budget 30 s (README)
