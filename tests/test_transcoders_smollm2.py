"""Transcoders on the real SmolLM2, end to end by the CLI: a small set fitted by
`fit-transcoders` (the session fixture), its features indexed over the default corpus, one
feature's dashboard read back; bad input exits 2."""

from __future__ import annotations

import json

import yaml

from backend.cli import main
from backend.replacement.transcoders import load_transcoders


def test_a_fitted_set_is_circuit_tracers_format_and_beats_the_mean(smollm2, smollm2_transcoders):
    spec = yaml.safe_load((smollm2_transcoders / "config.yaml").read_text())
    assert spec["model_kind"] == "transcoder_set" and spec["activation"] == "relu_topk" and spec["k"] == 8
    assert spec["feature_input_hook"] == "mlp.hook_in" and spec["feature_output_hook"] == "mlp.hook_out"
    assert len(spec["transcoders"]) == smollm2.adapter.n_layers
    report = json.loads((smollm2_transcoders / "report.json").read_text())
    assert len(report) == smollm2.adapter.n_layers
    assert all(r["fvu"] < 1.0 for r in report), [round(r["fvu"], 2) for r in report]  # better than the mean
    assert load_transcoders(smollm2_transcoders, smollm2).width == 64


def test_a_feature_dashboard_by_the_cli(smollm2, smollm2_transcoders, tmp_path):
    out = tmp_path / "feature.json"
    assert main(["neuron", "--transcoders", str(smollm2_transcoders), "--layer", "3", "--neuron", "5",
                 "--prompt", "The capital of France is", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    assert found["kind"] == "feature" and found["name"] == "L3/F5"
    assert found["corpus"]["tokens"] >= 2000
    assert len(found["prompt"]["acts"]) == len(found["prompt"]["tokens"])
    search = tmp_path / "search.json"
    assert main(["search", "--transcoders", str(smollm2_transcoders), "--text", "The capital of France is Paris",
                 "--out", str(search)]) == 0
    assert json.loads(search.read_text())["units"][0]["name"].startswith("L")


def test_bad_transcoder_input_exits_2(smollm2, tmp_path, capsys):
    assert main(["fit-transcoders", "--kind", "clt", "--out", str(tmp_path / "x")]) == 2
    assert "TopK is per-layer only" in capsys.readouterr().err
    assert main(["fit-transcoders", "--kind", "clt", "--activation", "relu", "--features", "65536",
                 "--out", str(tmp_path / "x")]) == 2  # about 280 GB of weights and optimizer state
    assert "Use --features" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["neuron", "--transcoders", str(tmp_path), "--layer", "0", "--neuron", "0",
                 "--out", str(tmp_path / "n.json")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_a_cross_layer_set_fitted_and_drawn_by_the_cli(smollm2, tmp_path):
    """`fit-transcoders --kind clt --activation jumprelu` on SmolLM2, then `graph --transcoders`:
    every layer's features write to every later MLP output, held-out FVU below the mean's."""
    from backend.replacement.transcoders import load_transcoders

    folder = tmp_path / "clt"
    assert main(["fit-transcoders", "--kind", "clt", "--activation", "jumprelu", "--features", "32", "--k", "4",
                 "--tokens", "3000", "--context", "64", "--epochs", "4", "--out", str(folder)]) == 0
    loaded = load_transcoders(folder, smollm2)
    assert loaded.cross_layer is not None and loaded.span(0) == smollm2.adapter.n_layers
    report = json.loads((folder / "report.json").read_text())
    assert len(report) == smollm2.adapter.n_layers and all(r["fvu"] < 1 for r in report), report
    out = tmp_path / "graph.json"
    assert main(["graph", "--prompt", "The capital of France is", "--max-nodes", "20",
                 "--transcoders", str(folder), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metadata"]["basis"] == "transcoders"


def test_a_feature_graph_by_the_cli(smollm2, smollm2_transcoders, tmp_path):
    """`graph --transcoders`: feature nodes with circuit-tracer's ids, error nodes without
    inputs, every feature and logit node the sum of its edges (checked on the full graph)."""
    from backend.graphs.features import feature_graph

    out = tmp_path / "graph.json"
    assert main(["graph", "--prompt", "The capital of France is", "--target", " Paris", "--max-nodes", "40",
                 "--transcoders", str(smollm2_transcoders), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["basis"] == "transcoders"
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all(n["node_id"] == f"{n['layer']}_{n['feature']}_{n['ctx_idx']}" for n in features)
    assert all(n["feature"] < 64 for n in features)
    graph = feature_graph(smollm2, "The capital of France is", str(smollm2_transcoders), " Paris", max_nodes=40)
    rows = graph.target_rows()
    sums = graph.adjacency[rows].sum(axis=1)
    assert abs(sums - graph.node_values[rows]).max() < 1e-3 * abs(graph.node_values[rows]).max()
    assert graph.logit_targets[0]["token"] == " Paris"


def test_graph_and_feature_files_for_circuit_tracers_viewer(smollm2, smollm2_transcoders, tmp_path):
    """`graph --viewer DIR`: the graph with circuit-tracer's global feature ids and a scan
    under graph_data, one feature file per feature node with its corpus examples, and the
    viewer's graph list."""
    from backend.graphs.viewer_export import cantor

    viewer = tmp_path / "viewer"
    assert main(["graph", "--prompt", "The capital of France is", "--target", " Paris", "--max-nodes", "20",
                 "--transcoders", str(smollm2_transcoders), "--viewer", str(viewer), "--slug", "france",
                 "--out", str(tmp_path / "g.json")]) == 0
    graph = json.loads((viewer / "france.json").read_text())
    scan = graph["metadata"]["scan"]
    assert scan.startswith("./graph_data/features/transcoders-30x64-")
    folder = viewer / scan.removeprefix("./graph_data/")
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features
    for node in features:
        layer, index, _ = (int(x) for x in node["node_id"].split("_"))
        assert node["feature"] == cantor(layer, index)
        feature = json.loads((folder / f"{node['feature']}.json").read_text())
        assert feature["index"] == node["feature"] and feature["transcoder_id"] == f"L{layer}/F{index}"
        top = feature["examples_quantiles"][0]["examples"]
        assert top and all(len(e["tokens"]) == len(e["tokens_acts_list"]) for e in top)
        assert max(top[0]["tokens_acts_list"]) == feature["act_max"] > 0
    listing = json.loads((viewer / "graph-metadata.json").read_text())
    assert [g["slug"] for g in listing["graphs"]] == ["france"]
    # the graph page's zip holds the same files
    import io
    import zipfile

    from backend.graphs.viewer_export import viewer_zip
    from backend.replacement.transcoders import open_transcoders
    from backend.units.corpus import corpus_from
    from backend.units.service import find_index

    units = open_transcoders(smollm2_transcoders, smollm2)
    exported = json.loads((tmp_path / "g.json").read_text())
    archive = zipfile.ZipFile(io.BytesIO(viewer_zip(smollm2, exported, find_index(smollm2, corpus_from(None), units),
                                                    units, "france")))
    names = set(archive.namelist())
    assert {"france.json", "graph-metadata.json"} <= names
    assert {f"{scan.removeprefix('./graph_data/')}/{n['feature']}.json" for n in features} <= names
