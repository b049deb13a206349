"""The attribution graph on the real SmolLM2: exact conservation and real behaviour."""

import numpy as np
import pytest

from backend.graphs.attribution import attribution_graph
from backend.graphs.neuronpedia import view_from_graph
from backend.graphs.prune import prune
from tests.conftest import FRANCE_PROMPT, IOI_PROMPT


@pytest.fixture(scope="module")
def ioi_graph(smollm2):
    return attribution_graph(smollm2, IOI_PROMPT, max_nodes=200)


def test_conservation_on_smollm2(ioi_graph):
    graph = ioi_graph
    rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.n_nodes))
    values = graph.node_values[rows]
    sums = graph.adjacency[rows].sum(axis=1)
    scale = np.maximum(np.abs(values), np.abs(graph.adjacency[rows]).sum(axis=1))
    assert (np.abs(sums - values) / scale).max() < 1e-4
    assert np.abs(graph.adjacency[:, graph.bias_index]).max() == 0  # Llama has no biases


def test_ioi_targets_and_budget(ioi_graph):
    assert ioi_graph.logit_targets[0]["token"] == " Mary"
    assert ioi_graph.logit_targets[0]["prob"] == pytest.approx(0.923, abs=0.02)
    assert ioi_graph.n_features == 200
    assert ioi_graph.timings["total_s"] < 60  # budget 20 s on an idle 2-core CPU; slack for CI load


def test_mary_is_the_most_influential_context_token_for_mary(ioi_graph):
    """Real behaviour on IOI: besides position 0 (the attention sink every prompt starts
    with, see README "Known limits"), the " Mary" embedding has the most influence on the
    " Mary" logit."""
    influence = prune(ioi_graph).influence[ioi_graph.embed_slice]
    context = influence[1:]
    assert ioi_graph.tokens[1 + int(context.argmax())] == " Mary"
    assert context.max() > 1.5 * np.sort(context)[-2]


def test_pruned_view_is_small_and_fast(ioi_graph):
    view = view_from_graph(ioi_graph)
    assert {n["kind"] for n in view.nodes} >= {"embedding", "neuron", "logit"}
    assert len(view.nodes) < ioi_graph.n_nodes


def test_chosen_target_on_the_france_prompt(smollm2):
    graph = attribution_graph(smollm2, FRANCE_PROMPT, " Paris", max_nodes=20)
    assert graph.logit_targets == [{"token": " Paris", "id": graph.logit_targets[0]["id"], "prob": pytest.approx(0.773, abs=0.02)}]
