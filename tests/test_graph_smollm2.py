"""The attribution graph on the real SmolLM2, with its document-start token: exact
conservation (now for the "other neurons" rows too) and real behaviour on factual prompts."""

import numpy as np
import pytest

from backend.graphs.attribution import attribution_graph
from backend.graphs.neuronpedia import view_from_graph
from backend.graphs.prune import prune
from backend.runtime.prompts import with_bos
from tests.conftest import FRANCE_PROMPT, IOI_PROMPT

# (prompt, answer, subject token): capitals, a language, an opposite, a plural, a landmark, IOI
FACTUAL = [
    ("The capital of France is", " Paris", " France"),
    ("The capital of Italy is", " Rome", " Italy"),
    ("The capital of Japan is", " Tokyo", " Japan"),
    ("The official language of Japan is", " Japanese", " Japan"),
    ("The opposite of hot is", " cold", " hot"),
    ("The plural of mouse is", " mice", " mouse"),
    ("The Eiffel Tower is located in the city of", " Paris", "iffel"),
    (IOI_PROMPT, " Mary", " Mary"),
]


@pytest.fixture(scope="module")
def ioi_graph(smollm2):
    return attribution_graph(smollm2, with_bos(smollm2, IOI_PROMPT), max_nodes=200)


def test_conservation_on_smollm2(ioi_graph):
    graph = ioi_graph
    rows = graph.target_rows()
    assert len(rows) > graph.n_features + graph.n_layers * (graph.n_pos - 2)  # "other" rows included
    values = graph.node_values[rows]
    sums = graph.adjacency[rows].sum(axis=1)
    scale = np.maximum(np.abs(values), np.abs(graph.adjacency[rows]).sum(axis=1))
    assert (np.abs(sums - values) / np.maximum(scale, 1e-12)).max() < 1e-4
    assert np.abs(graph.adjacency[:, graph.bias_index]).max() == 0  # Llama has no biases


def test_the_document_start_token_is_the_sink(ioi_graph):
    assert ioi_graph.tokens[0] == "<|endoftext|>" and ioi_graph.sink == 0
    assert all(pos > 0 for _, pos, _ in ioi_graph.features)
    assert ioi_graph.logit_targets[0]["token"] == " Mary" and ioi_graph.n_features == 200


@pytest.mark.parametrize("prompt, answer, subject", FACTUAL)
def test_the_subject_token_contributes_most_to_the_answer(smollm2, prompt, answer, subject):
    """Among the context tokens (neither the sink nor the last position), the subject's exact
    contribution to the answer's logit (signed, summing with the bias to the logit) is the
    largest. Circuit-tracer's influence ranks the tokens differently (bench/results.md)."""
    graph = attribution_graph(smollm2, with_bos(smollm2, prompt), answer, max_nodes=200)
    context = {p: graph.embed_contributions[p] for p in range(graph.n_pos - 1) if p != graph.sink}
    best = max(context, key=lambda p: abs(context[p]))
    assert graph.tokens[best] == subject and context[best] > 0, {
        graph.tokens[p]: round(v, 2) for p, v in context.items()
    }


def test_influence_reaches_the_subject_through_exact_other_nodes(smollm2):
    """circuit-tracer's error semantics strand the subject's influence inside "other" nodes;
    with exact "other" nodes it flows on to the " France" embedding."""
    text = with_bos(smollm2, FRANCE_PROMPT)
    france = 4
    exact = attribution_graph(smollm2, text, " Paris", max_nodes=200)
    stranded = attribution_graph(smollm2, text, " Paris", max_nodes=200, other_inputs=False)
    assert exact.tokens[france] == " France"
    reached = prune(exact).influence[exact.embed_slice][france]
    assert reached > 10 * prune(stranded).influence[stranded.embed_slice][france]  # 0.087 vs 0.003 measured
    assert view_from_graph(exact).metadata["scores"]["replacement"] < 1


def test_pruned_view_is_small(ioi_graph):
    view = view_from_graph(ioi_graph)
    assert {n.kind for n in view.nodes} >= {"embedding", "neuron", "logit"}
    assert len(view.nodes) < ioi_graph.n_nodes
