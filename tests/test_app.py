"""Page tests with streamlit's AppTest: the inspector on the real model, URL state, bad input."""

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from backend.runtime.prompts import with_bos
from components.tokens import RESULT_CLASS

IOI = "When Mary and John went to the store, John gave a drink to"
APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def app(smollm2):  # the model is loaded once per process and shared by the app
    return AppTest.from_file(APP, default_timeout=180)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_default_prompt_predicts_mary(app):
    app.switch_page("views/inspector.py")
    app.run()
    assert not app.exception and not app.error
    assert metrics(app)["Target"] == "␣Mary"
    assert app.query_params["prompt"] in (IOI, [IOI])
    distribution = next(m.value for m in app.markdown if RESULT_CLASS in m.value)
    rows = re.findall(r"white-space:pre'>(.*?) <small", distribution)
    assert len(rows) == 20 and rows[0] == "␣Mary" and "␣John" in rows[:5]
    assert distribution.index("#d62728") < distribution.index("␣John")  # the target's row (the first) in red


def test_url_state_seeds_the_sidebar(app):
    app.switch_page("views/inspector.py")
    app.query_params["prompt"] = "The capital of France is"
    app.query_params["target"] = " London"
    app.run()
    assert app.text_area(key="prompt_input").value == "The capital of France is"
    shown = metrics(app)
    assert shown["Target"] == "␣London" and int(shown["Rank of target"]) > 1


# AppTest (streamlit 1.67) drops the entry script's sidebar on a second run() with
# st.navigation, so each case below is one run seeded through the URL; the typed-input
# path (several reruns) is covered by the browser test.


def test_bad_prompt_and_target_fall_back_with_a_message(app):
    app.switch_page("views/inspector.py")
    app.query_params["prompt"] = "   "
    app.query_params["target"] = " Mary and John"
    app.run()
    errors = " ".join(e.value for e in app.error)
    assert "empty" in errors and "not one token" in errors
    assert metrics(app)["Target"] == "␣Mary" and not app.exception  # default prompt, top prediction


def test_unknown_model_falls_back_with_a_message(app):
    app.switch_page("views/inspector.py")
    app.query_params["model"] = "/no/such/folder"
    app.run()
    assert any("Unknown model" in e.value for e in app.error)
    assert metrics(app)["Target"] == "␣Mary" and not app.exception


def test_graph_page_reopens_the_selected_and_pinned_nodes_from_the_url(app, smollm2):
    from backend.graphs.attribution import attribution_graph
    from backend.graphs.neuronpedia import view_from_graph

    view = view_from_graph(attribution_graph(smollm2, with_bos(smollm2, "The capital of France is"), " Paris",
                                             max_nodes=40))
    neuron = next(n for n in view.nodes if n.kind == "neuron")
    app.switch_page("views/graph.py")
    app.query_params.update(
        prompt="The capital of France is", target=" Paris", k="40", node=neuron.node_id,
        pinned=neuron.node_id, supernodes=f'[["capital facts", "{neuron.node_id}"]]',
    )
    app.run()
    assert not app.exception and not app.error
    assert any(h.value == neuron.label for h in app.subheader)
    assert app.multiselect(key="pinned_editor").value == [neuron.node_id]
    assert any("capital facts" in m.value for m in app.markdown)
    assert {m.label for m in app.metric} >= {"Replacement", "Completeness", "Nodes shown"}


def test_heatmaps_page_drills_into_the_cell_in_the_url(app):
    app.switch_page("views/heatmaps.py")
    app.query_params.update(prompt="The capital of France is", target=" Paris", cell="30,4", q="target_prob")
    app.run()
    assert not app.exception and not app.error
    assert any("block 29, position 4" in h.value for h in app.subheader)
    assert any(b.label.startswith("head ") for b in app.button)


