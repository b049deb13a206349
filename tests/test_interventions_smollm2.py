"""Interventions and controls on SmolLM2: the graph's most influential neurons for " Paris"
carry the prediction, far beyond matched random sets and far beyond what the same analysis
finds in a re-initialized network (whose own set is "significant" too, but small)."""

import numpy as np

from backend.causal.controls import controls
from backend.causal.interventions import intervene, neuron_items
from backend.graphs.attribution import attribution_graph
from backend.graphs.prune import prune
from backend.runtime.prompts import with_bos
from tests.conftest import FRANCE_PROMPT


def test_top_graph_neurons_beat_matched_random_sets_and_the_dead_salmon(smollm2):
    text = with_bos(smollm2, FRANCE_PROMPT)
    graph = attribution_graph(smollm2, text, " Paris", max_nodes=200)
    influence = prune(graph).influence[:graph.n_features]
    top = [tuple(graph.features[i]) for i in np.argsort(-influence)[:20]]
    spec = {"interventions": neuron_items(top, "zero"), "target": " Paris", "continue_tokens": 3,
            "selection": {"method": "graph", "max_nodes": 200}}
    result = intervene(smollm2, text, spec)
    assert result.before["target_prob"] > 0.7 and result.after["target_prob"] < 0.1  # 0.81 -> 0.01 measured
    control = controls(smollm2, text, spec, n_random=100, seed=0)
    trained, salmon = control.trained, control.dead_salmon
    assert trained.observed < -2 and trained.z_score < -5 and trained.p_value < 0.02  # -2.72 spreads, z = -15.5
    # the re-initialized network's own top-20 graph neurons: an effect about 5x smaller (+0.53 measured)
    assert abs(salmon.observed) < abs(trained.observed) / 3
    assert salmon.items != trained.items
