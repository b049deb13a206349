"""Integration: the real embedded SmolLM2 behaves as measured (../shared/cases.json)."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from backend.analyses.inspect_prompt import inspect_prompt
from backend.analyses.lens import logit_lens
from backend.runtime.trace import run_trace
from tests.conftest import FRANCE_PROMPT, IOI_PROMPT

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases.json"
PREDICTIONS = json.loads(CASES.read_text())["predictions"] if CASES.exists() else [
    {"prompt": FRANCE_PROMPT, "n_tokens": 5, "top1": " Paris", "p": 0.773},
    {"prompt": IOI_PROMPT, "n_tokens": 14, "top1": " Mary", "p": 0.923},
]


@pytest.mark.parametrize("case", PREDICTIONS, ids=lambda c: c["prompt"][:30])
def test_measured_top_predictions(smollm2, case):
    result = inspect_prompt(smollm2, case["prompt"], n_continue=0)
    assert len(result.tokens) == case["n_tokens"]
    assert result.top_predictions[0]["token"] == case["top1"]
    assert result.target["rank"] == 1
    assert abs(result.top_predictions[0]["prob"] - case["p"]) < 0.02


def test_paris_and_mary(smollm2):
    assert inspect_prompt(smollm2, FRANCE_PROMPT, n_continue=0).target["token"] == " Paris"
    ioi = inspect_prompt(smollm2, IOI_PROMPT, target=" John", n_continue=5)
    assert ioi.top_predictions[0]["token"] == " Mary"
    assert ioi.target["token"] == " John" and ioi.target["rank"] > 1
    assert ioi.continuation_tokens[0] == " Mary"


def test_lens_paris_rises_in_the_last_layers(smollm2):
    lens = logit_lens(smollm2, FRANCE_PROMPT, target=" Paris")
    paris = lens.target_prob[:, -1]
    n_rows = len(paris)
    assert paris[-1] == pytest.approx(0.773, abs=0.02)
    assert paris.argmax() >= n_rows - 3  # highest in the top layers
    assert paris[-1] > paris[n_rows // 2] + 0.5  # and rises over the last layers
    assert lens.top_token[-1][-1] == " Paris"


def test_two_threads_match_serial_runs(smollm2):
    prompts = [FRANCE_PROMPT, IOI_PROMPT, "The opposite of hot is", "The capital of Japan is"]
    serial = [run_trace(smollm2, p, neurons=True) for p in prompts]
    results: dict[int, object] = {}

    def work(worker: int) -> None:
        for i in range(worker, len(prompts) * 2, 2):
            results[i] = run_trace(smollm2, prompts[i % len(prompts)], neurons=True)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, result in results.items():
        expected = serial[i % len(prompts)]
        np.testing.assert_array_equal(result.logits, expected.logits)
        np.testing.assert_array_equal(result.neurons, expected.neurons)