def test_heatmaps_drill_downs_are_drawn_only_when_open_and_the_link_keeps_them(app):
    """Closed sections draw nothing (the grid is then the page's only figure); ?attn=1 opens the
    attention section with its two figures, and the URL keeps it open."""
    app.switch_page("views/heatmaps.py")
    app.query_params.update(prompt="The capital of France is")
    app.run()
    assert len(app.get("plotly_chart")) == 1 and "attn" not in app.query_params
    linked = AppTest.from_file(APP, default_timeout=180)  # a collaborator opens a link with the section open
    linked.switch_page("views/heatmaps.py")
    linked.query_params.update(prompt="The capital of France is", attn="1")
    linked.run()
    assert not linked.exception
    assert len(linked.get("plotly_chart")) == 3 and linked.query_params.get("attn") in ("1", ["1"])


def test_heatmaps_page_refuses_a_comparison_of_other_length(app):
    app.switch_page("views/heatmaps.py")
    app.query_params.update(prompt="The capital of France is", compare="The capital of the United Kingdom is")
    app.run()
    assert any("equal lengths" in e.value for e in app.error) and not app.exception


def test_patching_page_with_a_clicked_cell_from_the_url(app):
    app.switch_page("views/patching.py")
    app.query_params.update(methods="atp,relp", pcell="heads:20,3")
    app.run()
    assert not app.exception and not app.error
    assert app.text_input(key="pair_patching_corrupt").value == \
        "When Mary and John went to the store, Mary gave a drink to"
    assert app.text_input(key="pair_patching_answer").value == " Mary"
    assert app.text_input(key="pair_patching_wrong").value == " John"
    assert any("Patched heads at layer 20, head 3" in s.value for s in app.success)
    assert app.button(key="patch_intervene_run") is not None
    assert {m.label for m in app.metric} >= {"AtP time", "RelP time", "LD clean"}


def test_patching_page_refuses_unequal_lengths(app):
    app.switch_page("views/patching.py")
    app.query_params.update(methods="atp", corrupt="When Mary went to the store")
    app.run()
    assert any("equal token lengths" in e.value for e in app.error) and not app.exception


def test_paths_page_shows_the_evaluation_and_the_clicked_neuron(app):
    app.switch_page("views/paths.py")
    app.query_params.update(prompt="The capital of France is", target=" Paris", neuron="9,500")
    app.run()
    assert not app.exception and not app.error
    assert any(h.value == "Neuron L9 N500" for h in app.subheader)
    assert {m.label for m in app.metric} >= {"JAS (path)", "Search time"}


def test_attention_page_explains_the_head_in_the_url(app):
    app.switch_page("views/attention.py")
    app.query_params.update(prompt="The capital of France is", qk="17.4.5.2")
    app.run()
    assert not app.exception and not app.error
    shown = metrics(app)
    assert float(shown["Score (q·k scaled)"]) != 0 and "Attention weight" in shown
    assert (app.number_input(key="qk_layer").value, app.number_input(key="qk_head").value) == (17, 4)
    assert app.query_params["qk"] in ("17.4.5.2", ["17.4.5.2"])


def test_attention_page_refuses_a_key_after_the_query_in_the_url(app):
    app.switch_page("views/attention.py")
    app.query_params.update(prompt="The capital of France is", qk="17.4.2.5")
    app.run()
    assert not app.exception
    assert app.selectbox(key="qk_key").value <= app.selectbox(key="qk_query").value  # fell back to a valid pair


