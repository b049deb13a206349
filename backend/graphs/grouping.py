"""Supernodes drawn as single nodes (Neuronpedia's subgraph view): a demo shows the circuit
as a handful of labelled boxes instead of hundreds of neurons.

A supernode is ``[name, member_id, ...]``. In the grouped view each becomes one node of kind
"supernode" placed at its members' mean layer and position; its members disappear; every
link to or from a member is redirected to the group, links between members of one group are
dropped, and parallel links (two members feeding the same node) are summed, so a group's
edge is the total direct effect of its members. Nothing is recomputed: it is a view of the
pruned graph.
"""

from __future__ import annotations

from collections import defaultdict

from backend.errors import UserInputError
from backend.graphs.neuronpedia import GraphNode, GraphView

PREFIX = "supernode:"


def group_id(name: str) -> str:
    return PREFIX + name


def grouped_view(view: GraphView, supernodes: list[list[str]]) -> GraphView:
    """``view`` with each supernode collapsed into one node (see the module doc)."""
    member_of: dict[str, str] = {}
    groups: list[GraphNode] = []
    for group in supernodes:
        if len(group) < 2:
            raise UserInputError("A supernode needs a name and at least one member.")
        name, *member_ids = group
        found = [view.node(view.canonical_id(m)) for m in member_ids]
        members = [m for m in found if m is not None and m.node_id not in member_of]
        if not members:
            continue
        for m in members:
            member_of[m.node_id] = group_id(name)
        influences = [m.influence for m in members if m.influence is not None]
        groups.append(GraphNode(
            node_id=group_id(name), kind="supernode", label=name, feature=-1,
            layer=round(sum(int(m.layer) for m in members) / len(members)),
            ctx_idx=round(sum(int(m.ctx_idx) for m in members) / len(members)),
            influence=min(influences) if influences else None,  # the most influential member's cumulative influence
            members=[m.node_id for m in members],
        ))
    weights: dict[tuple[str, str], float] = defaultdict(float)  # (source, target) -> summed weight
    for link in view.links:
        source = member_of.get(link["source"], link["source"])
        target = member_of.get(link["target"], link["target"])
        if source != target:
            weights[(source, target)] += link["weight"]
    ordered = sorted(weights.items(), key=lambda item: -abs(item[1]))
    links = [{"source": s, "target": t, "weight": w} for (s, t), w in ordered]
    nodes = [n for n in view.nodes if n.node_id not in member_of] + groups
    metadata = {**view.metadata, "grouped": True}
    return GraphView(metadata=metadata, nodes=nodes, links=links, qparams={**view.qparams, "supernodes": supernodes})
