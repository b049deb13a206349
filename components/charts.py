"""Plotly figures built from plain data."""

from __future__ import annotations

import plotly.graph_objects as go

from .tokens import visible

HIGHLIGHT = "#d62728"
BASE = "#1f77b4"


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
    return fig
