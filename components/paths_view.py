"""Drawing neuron paths: layers as columns, one row per method (NeuronPath on top, the two
baselines below), each chosen neuron a labelled chip; a link's width follows the score of
the neuron it leads to, so where the path's attribution concentrates is visible. Vertical
position carries meaning (which method), never a neuron index."""

from __future__ import annotations

import plotly.graph_objects as go

from .theme import label_margins

ROWS = {"path": ("NeuronPath", "#d62728"), "gradient_baseline": ("greedy gradient × activation", "#2ca02c"),
        "activation_baseline": ("most activated", "#1f77b4")}


def path_figure(path: list[dict], baselines: dict[str, list[dict]], n_layers: int,
                selected: tuple[int, int] | None = None, labels: dict[tuple[int, int], str] | None = None) -> go.Figure:
    """Chips carry customdata [layer, neuron] (clickable); ``labels`` names neurons under their chip."""
    labels = labels or {}
    fig = go.Figure()
    rows = {"path": path, **{name: baselines.get(name, []) for name in ("gradient_baseline", "activation_baseline")}}
    for row_index, (name, chips) in enumerate(rows.items()):
        title, colour = ROWS[name]
        y0 = -2.0 * row_index
        per_layer: dict[int, list[dict]] = {}
        for chip in chips:
            per_layer.setdefault(chip["layer"], []).append(chip)
        xy = {}
        for layer, members in per_layer.items():
            for k, chip in enumerate(members):
                xy[(chip["layer"], chip["neuron"])] = (layer, y0 - 0.45 * k)
        top = max((abs(c["score"]) for c in chips), default=0.0) or 1.0
        ordered = sorted(chips, key=lambda c: c["layer"])
        for before, after in zip(ordered, ordered[1:]):
            if after["layer"] == before["layer"]:
                continue
            (x0, ya), (x1, yb) = xy[(before["layer"], before["neuron"])], xy[(after["layer"], after["neuron"])]
            fig.add_trace(go.Scatter(x=[x0, x1], y=[ya, yb], mode="lines", hoverinfo="skip", showlegend=False,
                                     line={"color": colour, "width": 1 + 7 * abs(after["score"]) / top}, opacity=0.5))
        fig.add_trace(
            go.Scatter(
                x=[xy[(c["layer"], c["neuron"])][0] for c in chips],
                y=[xy[(c["layer"], c["neuron"])][1] for c in chips],
                mode="markers+text",
                name=title,
                marker={
                    "symbol": "square",
                    "size": 22,
                    "color": colour,
                    "opacity": 0.85,
                    "line": {
                        "width": [3 if (c["layer"], c["neuron"]) == selected else 0 for c in chips],
                        "color": "#000000",
                    },
                },
                text=[
                    f"N{c['neuron']}"
                    + (f"<br>{labels[(c['layer'], c['neuron'])][:18]}" if (c["layer"], c["neuron"]) in labels else "")
                    for c in chips
                ],
                textposition="bottom center",
                textfont={"size": 9},
                customdata=[[c["layer"], c["neuron"]] for c in chips],
                hovertext=[
                    f"{title}<br>L{c['layer']} N{c['neuron']}<br>score {c['score']:.4g}<br>activation "
                    f"{c['activation']:.4g}"
                    for c in chips
                ],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        height=360, clickmode="event+select", dragmode="pan", margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"orientation": "h", "y": 1.1},
        xaxis={"title": "layer", "dtick": 1, "range": [-0.7, n_layers - 0.3]},
        yaxis={"tickmode": "array", "tickvals": [0.0, -2.0, -4.0], "ticktext": [ROWS[n][0] for n in rows],
               "range": [-5.2, 0.8], "showgrid": False, "zeroline": False},
    )
    return label_margins(fig)


def evaluation_figure(evaluation: dict) -> go.Figure:
    """Grouped bars: change in p(target) when removing / enhancing each path; random ± std."""
    names = ["path", "activation_baseline", "gradient_baseline", "random_mean"]
    display = {"path": "NeuronPath", "activation_baseline": "most activated", "gradient_baseline": "greedy grad × act",
               "random_mean": "random"}
    fig = go.Figure()
    for operation in ("remove", "enhance"):
        values = evaluation[operation]
        errors = [0, 0, 0, values.get("random_std", 0)]
        fig.add_trace(go.Bar(x=[display[n] for n in names], y=[values[n] for n in names], name=operation,
                             error_y={"type": "data", "array": errors}))
    fig.update_layout(
        barmode="group", height=320, yaxis={"title": "Δ p(target)"}, margin={"l": 10, "r": 10, "t": 30, "b": 10}
    )
    return label_margins(fig)
