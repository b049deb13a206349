"""Drawing information-flow routes as the LLM Transparency Tool's contribution graph: tokens
on x, layers on y (each block's state after attention half a layer above its input), edges
by kind (attention blue, MLP orange, residual grey), width by importance. Each attention
edge has a clickable marker at its middle (customdata [layer, source, target])."""

from __future__ import annotations

import plotly.graph_objects as go

from .charts import clicked_customdata
from .theme import label_margins
from .tokens import visible

COLOURS = {"attention": "#1f77b4", "mlp": "#ff7f0e", "residual": "#b0b0b0"}
BUCKETS = 6


def _ends(edge: dict, parallel: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x, y) of an edge's two ends: states at y = layer, mid states at layer + 0.5."""
    layer, stage = edge["layer"], edge["stage"]
    if parallel or stage == "block":
        return (edge["source"], layer), (edge["target"], layer + 1)
    if stage == "attention":
        return (edge["source"], layer), (edge["target"], layer + 0.5)
    return (edge["source"], layer + 0.5), (edge["target"], layer + 1)


def flow_figure(edges: list[dict], tokens: list[str], n_layers: int, parallel: bool,
                selected: tuple[int, int, int] | None = None, height: int = 760) -> go.Figure:
    fig = go.Figure()
    for kind, colour in COLOURS.items():
        members = [e for e in edges if e["kind"] == kind]
        for bucket in range(BUCKETS):  # one trace per width bucket: hundreds of edges stay fast
            xs: list = []
            ys: list = []
            for edge in members:
                if min(BUCKETS - 1, int(edge["importance"] * BUCKETS)) == bucket:
                    (x0, y0), (x1, y1) = _ends(edge, parallel)
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
            if xs:
                weight = (bucket + 0.5) / BUCKETS
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line={"color": colour, "width": 0.6 + 9 * weight}, opacity=0.3 + 0.6 * weight))
        if not members:
            continue
        middles = [tuple((a + b) / 2 for a, b in zip(*_ends(e, parallel))) for e in members]
        fig.add_trace(go.Scatter(
            x=[m[0] for m in middles], y=[m[1] for m in middles], mode="markers", name=kind,
            marker={"size": 9 if kind == "attention" else 5, "color": colour,
                    "line": {"width": [3 if (e["layer"], e["source"], e["target"]) == selected else 0 for e in members],
                             "color": "#000"}},
            customdata=[[e["layer"], e["source"], e["target"]] if kind == "attention" else None for e in members],
            hovertext=[f"{kind} L{e['layer']}: {visible(tokens[e['source']])!s} → {visible(tokens[e['target']])!s}"
                       f"<br>importance {e['importance']:.3f}" for e in members],
            hoverinfo="text"))
    states = {(x, y) for e in edges for (x, y) in _ends(e, parallel)}
    fig.add_trace(go.Scatter(x=[s[0] for s in states], y=[s[1] for s in states], mode="markers", hoverinfo="skip",
                             marker={"size": 4, "color": "#444"}, showlegend=False))
    fig.update_layout(
        height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, clickmode="event+select", dragmode="pan",
        legend={"orientation": "h", "y": 1.04},
        xaxis={"tickmode": "array", "tickvals": list(range(len(tokens))), "ticktext": [visible(t) for t in tokens],
               "range": [-0.6, len(tokens) - 0.4]},
        yaxis={"title": "layer", "range": [-0.5, n_layers + 0.5]},
    )
    return label_margins(fig)


def selected_edge(event) -> tuple[int, int, int] | None:
    """(layer, source, target) of the first clicked attention edge, or None."""
    edges = [d for d in clicked_customdata(event) if isinstance(d, (list, tuple)) and len(d) == 3]
    return (int(edges[0][0]), int(edges[0][1]), int(edges[0][2])) if edges else None
