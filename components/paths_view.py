"""Drawing neuron paths: layers on x, neuron index on y, nodes sized by score."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

PATH_COLOR = "#d62728"
BASELINE_COLORS = {"activation_baseline": "#9ecae1", "gradient_baseline": "#a1d99b"}


def path_figure(path: list[dict], baselines: dict[str, list[dict]], selected: tuple[int, int] | None = None) -> go.Figure:
    """The found path (clickable: customdata = [layer, neuron]) over its lighter baselines."""
    fig = go.Figure()
    for name, rows in baselines.items():
        fig.add_trace(go.Scatter(
            x=[r["layer"] for r in rows], y=[r["neuron"] for r in rows], mode="lines+markers",
            line={"color": BASELINE_COLORS.get(name, "#cccccc"), "width": 1}, marker={"size": 6},
            name=name.replace("_", " "), hovertext=[f"L{r['layer']} N{r['neuron']}" for r in rows], hoverinfo="text",
        ))
    scores = np.array([abs(r["score"]) for r in path]) if path else np.zeros(0)
    sizes = 8 + 22 * (scores / scores.max()) if len(scores) and scores.max() > 0 else 10
    fig.add_trace(go.Scatter(
        x=[r["layer"] for r in path], y=[r["neuron"] for r in path], mode="lines+markers", name="NeuronPath",
        line={"color": PATH_COLOR, "width": 2},
        marker={"size": sizes, "color": PATH_COLOR,
                "line": {"width": [3 if (r["layer"], r["neuron"]) == selected else 0 for r in path], "color": "#000000"}},
        customdata=[[r["layer"], r["neuron"]] for r in path],
        hovertext=[f"L{r['layer']} N{r['neuron']}<br>score {r['score']:.4g}<br>activation {r['activation']:.4g}" for r in path],
        hoverinfo="text",
    ))
    fig.update_layout(height=420, xaxis={"title": "layer", "dtick": 1}, yaxis={"title": "neuron"},
                      clickmode="event+select", dragmode="pan", margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": 1.08})
    return fig


def evaluation_figure(evaluation: dict) -> go.Figure:
    """Grouped bars: change in p(target) when removing / enhancing each path; random ± std."""
    names = ["path", "activation_baseline", "gradient_baseline", "random_mean"]
    fig = go.Figure()
    for operation in ("remove", "enhance"):
        values = evaluation[operation]
        errors = [0, 0, 0, values.get("random_std", 0)]
        fig.add_trace(go.Bar(x=[n.replace("_", " ") for n in names], y=[values[n] for n in names], name=operation,
                             error_y={"type": "data", "array": errors}))
    fig.update_layout(barmode="group", height=320, yaxis={"title": "Δ p(target)"}, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig
