"""Components: selection handlers (AppTest cannot click plotly) and figure builders."""

import re

import numpy as np

from backend.graphs.neuronpedia import GraphNode
from components.flow_view import selected_edge
from components.graph_view import edges_of, graph_figure, node_xy, selected_node_id
from components.heatmap import clickable_grid, coloured_tokens_html, head_multiples, selected_cell, selected_head
from components.tokens import visible


def event(*customdata):
    return {"selection": {"points": [{"customdata": c} for c in customdata]}}


def test_selection_handlers():
    assert selected_cell(event([3, 4])) == (3, 4)
    assert selected_cell(event({"dtype": "i8", "bdata": "AA=="})) is None  # undecoded binary: ignored
    assert selected_cell({"selection": {"points": []}}) is None and selected_cell(None) is None
    assert selected_head(event([2])) == 2 and selected_head(event(5)) == 5
    assert selected_node_id(event(None, ["12_34_5"])) == "12_34_5"  # edge lines carry no customdata
    assert selected_node_id({}) is None
    assert selected_edge(event(None, [7, 1, 4])) == (7, 1, 4)  # route dots carry (layer, source, target)
    assert selected_edge(event([3, 4])) is None and selected_edge(None) is None


def test_grid_click_layer_carries_plain_lists():
    fig = clickable_grid(np.arange(6).reshape(2, 3), ["a", " b", "c"], ["emb", "L0"], selected=(1, 2))
    scatter = fig.data[1]
    assert list(scatter.customdata[5]) == [1, 2] and len(scatter.customdata) == 6
    assert fig.layout.xaxis.ticktext == ("a", "␣b", "c")
    heads = head_multiples(np.full((4, 3, 3), 1 / 3), ["a", "b", "c"])
    assert len(heads.data) == 1 and list(heads.data[0].customdata[3 * 9]) == [3]  # head-major, 3 x 3 per head
    assert [a.text for a in heads.layout.annotations] == ["head 0", "head 1", "head 2", "head 3"]


def test_graph_layout_and_edges():
    nodes = [
        GraphNode("E_1_0", "embedding", -1, 0, 0, "emb"),
        GraphNode("0_5_0", "neuron", 0, 0, 5, "n1"),
        GraphNode("0_7_0", "neuron", 0, 0, 7, "n2"),
        GraphNode("3_9_0", "logit", 2, 0, 9, 'Output " x" (p=0.5)'),
    ]
    links = [
        {"source": "E_1_0", "target": "0_5_0", "weight": 2.0},
        {"source": "0_5_0", "target": "3_9_0", "weight": -1.0},
        {"source": "0_7_0", "target": "3_9_0", "weight": 0.5},
    ]
    xy = node_xy(nodes)
    assert xy["0_5_0"][0] != xy["0_7_0"][0] and xy["0_5_0"][1] == xy["0_7_0"][1] == 0.0
    fig = graph_figure(nodes, links, ["x"], selected="0_5_0", max_links=2)
    colours = {trace.line.color for trace in fig.data if trace.mode == "lines"}
    assert colours == {"#1f77b4", "#d62728"}  # positive and negative, the weakest link dropped
    assert [l["weight"] for l in edges_of("3_9_0", links, "in")] == [-1.0, 0.5]
    grouped = graph_figure(
        nodes[:1]
        + [GraphNode("supernode:pair", "supernode", 0, 0, -1, "pair", members=["0_5_0", "0_7_0"])]
        + nodes[3:],
        [{"source": "supernode:pair", "target": "3_9_0", "weight": -0.5}],
        ["x"],
        max_links=5,
    )
    box = next(t for t in grouped.data if t.name == "supernode")
    assert list(box.text) == ["pair"] and list(box.customdata[0]) == ["supernode:pair"]


def test_path_picture_puts_methods_in_rows_and_layers_in_columns():
    from components.paths_view import path_figure

    path = [{"layer": l, "neuron": 100 + l, "activation": 1.0, "score": s} for l, s in enumerate([1.0, 4.0, 2.0])]
    baselines = {"activation_baseline": [{"layer": l, "neuron": l, "activation": 1.0, "score": 1.0} for l in range(3)]}
    fig = path_figure(path, baselines, 3, selected=(1, 101), labels={(1, 101): "capital cities"})
    chips = next(t for t in fig.data if t.name == "NeuronPath")
    assert list(chips.x) == [0, 1, 2] and set(chips.y) == {0.0} and "capital cities" in chips.text[1]
    assert set(next(t for t in fig.data if t.name == "most activated").y) == {-4.0}
    widths = [t.line.width for t in fig.data if t.mode == "lines" and t.line.color == "#d62728"]
    assert widths[0] > widths[1]  # the link into layer 1 (score 4) is the widest


