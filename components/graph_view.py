"""Drawing an attribution graph (a GraphView's nodes and plain links) with plotly.

Token positions run along x (labelled with the tokens), layers up y (embeddings at the
bottom, logits on top). Several nodes in one (layer, position) cell are spread
horizontally inside it. Edges are blue when positive and red when negative, their width
grows with |weight|; only the strongest ``max_links`` are drawn so large graphs stay fast.
Node markers carry their node_id in ``customdata`` so a click selects them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import plotly.graph_objects as go

from .charts import clicked_customdata
from .theme import label_margins
from .tokens import visible

KIND_STYLE = {  # marker symbol and colour per node kind
    "embedding": ("square", "#7f7f7f"),
    "neuron": ("circle", "#ff7f0e"),
    "other": ("diamond", "#c7c7c7"),
    "bias": ("triangle-up", "#bcbd22"),
    "logit": ("hexagon", "#2ca02c"),
    "supernode": ("square", "#9467bd"),
}
POSITIVE, NEGATIVE = "#1f77b4", "#d62728"
WIDTH_BINS = (0.5, 1.5, 3.0, 5.0)


def node_xy(nodes: list) -> dict[str, tuple[float, float]]:
    """x = position (+ an offset inside the cell when it holds several nodes), y = layer."""
    cells: dict[tuple[int, int], list] = defaultdict(list)
    for node in nodes:
        cells[(node.layer, node.ctx_idx)].append(node)
    xy = {}
    for (layer, pos), members in cells.items():
        members.sort(key=lambda n: (n.kind != "other", n.feature))
        count = len(members)
        for i, node in enumerate(members):
            offset = 0.0 if count == 1 else -0.35 + 0.7 * i / (count - 1)
            xy[node.node_id] = (pos + offset, float(layer))
    return xy


def strongest_links(links: list[dict], keep: set[str] | None, max_links: int) -> list[dict]:
    chosen = [l for l in links if keep is None or (l["source"] in keep and l["target"] in keep)]
    chosen.sort(key=lambda l: -abs(l["weight"]))
    return chosen[:max_links]


def _edge_traces(links: list[dict], xy: dict, highlight: str | None) -> list[go.Scatter]:
    if not links:
        return []
    top = max(abs(l["weight"]) for l in links) or 1.0
    groups: dict[tuple[str, float], list[float | None]] = defaultdict(list)
    group_y: dict[tuple[str, float], list[float | None]] = defaultdict(list)
    for link in links:
        if link["source"] not in xy or link["target"] not in xy:
            continue
        strength = abs(link["weight"]) / top
        width = WIDTH_BINS[min(len(WIDTH_BINS) - 1, int(strength * len(WIDTH_BINS)))]
        color = POSITIVE if link["weight"] >= 0 else NEGATIVE
        if highlight and highlight in (link["source"], link["target"]):
            width += 1.5
        (x0, y0), (x1, y1) = xy[link["source"]], xy[link["target"]]
        groups[(color, width)] += [x0, x1, None]
        group_y[(color, width)] += [y0, y1, None]
    traces = []
    for (color, width), xs in groups.items():
        traces.append(
            go.Scatter(
                x=xs,
                y=group_y[(color, width)],
                mode="lines",
                line={"color": color, "width": width},
                opacity=0.35 if width < 2 else 0.6,
                hoverinfo="skip",
                showlegend=False,
            )
        )
    return traces


def _hover(node, label: str | None) -> str:
    parts = [f"<b>{node.label}</b>", f"id {node.node_id}"]
    if label:
        parts.append(f"label: {label}")
    if node.activation is not None:
        parts.append(f"activation {node.activation:.4g}")
    if node.influence is not None:
        parts.append(f"cumulative influence {node.influence:.3f}")
    if node.contribution is not None:
        parts.append(f"contribution to the target {node.contribution:+.3f}")
    if node.token_prob:
        parts.append(f"p = {node.token_prob:.3f}")
    if node.members:
        parts.append(f"{len(node.members)} members")
    return "<br>".join(parts)


def graph_figure(
    nodes: list,
    links: list[dict],
    tokens: list[str],
    *,
    selected: str | None = None,
    pinned: set[str] | None = None,
    labels: dict[str, str] | None = None,
    unit_labels: dict[str, str] | None = None,
    max_links: int = 400,
    height: int = 700,
    kind_names: dict[str, str] | None = None,
) -> go.Figure:
    """The clickable graph. ``labels`` maps node ids to names written beside them (supernode
    names, the user's node labels); ``unit_labels`` (automatic or edited unit labels, one per
    neuron) show on hover, and beside the selected and pinned nodes."""
    pinned = pinned or set()
    unit_labels = unit_labels or {}
    labels = {**{k: v for k, v in unit_labels.items() if k == selected or k in pinned}, **(labels or {})}
    xy = node_xy(nodes)
    fig = go.Figure(_edge_traces(strongest_links(links, set(xy), max_links), xy, selected))
    by_kind: dict[str, list] = defaultdict(list)
    for node in nodes:
        by_kind[node.kind].append(node)
    for kind, members in by_kind.items():
        symbol, color = KIND_STYLE.get(kind, ("circle", "#000000"))
        influence = np.array([1 - (n.influence if n.influence is not None else 0.5) for n in members])
        fig.add_trace(
            go.Scatter(
                x=[xy[n.node_id][0] for n in members],
                y=[xy[n.node_id][1] for n in members],
                mode="markers+text" if kind in ("logit", "supernode") or any(n.node_id in labels for n in members)
                else "markers",
                text=[labels.get(n.node_id, _short_label(n) if kind in ("logit", "supernode") else "")[:24]
                      for n in members],
                textposition="top center",
                marker={
                    "symbol": symbol,
                    "color": color,
                    "size": (9 + 14 * np.clip(influence, 0, 1)) * (1.6 if kind == "supernode" else 1.0),
                    "line": {
                        "color": [
                            "#000000" if n.node_id == selected else "#9467bd" if n.node_id in pinned else "#ffffff"
                            for n in members
                        ],
                        "width": [3 if n.node_id == selected or n.node_id in pinned else 1 for n in members],
                    },
                },
                customdata=[[n.node_id] for n in members],
                hovertext=[_hover(n, labels.get(n.node_id) or unit_labels.get(n.node_id)) for n in members],
                hoverinfo="text",
                name=(kind_names or {}).get(kind, kind),
            )
        )
    layers = [n.layer for n in nodes] or [0]
    fig.update_layout(
        height=height,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        clickmode="event+select",
        dragmode="pan",
        legend={"orientation": "h", "y": 1.04},
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(len(tokens))),
            "ticktext": [visible(t) for t in tokens],
            "range": [-0.6, len(tokens) - 0.4],
            "showgrid": False,
        },
        yaxis={
            "tickmode": "array",
            "tickvals": sorted(set(layers)),
            "ticktext": [_layer_name(l, max(layers)) for l in sorted(set(layers))],
            "title": "layer",
            "zeroline": False,
        },
    )
    return label_margins(fig)


def _short_label(node) -> str:
    """Logits show their token ('Output " Paris" (p=...)' -> '␣Paris'), supernodes their
    name; others nothing."""
    if node.kind == "supernode":
        return node.label
    if node.kind != "logit":
        return ""
    label = node.label
    return visible(label.split('"')[1]) if label.count('"') >= 2 else label


def _layer_name(layer: int, top: int) -> str:
    if layer < 0:
        return "emb"
    if layer == top and top > 0:
        return "logits"
    return f"L{layer}"


def selected_node_id(event) -> str | None:
    """The node id of the first clicked point carrying one (edge lines carry none)."""
    for data in clicked_customdata(event):
        if data:
            return data[0] if isinstance(data, (list, tuple)) else str(data)
    return None


def edges_of(node_id: str, links: list[dict], direction: str, limit: int = 10) -> list[dict]:
    """The strongest incoming ("in") or outgoing ("out") links of a node."""
    key = "target" if direction == "in" else "source"
    found = [l for l in links if l[key] == node_id]
    found.sort(key=lambda l: -abs(l["weight"]))
    return found[:limit]
