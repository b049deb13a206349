"""Clickable heatmaps: plotly heatmaps return no click selections, so grids are drawn as
square scatter markers carrying [row, column] in ``customdata``."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from .charts import clicked_customdata
from .theme import PLOT_PX, label_margins
from .tokens import visible

THIRD_PLOT_PX = 220  # about how wide a grid's plot is when three share a row (patching)


def plain_grid(
    values,
    columns: list[str],
    rows: list[str],
    *,
    text: list[list[str]] | None = None,
    title: str = "",
    colorscale: str = "Viridis",
    diverging: bool = False,
    row_px: int = 24,
    bound: float | None = None,
    plot_px: float = PLOT_PX,
) -> go.Figure:
    """A rows x columns heatmap (row 0 at the bottom) with hover, without click targets: for
    grids that are replaced moments later (a first look, a grid filling in), where the
    browser's time is better spent elsewhere. ``bound`` fixes a diverging colour scale to
    [-bound, bound] (shared between figures); ``plot_px``: about how wide it will be drawn."""
    matrix = np.asarray(values, dtype=float)
    n_rows, n_cols = matrix.shape
    heat = {"z": matrix, "x": list(range(n_cols)), "y": list(range(n_rows)), "colorscale": colorscale,
            "xgap": 1, "ygap": 1, "hovertext": _hover_text(matrix, columns, rows, text), "hoverinfo": "text"}
    if diverging:
        bound = bound or float(np.nanmax(np.abs(matrix))) or 1.0
        heat.update(colorscale="RdBu", zmin=-bound, zmax=bound, zmid=0)
    if text:
        heat.update(text=[[visible(t)[:7] for t in row] for row in text], texttemplate="%{text}",
                    textfont={"size": 9})
    fig = go.Figure(go.Heatmap(**heat))
    labels = [visible(c) for c in columns]
    fig.update_layout(
        title=title,
        height=max(260, row_px * n_rows + 120),
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        dragmode="pan",
        showlegend=False,
        xaxis={"tickmode": "array", "tickvals": list(range(n_cols)), "ticktext": labels, "showgrid": False,
               "zeroline": False},
        yaxis={"tickmode": "array", "tickvals": list(range(n_rows)), "ticktext": rows, "showgrid": False,
               "zeroline": False},
        plot_bgcolor="white",
    )
    return label_margins(fig, plot_px)


def grid_frame(columns: list[str], rows: list[str], *, title: str = "", row_px: int = 24,
               plot_px: float = PLOT_PX) -> go.Figure:
    """The frame of a grid still being computed: its axes, labels and size, no values (see
    views.common.figure_frame)."""
    fig = plain_grid(np.full((len(rows), len(columns)), np.nan), columns, rows, title=title, row_px=row_px,
                     plot_px=plot_px)
    fig.update_traces(hoverinfo="skip", hovertext=None, showscale=False)
    return fig


def _hover_text(matrix: np.ndarray, columns: list[str], rows: list[str],
                text: list[list[str]] | None) -> list[list[str]]:
    labels = [visible(c) for c in columns]
    return [[f"{rows[r]} · {labels[c]} (pos {c})<br>{matrix[r, c]:.4g}" + (f"<br>top: {visible(text[r][c])}"
                                                                           if text else "")
             for c in range(matrix.shape[1])] for r in range(matrix.shape[0])]


def clickable_grid(
    values,
    columns: list[str],
    rows: list[str],
    *,
    text: list[list[str]] | None = None,
    title: str = "",
    colorscale: str = "Viridis",
    diverging: bool = False,
    selected: tuple[int, int] | None = None,
    row_px: int = 24,
    bound: float | None = None,
    plot_px: float = PLOT_PX,
) -> go.Figure:
    """``plain_grid`` overlaid with one nearly transparent square marker per cell, which is
    what a click selects (customdata = [row, column]); the hover moves to the markers."""
    fig = plain_grid(values, columns, rows, text=text, title=title, colorscale=colorscale, diverging=diverging,
                     row_px=row_px, bound=bound, plot_px=plot_px)
    heat = fig.data[0]
    hover = [cell for row in heat.hovertext for cell in row]
    heat.update(hovertext=None, hoverinfo="skip")
    n_rows, n_cols = np.asarray(heat.z).shape
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    fig.add_trace(
        go.Scatter(
            x=cc.ravel(), y=rr.ravel(), mode="markers",
            marker={"symbol": "square", "size": row_px - 2, "color": "#000000", "opacity": 0.01},
            customdata=np.stack([rr.ravel(), cc.ravel()], axis=1).tolist(),  # lists: numpy would be sent as binary
            hovertext=hover, hoverinfo="text", showlegend=False,
        )
    )
    if selected is not None:
        fig.add_shape(type="rect", x0=selected[1] - 0.5, x1=selected[1] + 0.5, y0=selected[0] - 0.5,
                      y1=selected[0] + 0.5, line={"color": "#ff0000", "width": 3})
    fig.update_layout(clickmode="event+select")
    return fig


def selected_cell(event) -> tuple[int, int] | None:
    """(row, column) of the first clicked square, or None."""
    cells = [d for d in clicked_customdata(event) if isinstance(d, (list, tuple)) and len(d) == 2]
    return (int(cells[0][0]), int(cells[0][1])) if cells else None


def head_multiples(patterns, tokens: list[str], columns: int = 3, selected: int | None = None) -> go.Figure:
    """All heads' query x key patterns as small clickable multiples; customdata = head. The
    heads are tiled on one pair of axes in one trace (nine subplots took the browser ~1 s
    more to draw)."""
    patterns = np.asarray(patterns)
    n_heads, n_pos, _ = patterns.shape
    n_rows = -(-n_heads // columns)
    step = n_pos + 2  # a gap of two cells between heads
    head, q, k = np.meshgrid(np.arange(n_heads), np.arange(n_pos), np.arange(n_pos), indexing="ij")
    x = (head % columns) * step + k
    y = (head // columns) * step + q
    fig = go.Figure(go.Scatter(
        x=x.ravel(), y=y.ravel(), mode="markers",
        marker={"symbol": "square", "size": max(3, 120 // n_pos), "color": patterns.ravel(), "colorscale": "Blues",
                "cmin": 0, "cmax": 1},
        customdata=head.ravel()[:, None].tolist(),
        hovertext=[f"head {h}: {visible(tokens[a])} → {visible(tokens[b])}: {patterns[h, a, b]:.3f}"
                   for h, a, b in zip(head.ravel(), q.ravel(), k.ravel())],
        hoverinfo="text"))
    for h in range(n_heads):
        x0, y0 = (h % columns) * step - 0.5, (h // columns) * step - 0.5
        fig.add_annotation(x=x0 + n_pos / 2, y=y0, text=f"head {h}", showarrow=False, yanchor="bottom",
                           font={"size": 11, "color": "#d62728" if h == selected else "#333"})
        if h == selected:
            fig.add_shape(type="rect", x0=x0, x1=x0 + n_pos, y0=y0, y1=y0 + n_pos,
                          line={"color": "#d62728", "width": 2})
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, scaleanchor="y")
    fig.update_layout(height=220 * n_rows, showlegend=False, clickmode="event+select", dragmode="pan",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, plot_bgcolor="white")
    return fig


def selected_head(event) -> int | None:
    """The head of the first clicked small multiple (customdata starts with it), or None."""
    for data in clicked_customdata(event):
        if isinstance(data, (list, tuple)) and data:
            return int(data[0])
        if isinstance(data, (int, float)):
            return int(data)
    return None


def pattern_figure(pattern, tokens: list[str], title: str = "") -> go.Figure:
    """One head's query x key pattern with token labels (plain heatmap: no clicks needed)."""
    labels = [f"{visible(t)} ({i})" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="query %{y} → key %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=520, yaxis={"autorange": "reversed", "title": "query"},
                      xaxis={"title": "key"}, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return label_margins(fig)


def coloured_tokens_html(tokens: list[str], values, bound: float | None = None, mark: int | None = None,
                         dim: set[int] | None = None, as_text: bool = False) -> str:
    """Tokens with a background whose intensity follows |value| / ``bound`` (default: the
    largest |value|; blue positive, red negative); ``mark`` is outlined, ``dim`` greyed out;
    ``as_text``: spaces shown as spaces (running text) instead of visible markers."""
    values = np.asarray(values, dtype=float)
    bound = bound or float(np.abs(values).max()) or 1.0
    spans = []
    for position, (token, value) in enumerate(zip(tokens, values)):
        alpha = min(1.0, abs(value) / bound)
        colour = f"rgba(31,119,180,{alpha:.2f})" if value >= 0 else f"rgba(214,39,40,{alpha:.2f})"
        extra = "outline:2px solid #111;font-weight:bold;" if position == mark else ""
        if dim and position in dim:
            colour, extra = "transparent", "color:#999;"
        if as_text:
            spans.append(f"<span title='{value:.4g}' style='background:{colour};{extra}white-space:pre-wrap;"
                         f"border-radius:2px'>{html.escape(token.replace(chr(10), '⏎'))}</span>")
        else:
            spans.append(f"<span title='{value:.4g}' style='background:{colour};{extra}padding:2px 3px;margin:1px;"
                         f"border-radius:3px;font-family:monospace'>{html.escape(visible(token))}</span>")
    return "".join(spans)