def test_units_page_without_an_index_says_so_and_still_searches(app, monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITSCOPE_INDEX_DIR", str(tmp_path / "empty"))
    app.switch_page("views/units.py")
    app.query_params.update(prompt="The capital of France is Paris", ul="3", un="7")
    app.run()
    assert not app.exception and not app.error
    assert any("no index yet" in w.value for w in app.warning)
    assert any(b.label == "Build the index" for b in app.button)
    assert any(m.value == "**Promotes**" for m in app.markdown)  # the neuron on this prompt, without the corpus
    assert app.dataframe[0].value["neuron"].size == 30  # the search ranks raw activations meanwhile


def test_units_page_shows_a_dashboard_from_the_index(app, smollm2_index):
    app.switch_page("views/units.py")
    app.query_params.update(prompt="The capital of France is Paris", ul="15", un="1349")
    app.run()
    assert not app.exception and not app.error
    assert {"Corpus max", "Density (act > 0)", "Max on this prompt"} <= set(metrics(app))
    assert any(m.value.startswith("**L15/N1349** ·") for m in app.markdown)


def test_units_page_shows_a_transcoder_feature_dashboard(app, smollm2_transcoders):
    app.switch_page("views/units.py")
    app.query_params.update(prompt="The capital of France is Paris", tc=str(smollm2_transcoders), ul="3", un="5")
    app.run()
    assert not app.exception and not app.error
    assert any(m.value.startswith("**L3/F5** ·") for m in app.markdown)
    assert "Feature" in [n.label for n in app.number_input]
    assert any(t.label.startswith("Which features fire") for t in app.tabs)


def test_graph_page_over_transcoder_features_opens_a_feature_dashboard(app, smollm2, smollm2_transcoders):
    from backend.graphs.features import feature_graph
    from backend.graphs.neuronpedia import view_from_graph

    prompt = with_bos(smollm2, "The capital of France is")
    view = view_from_graph(feature_graph(smollm2, prompt, str(smollm2_transcoders), " Paris", max_nodes=30))
    feature = next(n for n in view.nodes if n.kind == "neuron")
    app.switch_page("views/graph.py")
    app.query_params.update(prompt="The capital of France is", target=" Paris", k="30", tc=str(smollm2_transcoders),
                            node=feature.node_id)
    app.run()
    assert not app.exception and not app.error
    assert app.subheader[0].value == feature.label and feature.label.startswith(f"L{feature.layer} F")
    assert any(m.value.startswith(f"**L{feature.layer}/F{feature.feature}** ·") for m in app.markdown)
    assert any("not available yet" in c.value for c in app.caption)  # no neuron interventions on features
    labels = [b.proto.label for b in app.get("download_button")]
    assert "Download for circuit-tracer's viewer (zip)" in labels


def test_intervene_panel_on_pinned_graph_nodes(app, smollm2):
    from backend.graphs.attribution import attribution_graph
    from backend.graphs.neuronpedia import view_from_graph

    view = view_from_graph(attribution_graph(smollm2, with_bos(smollm2, "The capital of France is"), " Paris",
                                             max_nodes=40))
    neurons = [n.node_id for n in view.nodes if n.kind == "neuron"][:5]
    app.switch_page("views/graph.py")
    app.query_params.update(prompt="The capital of France is", target=" Paris", k="40", pinned=",".join(neurons))
    app.run()
    app.button(key="graph_intervene_run").click().run()
    assert not app.exception
    assert any(m.label == "p(' Paris')" for m in app.metric)
    assert any("Continuation after" in m.value for m in app.markdown) and len(app.code) >= 2


def test_graph_page_ignores_a_malformed_url(app):
    app.switch_page("views/graph.py")
    app.query_params.update(prompt="The capital of France is", k="20", supernodes="[[1, 2], \"x\"", nt="abc")
    app.run()
    assert not app.exception and any(m.label == "Nodes shown" for m in app.metric)


def test_circuit_page_shows_the_circuit_and_the_node_in_the_url(app):
    app.switch_page("views/circuit.py")
    app.query_params.update(cnode="a23.h3", cn="300", cprune="0")
    app.run()
    assert not app.exception and not app.error
    shown = metrics(app)
    assert shown["Circuit edges"] == "300" and 0 < float(shown["Faithfulness"]) <= 1.2
    assert shown["Denominator (clean − corrupted)"].startswith("+")
    assert any(h.value == "a23.h3" for h in app.subheader)
    assert float(shown["difference"]) > 0  # the head writes Mary over John directly
    assert any(b.label.startswith("→ logits") for b in app.button)


def test_circuit_page_refuses_unequal_lengths(app):
    app.switch_page("views/circuit.py")
    app.query_params.update(corrupt="When Mary went to the store")
    app.run()
    assert any("equal token lengths" in e.value for e in app.error) and not app.exception


def _chart_spec(at: AppTest, key_part: str) -> dict:
    import json

    charts = [e for e in at.get("plotly_chart") if key_part in str(e.proto.id)]
    assert charts, f"no chart {key_part}"
    return json.loads(charts[0].proto.spec)


def test_saved_circuit_reopens_after_a_restart_without_recomputing(app, monkeypatch):
    """Compute, save, restart (caches emptied, computing forbidden), open: the same figure data."""
    from backend.causal import circuit as circuit_module
    from backend.runtime.cache import clear_all
    from backend.storage.store import Store

    app.switch_page("views/circuit.py")
    app.query_params.update(cn="200", cnode="a23.h3")
    app.run()
    assert not app.exception
    computed = _chart_spec(app, "circuit_chart")
    result = circuit_module.circuit_cache.values()[-1]  # the one the page just used
    url = {"cn": "200", "cnode": "a23.h3", "prompt": IOI}
    analysis = Store().save("circuit", "IOI round trip", "smollm2", IOI, result.to_json(),
                            settings={"page": "circuit", "url": url})

    clear_all()
    monkeypatch.setattr(circuit_module, "circuit", lambda *a, **k: pytest.fail("recomputed"))
    reopened = AppTest.from_file(APP, default_timeout=180)
    reopened.switch_page("views/circuit.py")
    reopened.query_params.update(**url, saved=str(analysis))
    reopened.run()
    assert not reopened.exception and not reopened.error
    assert any("IOI round trip" in i.value for i in reopened.info)
    assert _chart_spec(reopened, "circuit_chart")["data"] == computed["data"]


def test_gallery_lists_saved_analyses(app):
    from backend.storage.store import Store

    Store().save("graph", "Listed in the gallery", "smollm2", "The capital of France is", "{}")
    app.switch_page("views/gallery.py")
    app.run()
    assert not app.exception
    assert any("Listed in the gallery" in m.value for m in app.markdown)


@pytest.mark.parametrize("page, params, message", [
    ("views/graph.py", {"prompt": "The capital of France is", "k": "99999", "nt": "7"}, None),
    ("views/inspector.py", {"prompt": "bell\x07 ring"}, "U+0007"),
    ("views/inspector.py", {"prompt": "x" * 20_001}, "characters; the limit"),
    ("views/circuit.py", {"cn": "-5", "ctarget": "3"}, None),
])
def test_out_of_range_settings_and_bad_text_never_crash_a_page(app, page, params, message):
    app.switch_page(page)
    app.query_params.update(**params)
    app.run()
    assert not app.exception
    if message:
        assert any(message in e.value for e in app.error)


def test_out_of_memory_shows_a_message_in_the_page(app, monkeypatch):
    import torch

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("backend.analyses.heatmaps.heatmap", exhausted)
    app.switch_page("views/heatmaps.py")
    app.run()
    assert not app.exception
    assert any("Out of memory" in e.value for e in app.error)


def test_start_page_is_the_default_and_explains_the_tool(app):
    app.run()
    assert not app.exception
    assert app.title[0].value == "Circuitscope"
    assert any("Worked examples" in h.value for h in app.subheader)


def test_inspector_shows_what_the_document_start_token_changes(app):
    app.switch_page("views/inspector.py")
    app.query_params["prompt"] = "The capital of France is"
    app.run()
    assert not app.exception and metrics(app)["Target"] == "␣Paris"
    assert any("Without the document-start token" in c.value and "the same" in c.value for c in app.caption)


def test_graph_page_reads_a_legacy_link(app, smollm2):
    """A link made before the renames: the graph's wrong token under "wrong", an "other" node
    under its legacy id 0_{layer}_{pos}."""
    app.switch_page("views/graph.py")
    app.query_params.update(prompt="The capital of France is", target=" Paris", k="20", wrong=" Rome", node="0_29_5")
    app.run()
    assert not app.exception and not app.error
    assert app.text_input(key="url_gwrong").value == " Rome"
    assert any(h.value == "L29 other @5" for h in app.subheader)


def test_graph_page_offers_the_default_transcoder_set(app, smollm2, smollm2_transcoders, monkeypatch):
    """Missing: a Fit button (not pressed here: 40 minutes); fitted: one click makes it the basis."""
    app.switch_page("views/graph.py")
    app.query_params.update(prompt="The capital of France is", target=" Paris", k="20")
    app.run()
    assert any(b.label == "Fit the default transcoder set" for b in app.button)
    monkeypatch.setenv("CIRCUITSCOPE_TRANSCODERS_DIR", str(smollm2_transcoders))
    app.run()
    next(b for b in app.button if b.label == "Use the default transcoder set").click().run()
    assert not app.exception and not app.error
    assert app.session_state["url_tc"] == str(smollm2_transcoders)
    assert any(m.label == "Nodes shown" for m in app.metric)
    assert "feature" in [option for box in app.multiselect for option in box.options]  # the basis changed
    assert not any(b.label == "Use the default transcoder set" for b in app.button)


def test_suggest_tokens_reads_the_corrupted_prompt_just_typed(app, smollm2):
    """Suggest right after editing the corrupted prompt uses the edited text (the field is
    copied to the shared pair only as the page runs)."""
    app.switch_page("views/patching.py")
    app.query_params.update(prompt="The capital of France is", methods="atp")
    app.run()
    assert app.text_input(key="pair_patching_wrong").value == " Rome"  # proposed: Italy
    app.text_input(key="pair_patching_corrupt").input("The capital of Japan is")
    next(b for b in app.button if b.label == "Suggest tokens").click().run()
    assert not app.exception
    assert app.text_input(key="pair_patching_corrupt").value == "The capital of Japan is"
    assert app.text_input(key="pair_patching_answer").value == " Paris"
    assert app.text_input(key="pair_patching_wrong").value == " Tokyo"


@pytest.mark.parametrize("page, params, frames", [
    ("heatmaps", {}, ["heatmap"]),
    ("patching", {"methods": "atp,relp"}, ["resid_pre_atp"]),
    ("circuit", {"cmethod": "eap", "cn": "100"}, ["circuit"]),
    ("paths", {"steps": "2"}, ["paths"]),
])
def test_a_figure_frame_is_drawn_while_a_new_prompt_computes_and_replaced(app, monkeypatch, page, params, frames):
    """A new prompt: the page frames its first figure while computing, and the result
    replaces the frame; the same prompt again (cached): no frame (it would only delay the
    figure). Catches a frame left on the page, a frame drawn for cached results, none drawn."""
    import views.common

    drawn: list[str] = []
    original = views.common.figure_frame

    def recording(fig, name, where=None):
        drawn.append(name)
        return original(fig, name, where)

    monkeypatch.setattr(views.common, "figure_frame", recording)
    prompt = f"When Kate and Bob went to the {page}, Bob gave a hat to"
    for expected in (frames, []):
        drawn.clear()
        run = AppTest.from_file(APP, default_timeout=180)
        run.switch_page(f"views/{page}.py")
        run.query_params.update(prompt=prompt, **params)
        run.run()
        assert not run.exception and not run.error
        assert drawn == expected
        charts = [str(e.proto.id) for e in run.get("plotly_chart")]
        assert charts and not [c for c in charts if "frame_" in c]


def test_throttle_lets_a_redraw_through_once_per_interval_and_always_the_final_one():
    """The streamed exact grid's redraws (views.patching): a throttle that let every batch
    through kept a fresh browser from drawing the AtP grids sent just before."""
    from views.common import Throttle

    now = [0.0]
    throttle = Throttle(2.5, clock=lambda: now[0])
    passed = []
    for t in (0.5, 2.0, 2.6, 3.0, 4.9, 5.2, 5.3):
        now[0] = t
        passed.append(throttle.ready())
    assert passed == [False, False, True, False, False, True, False]
    now[0] = 5.4
    assert throttle.ready(final=True)
    now[0] = 6.0
    assert not throttle.ready()  # the interval restarts at the final redraw
