"""A graph and its nodes' dashboards in the files circuit-tracer's local viewer reads
(``circuit_tracer.frontend.local_server.serve(data_dir)``), so their viewer shows our
features (or neurons) with their corpus examples.

``data_dir/{slug}.json``: the graph JSON, its ``metadata.scan`` set to
``./graph_data/features/{units}`` (the viewer fetches ``{scan}/{feature}.json``, which the
local server maps to ``data_dir/features/{units}/{feature}.json``; ``units`` names the neuron
or feature set, so graphs of several sets share one folder); one such file per unit node in
circuit-tracer's feature format (``feature`` = their global id, cantor(layer, index));
``data_dir/graph-metadata.json``: the viewer's list of graphs, updated.

Our index stores activation histograms in log bins, which their linear-bin histogram and
percentiles cannot show exactly: those two fields are left out (the viewer skips them).
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

from backend.errors import UserInputError
from backend.runtime.models import ModelHandle
from backend.units.dashboard import UnitDashboard, unit_dashboard
from backend.units.index import UnitIndex
from backend.units.unitset import Neurons, UnitSet


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's global feature id of (layer, index)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def feature_file(dashboard: UnitDashboard, global_id: int) -> dict:
    """One unit's dashboard in circuit-tracer's feature format (frontend/feature_models.py)."""
    quantiles = [{"quantile_name": "Top activations", "examples": [_example(e) for e in dashboard.top_examples]}]
    by_bin: dict[int, list[dict]] = {}
    for example in dashboard.bin_examples:
        by_bin.setdefault(example["bin"], []).append(example)
    for b in sorted(by_bin, reverse=True):
        low, high = by_bin[b][0]["low"], by_bin[b][0]["high"]
        quantiles.append({"quantile_name": f"Activations {low:.3g} to {high:.3g}",
                          "examples": [_example(e) for e in by_bin[b]]})
    return {"transcoder_id": dashboard.name, "index": global_id, "examples_quantiles": quantiles,
            "top_logits": [token for token, _ in dashboard.top_logits],
            "bottom_logits": [token for token, _ in dashboard.bottom_logits],
            "act_min": 0.0, "act_max": float(dashboard.max_act), "activation_frequency": float(dashboard.density)}


def _example(example: dict) -> dict:
    return {"tokens_acts_list": [float(a) for a in example["acts"]], "train_token_ind": int(example["max_pos"]),
            "is_repeated_datapoint": False, "tokens": list(example["tokens"])}


def export_for_viewer(handle: ModelHandle, graph_json: dict, index: UnitIndex | None, units: UnitSet | None,
                      data_dir: Path, slug: str) -> list[Path]:
    """Write the graph, its unit nodes' feature files and the viewer's graph list into
    ``data_dir``; ``index`` is the corpus index of ``units`` (the MLP neurons when None).
    Returns the files written."""
    if index is None:
        raise UserInputError("The viewer's feature files come from the corpus index, which does not exist yet: "
                             "build it with `python -m backend index` (add --transcoders DIR for features).")
    if not slug or any(c in slug for c in "/\\") or slug.startswith("."):
        raise UserInputError(f"{slug!r} is not a usable graph name (no slashes, not starting with a dot).")
    units = units or Neurons.of(handle)
    features = data_dir / "features" / units.key()
    features.mkdir(parents=True, exist_ok=True)
    written = []
    graph_json = json.loads(json.dumps(graph_json))  # a copy: the caller's JSON is left as it was
    for node in graph_json["nodes"]:
        if node["feature_type"] != "cross layer transcoder":
            continue
        layer, index_in_layer, _ = (int(part) for part in node["node_id"].split("_"))
        node["feature"] = cantor(layer, index_in_layer)
        path = features / f"{node['feature']}.json"
        dashboard = unit_dashboard(handle, index, layer, index_in_layer, units=units)
        path.write_text(json.dumps(feature_file(dashboard, node["feature"])))
        written.append(path)
    metadata = graph_json["metadata"]
    metadata.update(slug=slug, scan=f"./graph_data/features/{units.key()}", transcoder_list=[],
                    node_threshold=metadata.get("node_threshold"))
    graph_path = data_dir / f"{slug}.json"
    graph_path.write_text(json.dumps(graph_json))
    listing_path = data_dir / "graph-metadata.json"
    listing = json.loads(listing_path.read_text()) if listing_path.exists() else {"graphs": []}
    listing["graphs"] = [g for g in listing["graphs"] if g.get("slug") != slug]
    listing["graphs"].append({key: metadata[key] for key in ("slug", "scan", "prompt_tokens", "prompt",
                                                             "node_threshold", "transcoder_list")})
    listing_path.write_text(json.dumps(listing, indent=2))
    return [graph_path, listing_path, *written]


def viewer_zip(handle: ModelHandle, graph_json: dict, index: UnitIndex | None, units: UnitSet | None,
               slug: str) -> bytes:
    """The same files as ``export_for_viewer``, as a zip to unpack into the viewer's data_dir."""
    with tempfile.TemporaryDirectory() as folder:
        written = export_for_viewer(handle, graph_json, index, units, Path(folder), slug)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in written:
                archive.write(path, path.relative_to(folder))
    return buffer.getvalue()
