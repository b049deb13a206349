"""The margins components.theme.label_margins sets fit the labels Plotly draws: drawn by
plotly.js in Chromium with the app's font, no figure needs Plotly's automargin to grow a
margin (which costs a second layout pass on every draw), and no left margin is much wider
than what automargin itself would have made of a 10 px one (white space)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import plotly
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import streamlit

from components import theme
from components.charts import activation_bars, head_grid, null_histogram, top_tokens_bar, unit_histogram
from components.circuit_view import circuit_figure, faithfulness_curve
from components.heatmap import THIRD_PLOT_PX, clickable_grid, grid_frame, pattern_figure, plain_grid
from components.paths_view import evaluation_figure, path_figure
from tests.browser import chromium_page, require_chromium

TOKENS = ["<|im_start|>", "When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John", " gave",
          " a", " drink", " to"]
LAYERS = ["emb"] + [f"L{layer}" for layer in range(30)]
NARROW = {"patching grid": 330}  # figures drawn three to a row; the others take the page's width, 940 px
SLACK_PX = 40  # how much wider than automargin's own result the left margin may be; the bottom one
# may be deeper by the height of turned labels where Plotly, on a wider plot, keeps them flat


def _circuit_nodes() -> list[dict]:
    nodes = [{"name": "input", "kind": "input", "layer": -1, "head": None}]
    for layer in range(30):
        nodes += [{"name": f"a{layer}.h{h}", "kind": "head", "layer": layer, "head": h} for h in range(9)]
        nodes.append({"name": f"m{layer}", "kind": "mlp", "layer": layer, "head": None})
    return nodes + [{"name": "logits", "kind": "logits", "layer": 30, "head": None}]


def figures() -> dict:
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(len(LAYERS), len(TOKENS)))
    nodes = _circuit_nodes()
    edges = [{"source": "a9.h6", "target": "logits", "score": -2.0}, {"source": "m0", "target": "a9.h6", "score": 0.7}]
    chips = [{"layer": layer, "neuron": 100 * layer + 7, "activation": 1.0, "score": 1.0} for layer in range(30)]
    predictions = [{"token": token, "id": 1000 + i, "prob": 0.5 / (i + 1)} for i, token in enumerate(TOKENS[1:11])]
    return {
        "heatmap grid": clickable_grid(grid, TOKENS, LAYERS, title="Logit lens"),
        "patching grid": plain_grid(grid, TOKENS, LAYERS[1:] + ["L30"], diverging=True, row_px=10,
                                    plot_px=THIRD_PLOT_PX),
        "grid frame": grid_frame(TOKENS, LAYERS, title="computing…"),
        "head grid": head_grid(rng.normal(size=(30, 9)), "Direct effect"),
        "pattern": pattern_figure(rng.random((len(TOKENS), len(TOKENS))), TOKENS, "a9.h6"),
        "circuit": circuit_figure(nodes, edges, 30, 9),
        "faithfulness": faithfulness_curve([{"n": n, "faithfulness": 1 - 1 / n} for n in (1, 10, 100, 1000, 44371)],
                                           100, [0.01, -0.02]),
        "top tokens": top_tokens_bar(predictions, 1001, "Next token"),
        "activations": activation_bars(TOKENS, rng.normal(size=len(TOKENS)) * 3, "Activation over the prompt"),
        "null": null_histogram(list(rng.normal(size=200) * 0.01), 0.2, "random sets"),
        "histogram": unit_histogram({"edges": [10 ** (e / 4) for e in range(-12, 5)],
                                     "positive": [int(v) for v in rng.integers(0, 20000, 16)],
                                     "negative": [int(v) for v in rng.integers(0, 300, 16)]}, {"this prompt": 2.0}),
        "path": path_figure(chips, {"activation_baseline": chips}, 30),
        "evaluation": evaluation_figure({op: {"path": -0.3, "activation_baseline": -0.1, "gradient_baseline": -0.2,
                                              "random_mean": 0.0, "random_std": 0.01} for op in ("remove", "enhance")}),
    }


def _page_html(folder: Path) -> Path:
    """A page with plotly.js and Streamlit's own Source Sans (the app's font)."""
    media = Path(streamlit.__file__).parent / "static" / "static" / "media"
    font = base64.b64encode(next(media.glob("SourceSansVF-Upright*.woff2")).read_bytes()).decode()
    (folder / "plotly.js").write_text(plotly.offline.get_plotlyjs())
    page = folder / "page.html"
    page.write_text(f"""<html><head><style>@font-face {{font-family: "Source Sans"; font-weight: 100 900;
        src: url(data:font/woff2;base64,{font}) format("woff2");}}</style>
        <script src="plotly.js"></script></head><body><div id="g" style="width:940px"></div></body></html>""")
    return page


DRAW = """async ([spec, grow, width]) => {
    await document.fonts.load('13px "Source Sans"');
    const g = document.getElementById('g');
    g.style.width = width + 'px';
    Plotly.purge(g);
    if (grow) spec.layout.margin = {...spec.layout.margin, l: 10, b: 10};
    await Plotly.newPlot(g, spec.data, spec.layout);
    return [g._fullLayout._size.l, g._fullLayout._size.b];
}"""


@pytest.mark.browser
def test_label_margins_leave_automargin_nothing_to_grow(tmp_path):
    require_chromium()
    theme.install()
    page_file = _page_html(tmp_path)
    with chromium_page(width=1300) as page:
        page.goto(page_file.as_uri())
        for name, figure in figures().items():
            spec = json.loads(pio.to_json(figure))
            preset = [spec["layout"]["margin"]["l"], spec["layout"]["margin"]["b"]]
            width = NARROW.get(name, 940)
            drawn = page.evaluate(DRAW, [spec, False, width])
            grown = page.evaluate(DRAW, [json.loads(pio.to_json(figure)), True, width])  # automargin from 10 px
            assert drawn == pytest.approx(preset, abs=0.5), (name, "automargin grew", preset, drawn)
            assert preset[0] <= grown[0] + SLACK_PX, (name, "left margin too wide", preset, grown)


def test_label_margins_grow_with_labels_and_titles_and_never_shrink():
    """Without a browser: a longer row label widens the left margin, a title adds its room,
    many column labels (which Plotly turns) deepen the bottom one, a wider given margin stays."""
    def grid(columns: list[str], rows: list[str]):
        return theme.label_margins(plain_grid(np.zeros((len(rows), len(columns))), columns, rows))

    short, long = grid(["a", "b"], ["L0", "L1"]), grid(["a", "b"], ["L0", "a much longer row label"])
    assert long.layout.margin.l > short.layout.margin.l + 100
    plain = theme.label_margins(go.Figure(go.Bar(x=[0.0, 1.0], y=[3, 4])))
    titled = theme.label_margins(go.Figure(go.Bar(x=[0.0, 1.0], y=[3, 4]), layout={"xaxis_title": "effect"}))
    assert titled.layout.margin.b - plain.layout.margin.b == theme.TITLE_PX
    assert grid([f"token{i}" for i in range(80)], ["L0"]).layout.margin.b > short.layout.margin.b + 30
    assert theme.label_margins(short.update_layout(margin={"l": 300})).layout.margin.l == 300
