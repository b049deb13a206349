"""Settings records: one meaning per URL key, the CLI built from the same records, and URL
values refused (with a fallback) outside their bounds."""

import pytest

from backend import settings as S
from backend.cli import build_parser


def test_every_url_key_means_one_thing():
    keys = [s.url for group in S.GROUPS for s in group.settings] + list(S.UI_KEYS["page state"])
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    assert duplicated == []
    assert S.GRAPH["wrong"].url != S.PAIR["wrong"].url  # a graph's logit difference is not the pair's wrong token


@pytest.mark.parametrize(
    "setting, text, ok",
    [
        (S.GRAPH["max_nodes"], "200", True),
        (S.GRAPH["max_nodes"], "99999", False),
        (S.GRAPH["node_threshold"], "7", False),
        (S.CIRCUIT["method"], "eap", True),
        (S.CIRCUIT["method"], "acdc", False),
        (S.PATCHING["methods"], "exact,relp", True),
        (S.PATCHING["methods"], "exact,magic", False),
        (S.CIRCUIT["top_n"], "", True),
        (S.GRAPH["other_inputs"], "0", True),
    ],
)
def test_url_values_are_parsed_and_bounded(setting, text, ok):
    if ok:
        setting.from_text(text)
    else:
        with pytest.raises(ValueError):
            setting.from_text(text)


def test_the_cli_takes_its_flags_and_defaults_from_the_records():
    parser = build_parser()
    graph = parser.parse_args(["graph", "--prompt", "x", "--out", "-"])
    assert graph.max_nodes == S.GRAPH["max_nodes"].default and graph.other_inputs is True
    assert parser.parse_args(["graph", "--prompt", "x", "--out", "-", "--no-other-inputs"]).other_inputs is False
    circuit = parser.parse_args(["circuit", "--clean", "a", "--corrupt", "b", "--answer", "c", "--out", "-"])
    assert circuit.method == "eap-ig" and circuit.prune is True and circuit.metric == "logit_diff"
    with pytest.raises(SystemExit):
        parser.parse_args(["graph", "--prompt", "x", "--out", "-", "--max-nodes", "-3"])
    help_text = parser._subparsers._group_actions[0].choices["graph"].format_help()
    assert "(default: 200)" in help_text
