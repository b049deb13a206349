"""On SmolLM2: the France -> Paris graph's top neurons matter far more than chance."""

import numpy as np

from backend.graphs.attribution import attribution_graph
from backend.causal.interventions import controls, intervene, neuron_items
from tests.conftest import FRANCE_PROMPT


def test_top_graph_neurons_beat_random_sets_and_the_dead_salmon(smollm2):
    graph = attribution_graph(smollm2, FRANCE_PROMPT, " Paris", max_nodes=20)
    spec = {"interventions": neuron_items([tuple(f) for f in graph.features]), "target": " Paris",
            "continue_tokens": 5}
    result = intervene(smollm2, FRANCE_PROMPT, spec)
    assert result.after["target_prob"] < result.before["target_prob"]
    control = controls(smollm2, FRANCE_PROMPT, spec, n_random=100, seed=0)
    null = np.asarray(control.null)
    assert (null <= control.observed).mean() < 0.05  # lowers p(" Paris") more than 95% of random sets
    assert control.p_value < 0.05
    # the same 20 indices in a re-initialized network explain nothing
    assert abs(control.dead_salmon["observed"]) < abs(control.observed) / 10
