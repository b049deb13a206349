"""Clean/corrupted pair inputs shared by the patching and circuit pages (same URL keys, so
the pair follows the user from one page to the other), and how a pair's scale is shown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from backend.causal.pairs import MIN_SPAN, AnswerChoice, default_answer_wrong, propose_corruption, suggestion_ready
from backend.errors import UserInputError
from backend.runtime.models import ModelHandle
from backend.settings import PAIR
from views.common import Selection, setting_state, write_setting

METRIC_NAMES = {"logit_diff": "logit(answer) − logit(wrong)", "logprob": "log p(answer)"}


@dataclass(frozen=True)
class Pair:
    clean: str  # as the model reads them (document-start token included)
    corrupt: str
    answer: str
    wrong: str | None
    metric: str


def _proposed(selection: Selection, handle: ModelHandle) -> str:
    try:
        return propose_corruption(selection.prompt, handle)
    except UserInputError:
        return ""


FIELDS = ("corrupt", "answer", "wrong", "metric")


def _widget_key(page: str, name: str) -> str:
    """Each page draws the pair with its own widgets; the pair itself lives in the plain
    session keys url_<name>, which follow the user from page to page. (Widgets shared by key
    across pages came back empty on the next page when a page was left while its script
    still ran, e.g. during patching's exact grid.)"""
    return f"pair_{page}_{name}"


def _set_pair(**values: str) -> None:
    """Set pair fields (in callbacks): the plain keys, and every page's widget re-reads them."""
    for name, value in values.items():
        st.session_state[f"url_{name}"] = value
        for key in [k for k in st.session_state if str(k).startswith("pair_") and str(k).endswith(f"_{name}")]:
            del st.session_state[key]


# (handle, clean, corrupt, answer or None) -> the suggested answer and wrong tokens
Suggest = Callable[[ModelHandle, str, str, str | None], AnswerChoice]


def _suggest_tokens(handle: ModelHandle, selection: Selection, page: str | None = None,
                    suggest: Suggest = default_answer_wrong) -> None:
    """Answer and wrong tokens from where the two runs differ (pairs.default_answer_wrong, or
    a page's own ``suggest`` making the same choice); ``page``: read the corrupted prompt as
    that page's field holds it now (a click right after an edit comes before the page copies
    the field to the pair)."""
    corrupt = st.session_state.get(_widget_key(page, "corrupt")) if page else None
    corrupt = corrupt if corrupt is not None else st.session_state.get("url_corrupt", "")
    if page:
        _set_pair(corrupt=corrupt)
    try:
        choice = suggest(handle, selection.text, selection.with_prompt(corrupt), selection.target or None)
    except UserInputError as exc:
        st.session_state.pair_reason = str(exc)
        return
    _set_pair(answer=choice.answer, wrong=choice.wrong)
    st.session_state.pair_reason = choice.reason


def _seed_pair(handle: ModelHandle, selection: Selection) -> None:
    """The pair's session keys from the URL (once), the corrupted prompt proposed when empty."""
    setting_state(PAIR["corrupt"])
    if not st.session_state.url_corrupt:
        st.session_state.url_corrupt = _proposed(selection, handle)
    for name in ("answer", "wrong", "metric"):
        setting_state(PAIR[name])


def tokens_pending(handle: ModelHandle, selection: Selection) -> bool:
    """Whether pair_inputs will first suggest the answer and wrong tokens by running both
    prompts (not cached): nothing of this pair is computed yet, so a page may draw its
    frames first."""
    _seed_pair(handle, selection)
    if st.session_state.url_answer:
        return False
    try:
        corrupt = selection.with_prompt(st.session_state.url_corrupt)
    except UserInputError:
        return False  # pair_inputs stops with the message
    return not suggestion_ready(handle, selection.text, corrupt, selection.target or None)


def pair_inputs(handle: ModelHandle, selection: Selection, page: str, suggest: Suggest = default_answer_wrong) -> Pair:
    """Draw the corrupted prompt, answer, wrong and metric inputs; return the pair (the page
    stops with a message when the corrupted prompt is unusable). ``suggest`` chooses the
    answer and wrong tokens (see _suggest_tokens)."""
    _seed_pair(handle, selection)
    if not st.session_state.url_answer:
        _suggest_tokens(handle, selection, suggest=suggest)
    for name in FIELDS:
        if _widget_key(page, name) not in st.session_state:
            st.session_state[_widget_key(page, name)] = st.session_state[f"url_{name}"]

    def propose() -> None:
        _set_pair(corrupt=_proposed(selection, handle))
        _suggest_tokens(handle, selection, suggest=suggest)

    cols = st.columns([4, 1])
    cols[0].text_input("Corrupted prompt (same token length as the prompt in the sidebar)",
                       key=_widget_key(page, "corrupt"))
    cols[1].button("Propose", on_click=propose, help="Swap two names, or replace a country, city, name, pronoun, "
                                                     "number or adjective by another of the same token length; "
                                                     "then suggest answer and wrong tokens.")
    cols = st.columns([2, 2, 2, 1])
    cols[0].text_input("Answer token", key=_widget_key(page, "answer"))
    cols[2].selectbox("Metric", PAIR["metric"].choices, format_func=METRIC_NAMES.get, key=_widget_key(page, "metric"))
    cols[1].text_input("Wrong token", key=_widget_key(page, "wrong"),
                       disabled=st.session_state[_widget_key(page, "metric")] == "logprob")
    cols[3].button("Suggest tokens", on_click=_suggest_tokens, args=(handle, selection, page, suggest),
                   help="The clean run's top token against the corrupted run's; when both runs predict the same "
                        "token, the tokens the corruption lowers and raises most.")
    for name in FIELDS:
        st.session_state[f"url_{name}"] = st.session_state[_widget_key(page, name)]
    if st.session_state.get("pair_reason"):
        st.caption(st.session_state.pair_reason)
    for name in FIELDS:
        write_setting(PAIR[name])
    wrong = st.session_state.url_wrong if st.session_state.url_metric == "logit_diff" else None
    try:
        corrupt = selection.with_prompt(st.session_state.url_corrupt)
    except UserInputError as exc:
        st.error(f"Corrupted prompt: {exc}")
        st.stop()
    return Pair(selection.text, corrupt, st.session_state.url_answer, wrong, st.session_state.url_metric)


def show_scale(metric: dict) -> None:
    """The metric on both runs and the denominator every normalized number divides by; a
    warning when normalizing is refused (pairs.make_scale)."""
    name = "log p" if metric.get("kind") == "logprob" else "LD"
    cols = st.columns(3)
    cols[0].metric(f"{name} clean", f"{metric['clean']:.3f}")
    cols[1].metric(f"{name} corrupted", f"{metric['corrupt']:.3f}")
    cols[2].metric("Denominator (clean − corrupted)", f"{metric['denominator']:+.3f}",
                   "normalized" if metric["normalized"] else f"below {MIN_SPAN:g}: raw values", delta_color="off")
    if not metric["normalized"]:
        st.warning(metric["warning"])


def scale_caption(metric: dict) -> str:
    if metric["normalized"]:
        return (f"normalized: 0 = corrupted, 1 = clean (÷ {metric['denominator']:+.3f})")
    return "raw change from the corrupted run, in nats (not normalized: see the warning above)"

