"""Drawing a component circuit (heads and MLPs by layer) and its faithfulness curve.

x = layer (input on the left, logits on the right); heads stacked by index, the MLP below
them. Edges are the circuit's: blue where corrupting the edge lowers the metric (the edge
carries the behaviour), red where it raises it; width grows with |score|. Node markers
carry their name in ``customdata`` so a click selects them.
"""

from __future__ import annotations

from collections import defaultdict

import plotly.graph_objects as go

from .theme import label_margins

CARRIES, OPPOSES = "#1f77b4", "#d62728"
WIDTH_BINS = (0.6, 1.5, 3.0, 5.0)
KIND_STYLE = {"input": ("square", "#7f7f7f"), "head": ("circle", "#ff7f0e"), "mlp": ("diamond", "#9467bd"),
              "logits": ("hexagon", "#2ca02c")}


def component_xy(nodes: list[dict], n_layers: int, n_heads: int) -> dict[str, tuple[float, float]]:
    middle = (n_heads - 1) / 2
    xy = {}
    for node in nodes:
        if node["kind"] == "input":
            xy[node["name"]] = (-1.0, middle)
        elif node["kind"] == "logits":
            xy[node["name"]] = (float(n_layers), middle)
        elif node["kind"] == "mlp":
            xy[node["name"]] = (node["layer"] + 0.3, -1.5)
        else:
            xy[node["name"]] = (float(node["layer"]), float(node["head"]))
    return xy


def _edge_traces(edges: list[dict], xy: dict, highlight: str | None) -> list[go.Scatter]:
    top = max((abs(e["score"]) for e in edges), default=0.0) or 1.0
    xs: dict[tuple[str, float], list] = defaultdict(list)
    ys: dict[tuple[str, float], list] = defaultdict(list)
    for edge in edges:
        width = WIDTH_BINS[min(len(WIDTH_BINS) - 1, int(abs(edge["score"]) / top * len(WIDTH_BINS)))]
        if highlight in (edge["source"], edge["target"]):
            width += 1.5
        key = (CARRIES if edge["score"] <= 0 else OPPOSES, width)
        (x0, y0), (x1, y1) = xy[edge["source"]], xy[edge["target"]]
        xs[key] += [x0, x1, None]
        ys[key] += [y0, y1, None]
    return [go.Scatter(x=xs[key], y=ys[key], mode="lines", line={"color": key[0], "width": key[1]},
                       opacity=0.35 if key[1] < 2 else 0.65, hoverinfo="skip", showlegend=False) for key in xs]


def circuit_figure(nodes: list[dict], edges: list[dict], n_layers: int, n_heads: int, *,
                   selected: str | None = None, labels: dict[str, str] | None = None,
                   height: int = 620) -> go.Figure:
    """The circuit's edges over every node; nodes in the circuit drawn large, others faint;
    ``labels`` ({node: text}) written beside their nodes."""
    xy = component_xy(nodes, n_layers, n_heads)
    weight: dict[str, float] = defaultdict(float)
    for edge in edges:
        weight[edge["source"]] += abs(edge["score"])
        weight[edge["target"]] += abs(edge["score"])
    top = max(weight.values(), default=0.0) or 1.0
    fig = go.Figure(_edge_traces(edges, xy, selected))
    for kind, (symbol, colour) in KIND_STYLE.items():
        members = [n for n in nodes if n["kind"] == kind]
        fig.add_trace(go.Scatter(
            x=[xy[n["name"]][0] for n in members], y=[xy[n["name"]][1] for n in members], mode="markers",
            name=kind, customdata=[[n["name"]] for n in members],
            marker={"symbol": symbol, "color": colour,
                    "size": [7 + 18 * weight[n["name"]] / top if n["name"] in weight else 5 for n in members],
                    "opacity": [1.0 if n["name"] in weight else 0.25 for n in members],
                    "line": {"width": [3 if n["name"] == selected else 0 for n in members], "color": "black"}},
            hovertemplate="<b>%{customdata[0]}</b><extra></extra>",
        ))
    for name, text in (labels or {}).items():
        if name in xy:
            fig.add_annotation(x=xy[name][0], y=xy[name][1], text=text, showarrow=True, arrowhead=0, ax=25, ay=-18,
                               font={"size": 12}, bgcolor="rgba(255,255,255,0.8)")
    fig.update_layout(
        height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, clickmode="event+select", dragmode="pan",
        xaxis={"title": "layer", "tickmode": "array", "tickvals": [-1, *range(n_layers), n_layers],
               "ticktext": ["in", *map(str, range(n_layers)), "out"]},
        yaxis={"title": "head (MLP below)", "tickmode": "array", "tickvals": [-1.5, *range(n_heads)],
               "ticktext": ["MLP", *map(str, range(n_heads))]},
        legend={"orientation": "h", "y": 1.04},
    )
    return label_margins(fig)


def faithfulness_curve(curve: list[dict], chosen: int, random_values: list[float] | None = None) -> go.Figure:
    """Faithfulness against circuit size (log x), the chosen N marked, random sets as crosses."""
    points = [p for p in curve if p["n"] > 0]
    fig = go.Figure(go.Scatter(x=[p["n"] for p in points], y=[p["faithfulness"] for p in points],
                               mode="lines+markers", name="top-N edges",
                               hovertemplate="N = %{x}: %{y:.3f}<extra></extra>"))
    if random_values:
        fig.add_trace(
            go.Scatter(
                x=[chosen] * len(random_values),
                y=random_values,
                mode="markers",
                name="random N edges",
                marker={"symbol": "x", "color": "#7f7f7f", "size": 9},
            )
        )
    fig.add_vline(x=chosen, line_dash="dash", line_color="#d62728", annotation_text=f"N = {chosen}")
    fig.add_hline(y=1.0, line_dash="dot", line_color="#2ca02c")
    fig.update_layout(height=330, xaxis={"type": "log", "title": "edges in the circuit"},
                      yaxis={"title": "faithfulness (0 corrupted, 1 clean)"},
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": 1.12})
    return label_margins(fig)
