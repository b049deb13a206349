"""The CLI writes the documented JSON and exits 2 with one line on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backend.cli import main
from tests.conftest import FRANCE_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def test_lens_json(smollm2, tmp_path):
    out = tmp_path / "lens.json"
    assert main(["lens", "--model", "smollm2", "--prompt", FRANCE_PROMPT, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tokens"] == ["<|endoftext|>", "The", " capital", " of", " France", " is"]  # --bos on by default
    assert data["top_predictions"][0]["token"] == " Paris"
    assert {"token", "prob"} <= set(data["top_predictions"][0])
    assert len(data["target_prob"]) == 31 and len(data["target_prob"][0]) == 6
    assert len(data["top_token"]) == 31 and data["top_token"][-1][-1] == " Paris"
    assert main(["lens", "--prompt", FRANCE_PROMPT, "--bos", "off", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"][0] == "The"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "empty"),
        (["--prompt", FRANCE_PROMPT, "--target", " Paris is"], "not one token"),
        (["--prompt", FRANCE_PROMPT, "--model", "no-such-model"], "Unknown model"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "backend", "lens", *args, "--out", str(tmp_path / "x.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "x.json").exists()


def test_heatmap_and_graph_json(smollm2, tmp_path):
    out = tmp_path / "heat.json"
    assert main(["heatmap", "--prompt", FRANCE_PROMPT, "--quantity", "mlp_norm", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quantity"] == "mlp_norm" and len(data["values"]) == 30 and len(data["values"][0]) == 6
    out = tmp_path / "graph.json"
    assert main(["graph", "--prompt", FRANCE_PROMPT, "--target", " Paris", "--max-nodes", "30", "--out", str(out)]) == 0
    graph = json.loads(out.read_text())
    assert set(graph) == {"metadata", "qParams", "nodes", "links"}
    assert graph["metadata"]["settings"]["max_nodes"] == 30
    assert main(["heatmap", "--prompt", FRANCE_PROMPT, "--quantity", "neuron", "--neuron", "x", "--out", str(out)]) == 2


def test_paths_json(smollm2, tmp_path):
    out = tmp_path / "paths.json"
    assert main(["paths", "--prompt", FRANCE_PROMPT, "--target", " Paris", "--steps", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"path", "jas", "baselines", "evaluation"} <= set(data)
    assert set(data["path"][0]) == {"layer", "neuron", "activation", "score"}
    assert set(data["evaluation"]["remove"]) == {"path", "activation_baseline", "gradient_baseline", "random_mean",
                                                 "random_std", "best"}


def test_patch_json(smollm2, tmp_path):
    out = tmp_path / "patch.json"
    args = ["patch", "--clean", "When Mary and John went to the store, John gave a drink to",
            "--corrupt", "When Mary and John went to the store, Mary gave a drink to",
            "--answer", " Mary", "--wrong", " John", "--method", "relp", "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert set(data["grids"]) == {"resid_pre", "attn_out", "mlp_out", "heads"} and "relp" in data["seconds"]
    assert data["metric"]["normalized"] and data["metric"]["denominator"] > 5
    assert main(args[:4] + ["When Mary went"] + args[5:]) == 2  # unequal lengths


def test_intervene_json(smollm2, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"interventions": [{"kind": "neuron", "layer": 20, "index": 7, "op": "zero"}],
                                "continue_tokens": 3}))
    out = tmp_path / "out.json"
    assert main(["intervene", "--prompt", FRANCE_PROMPT, "--target", " Paris", "--spec", str(spec),
                 "--controls", "5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"before", "after", "delta_target_prob", "controls"} <= set(data)
    assert len(data["controls"]["trained"]["null"]) == 5 and data["controls"]["null_kind"] == "matched"
    assert data["controls"]["dead_salmon"]["items"] != data["controls"]["trained"]["items"]
    spec.write_text("{not json")
    assert main(["intervene", "--prompt", FRANCE_PROMPT, "--spec", str(spec), "--out", str(out)]) == 2
