"""Patching on SmolLM2 with the IOI pair: RelP tracks exact patching (timings: bench/)."""

import json
from pathlib import Path

import pytest

from backend.causal.patching import patching

PAIR = json.loads((Path(__file__).resolve().parents[2] / "shared" / "cases.json").read_text())["patching_pairs"][0] \
    if (Path(__file__).resolve().parents[2] / "shared" / "cases.json").exists() else {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupt": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"}


@pytest.fixture(scope="module")
def ioi(smollm2):
    return patching(smollm2, PAIR["clean"], PAIR["corrupt"], PAIR["answer"], PAIR["wrong"],
                    sites=("attn_out", "mlp_out", "heads"))


def test_ioi_metric(ioi):
    assert ioi.metric["clean"] > 3 and ioi.metric["corrupt"] < -3  # " Mary" vs " John" flips
    assert ioi.metric["normalized"] and ioi.metric["denominator"] == pytest.approx(
        ioi.metric["clean"] - ioi.metric["corrupt"]
    )


def test_relp_tracks_exact_patching(ioi):
    for site in ("attn_out", "mlp_out", "heads"):
        assert ioi.pearson[site]["relp"] > 0.9, (site, ioi.pearson[site])
    assert ioi.pearson["mlp_out"]["relp"] > ioi.pearson["mlp_out"]["atp"]  # the published pattern
