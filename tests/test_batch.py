"""Batch precompute: files and index, resume after an interruption, into the gallery."""

import json

import pytest

import backend.storage.batch as batch
from backend.cli import main
from backend.errors import UserInputError
from backend.storage.batch import read_prompts, run_batch
from backend.storage.store import Store

PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           '{"prompt": "The capital of France is", "target": " Paris"}', "", "a b c"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS))
    return path


def test_reads_plain_and_json_lines(prompts_file, tmp_path):
    assert read_prompts(prompts_file) == [
        {"prompt": PROMPTS[0], "target": None}, {"prompt": "The capital of France is", "target": " Paris"},
        {"prompt": "a b c", "target": None}]
    bad = tmp_path / "bad.txt"
    bad.write_text('{"prompt": 3}')
    with pytest.raises(UserInputError, match="bad.txt:1"):
        read_prompts(bad)


def test_interrupted_run_resumes_without_recomputing(tiny_llama, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prompts = [{"prompt": p, "target": None} for p in ("a b c", "The capital of France is", "Mary and John")]
    calls: list[tuple[str, str]] = []
    real = batch.compute

    def counting(handle, analysis, prompt, target, settings):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user stops the run after 4 analyses
        calls.append((analysis, prompt))
        return real(handle, analysis, prompt, target, settings)

    monkeypatch.setattr(batch, "compute", counting)
    settings = {"graph": {"max_nodes": 8}, "paths": {"steps": 2}}
    with pytest.raises(KeyboardInterrupt):
        run_batch(tiny_llama, prompts, ["lens", "graph", "paths"], out, settings=settings)
    assert len(list(out.glob("0*.json"))) == 4 and not list(out.glob("*.tmp"))

    monkeypatch.setattr(batch, "compute", real)
    resumed: list[str] = []
    monkeypatch.setattr(batch, "compute", lambda *a: resumed.append(a[1]) or real(*a))
    index = run_batch(tiny_llama, prompts, ["lens", "graph", "paths"], out, settings=settings)
    assert len(resumed) == 9 - 4  # only what was missing
    assert [e["status"] for e in index["items"]] == ["done"] * 9
    assert json.loads((out / "index.json").read_text()) == index
    graph = json.loads((out / index["items"][1]["file"]).read_text())
    assert set(graph) == {"metadata", "qParams", "nodes", "links"}


def test_into_the_gallery_once_per_result(tiny_llama, prompts_file, tmp_path):
    store = Store(tmp_path / "gallery.sqlite")
    prompts = [{"prompt": "a b c", "target": None}, {"prompt": "Mary and John", "target": None}]
    for _ in range(2):  # a rerun replaces, never duplicates
        run_batch(tiny_llama, prompts, ["lens", "paths"], tmp_path / "out", settings={"paths": {"steps": 2}},
                  store=store)
    assert store.count() == 4
    saved = store.search("a b c", kind="paths")[0]
    assert saved.settings["values"]["steps"] == 2 and "url" not in saved.settings  # values, never page URLs
    assert saved.prompt == "a b c"  # as typed: the document-start token is the batch's bos setting


def test_cli_batch_reports_bad_items_with_exit_2(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("backend.cli.get_model", lambda name: tiny_llama)
    prompts = tmp_path / "p.txt"
    prompts.write_text('a b c\n{"prompt": "a b", "target": " no such token here"}\n')
    out = tmp_path / "out"
    code = main(["batch", "--prompts", str(prompts), "--analyses", "lens", "--out", str(out)])
    assert code == 2
    index = json.loads((out / "index.json").read_text())
    assert [e["status"] for e in index["items"]] == ["done", "error"]
    assert main(["batch", "--prompts", str(prompts), "--analyses", "nope", "--out", str(out)]) == 2
