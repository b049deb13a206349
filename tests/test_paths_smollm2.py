"""NeuronPath on SmolLM2: the reference's choice where a review computed it, and the paper's
evaluation reported honestly."""

import pytest

from backend.causal.paths import NAMED, neuron_path
from backend.runtime.prompts import with_bos
from tests.conftest import FRANCE_PROMPT


@pytest.fixture(scope="module")
def paris(smollm2):
    return neuron_path(smollm2, with_bos(smollm2, FRANCE_PROMPT), " Paris")


def test_layer_5_of_the_opposite_prompt_is_the_references_neuron(smollm2):
    """A review ran the authors' code on "The opposite of hot is" -> " cold" (no
    document-start token): neuron 989 at layer 5 (our earlier live-scaling variant chose 959)."""
    result = neuron_path(smollm2, "The opposite of hot is", " cold")
    assert result.path[5]["neuron"] == 989


def test_removing_the_path_hurts_far_more_than_chance(paris):
    remove = paris.evaluation["remove"]
    assert remove["path"] < remove["random_mean"] - 5 * remove["random_std"]  # -0.33 vs -0.003 ± 0.015


def test_the_best_path_is_named_whichever_it_is(paris):
    for operation, better in (("remove", min), ("enhance", max)):
        values = paris.evaluation[operation]
        assert values["best"] == better(NAMED, key=values.get)


def test_path_shape(paris, smollm2):
    assert [row["layer"] for row in paris.path] == list(range(smollm2.adapter.n_layers))
    assert paris.tokens[0] == "<|endoftext|>" and paris.position == len(paris.tokens) - 1
