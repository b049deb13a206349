"""Plotly figures built from plain data."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from .theme import BASE, HIGHLIGHT, label_margins
from .tokens import visible


def top_tokens_bar(predictions: list[dict], highlight_id: int | None = None, title: str = "") -> go.Figure:
    """Horizontal bars of next-token probabilities, most likely on top; ``highlight_id`` in red."""
    labels = [f"{visible(p['token'])}  (#{p['id']})" for p in predictions]
    colors = [HIGHLIGHT if p["id"] == highlight_id else BASE for p in predictions]
    fig = go.Figure(
        go.Bar(
            x=[p["prob"] for p in predictions],
            y=labels,
            orientation="h",
            marker_color=colors,
            text=[f"{p['prob']:.3f}" for p in predictions],
            textposition="outside",
            hovertemplate="%{y}: p=%{x:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        yaxis={"autorange": "reversed", "type": "category"},
        xaxis={"title": "probability", "range": [0, min(1.0, max((p["prob"] for p in predictions), default=1) * 1.2)]},
        height=max(300, 22 * len(predictions) + 80),
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 40},
    )
    return label_margins(fig)


def activation_bars(tokens: list[str], values, title: str = "") -> go.Figure:
    """One bar per prompt position (labelled with its token), coloured by sign."""
    values = [float(v) for v in values]
    fig = go.Figure(
        go.Bar(
            x=list(range(len(tokens))),
            y=values,
            marker_color=[BASE if v >= 0 else HIGHLIGHT for v in values],
            hovertemplate="%{customdata}: %{y:.4g}<extra></extra>",
            customdata=[visible(t) for t in tokens],
        )
    )
    fig.update_layout(
        title=title,
        height=260,
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        xaxis={"tickmode": "array", "tickvals": list(range(len(tokens))), "ticktext": [visible(t) for t in tokens]},
    )
    return label_margins(fig)


def token_score_table(rows: list[dict]) -> list[dict]:
    """Rows {token, id, score} with visible whitespace, for st.dataframe."""
    return [{"token": visible(r["token"]), "id": r["id"], "score": round(r["score"], 4)} for r in rows]


def head_grid(values, title: str = "", row_name: str = "layer", col_name: str = "head") -> go.Figure:
    """A rows x columns heatmap with a symmetric diverging colour scale (0 = white)."""
    import numpy as np

    matrix = np.asarray(values, dtype=float)
    bound = float(np.abs(matrix).max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=[f"{col_name[0].upper()}{i}" for i in range(matrix.shape[1])],
            y=[f"{row_name[0].upper()}{i}" for i in range(matrix.shape[0])],
            colorscale="RdBu",
            zmid=0,
            zmin=-bound,
            zmax=bound,
            hovertemplate=f"{row_name} %{{y}}, {col_name} %{{x}}: %{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title, height=max(250, 14 * matrix.shape[0] + 80), margin={"l": 10, "r": 10, "t": 40, "b": 10}
    )
    return label_margins(fig)


def null_histogram(null: list[float], observed: float, title: str = "", unit: str = "Δ p(target)") -> go.Figure:
    """Histogram of a null distribution with the observed value as a vertical line."""
    fig = go.Figure(go.Histogram(x=null, nbinsx=30, marker_color="#9ecae1", name="random sets"))
    fig.add_vline(x=observed, line={"color": HIGHLIGHT, "width": 3}, annotation_text="observed")
    fig.update_layout(title=title, height=300, xaxis={"title": unit}, yaxis={"title": "count"},
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, showlegend=False)
    return label_margins(fig)


def unit_histogram(histogram: dict, marks: dict[str, float] | None = None, title: str = "") -> go.Figure:
    """A unit's activation histogram over the corpus: token counts per log-spaced |activation|
    bin as steps, positive and negative activations apart, with vertical marks (e.g. "this
    prompt") at positive values."""
    edges = histogram["edges"]
    ratio = edges[1] / edges[0] if len(edges) > 1 else 10.0
    x = [*edges, edges[-1] * ratio]
    fig = go.Figure()
    for name, counts, colour in (("activation > 0", histogram["positive"], "#1f77b4"),
                                 ("activation < 0 (by |a|)", histogram["negative"], "#d62728")):
        fig.add_scatter(x=x, y=[*counts, counts[-1]], name=name, mode="lines", line={"shape": "hv", "color": colour},
                        fill="tozeroy", opacity=0.5)
    upper = x[1 + max([i for i, c in enumerate(histogram["positive"]) if c] +
                      [i for i, c in enumerate(histogram["negative"]) if c] + [0])]
    for number, (name, value) in enumerate((marks or {}).items()):
        if value and value > 0:
            upper = max(upper, value * ratio)
            fig.add_vline(x=value, line={"color": "#333" if number else HIGHLIGHT, "width": 2, "dash": "dot"})
            fig.add_annotation(x=math.log10(value), y=1.0, yref="paper", text=name, showarrow=False,
                               xanchor="left" if number else "right", yanchor="bottom")
    fig.update_layout(title=title, height=280, xaxis={"title": "|activation|", "type": "log",
                                                      "range": [math.log10(x[0]), math.log10(upper)]},
                      yaxis={"title": "tokens"}, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": 1.25})
    return label_margins(fig)


def clicked_customdata(event) -> list:
    """The customdata of every clicked point of a plotly_chart selection event, in order
    (points without customdata left out); [] without a selection."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        points = getattr(getattr(event, "selection", None), "points", None) or []
    found = []
    for point in points:
        data = point.get("customdata") if isinstance(point, dict) else None
        if data is not None:
            found.append(data)
    return found