def test_markdown_escaping():
    from components.tokens import escape_markdown

    assert escape_markdown("a *b* [c](d) #1") == r"a \*b\* \[c\]\(d\) \#1"


def test_tokens_and_colours():
    assert visible(" a\n") == "␣a↵" and visible("") == "∅"
    html = coloured_tokens_html(["<b>", " x"], [1.0, -0.5])
    assert "&lt;b&gt;" in html and "rgba(214,39,40,0.50)" in html


def test_circuit_figure_nodes_are_clickable_and_edges_coloured():
    from components.circuit_view import CARRIES, OPPOSES, circuit_figure, faithfulness_curve

    nodes = [{"name": "input", "kind": "input", "layer": -1, "head": None},
             {"name": "a0.h0", "kind": "head", "layer": 0, "head": 0},
             {"name": "a0.h1", "kind": "head", "layer": 0, "head": 1},
             {"name": "m0", "kind": "mlp", "layer": 0, "head": None},
             {"name": "logits", "kind": "logits", "layer": 1, "head": None}]
    edges = [{"source": "a0.h1", "target": "logits", "score": -0.5},
             {"source": "input", "target": "m0", "score": 0.1}]
    fig = circuit_figure(nodes, edges, n_layers=1, n_heads=2, selected="a0.h1")
    lines = [t for t in fig.data if t.mode == "lines"]
    assert {t.line.color for t in lines} == {CARRIES, OPPOSES}
    heads = next(t for t in fig.data if t.name == "head")
    assert [list(c) for c in heads.customdata] == [["a0.h0"], ["a0.h1"]]
    assert list(heads.marker.opacity) == [0.25, 1.0]  # only a0.h1 is in the circuit
    assert selected_node_id(event(None, ["a0.h1"])) == "a0.h1"
    curve = faithfulness_curve([{"n": 0, "faithfulness": 0}, {"n": 3, "faithfulness": 0.9}], 3, [0.1, 0.0])
    assert list(curve.data[0].x) == [3] and len(curve.data[1].y) == 2


def test_every_figure_is_shown_without_streamlits_theme():
    """Streamlit's theme is applied in the browser (0.2 s of Plotly's code per heatmap on 2
    cores); figures get the app's look from components.theme instead. Catches a plotly_chart
    call that forgets it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in [root / "app.py", *(root / "views").glob("*.py"), *(root / "components").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "plotly_chart":
                theme = next((k.value for k in node.keywords if k.arg == "theme"), None)
                if not (isinstance(theme, ast.Constant) and theme.value is None):
                    missing.append(f"{path.name}:{node.lineno}")
    assert missing == []


def test_the_template_gives_figures_the_apps_font():
    import plotly.graph_objects as go
    import plotly.io as pio

    from components.theme import FONT, install

    default = pio.templates.default
    try:
        install()
        figure = go.Figure(go.Bar(x=[1], y=[2]))
        assert figure.layout.template.layout.font.family == FONT
        assert figure.layout.template.layout.plot_bgcolor == "white"
        # tick labels fit (figures use 10 px margins; without automargin the labels were cut off)
        assert figure.layout.template.layout.xaxis.automargin and figure.layout.template.layout.yaxis.automargin
    finally:
        pio.templates.default = default


def test_probability_bars_are_escaped_scaled_to_the_top_and_mark_the_target():
    from components.tokens import RESULT_CLASS, probability_bars_html

    predictions = [{"token": " Mary", "id": 5, "prob": 0.5}, {"token": "<b>", "id": 7, "prob": 0.125}]
    table = probability_bars_html(predictions, highlight_id=7)
    assert RESULT_CLASS in table and "&lt;b&gt;" in table and "<b>" not in table  # the token escaped
    widths = re.findall(r"background:(#\w+);height:0.9em;width:([\d.]+)%", table)
    assert widths == [("#1f77b4", "100.0"), ("#d62728", "25.0")]  # relative to the top; the target red
    assert table.index("␣Mary") < table.index("&lt;b&gt;") and "0.125" in table
