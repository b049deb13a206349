"""Clean/corrupted pair inputs shared by the patching and circuit pages (same URL keys, so
the pair follows the user from one page to the other)."""

from __future__ import annotations

import streamlit as st

from backend.errors import UserInputError
from backend.analyses.inspect_prompt import inspect_prompt
from backend.runtime.models import ModelHandle
from backend.causal.patching import propose_corruption
from views.common import Selection, show_user_errors, url_state, write_url


def _default_corruption(clean: str, handle: ModelHandle) -> str:
    try:
        return propose_corruption(clean, handle)
    except UserInputError:
        return ""


def _default_tokens(handle: ModelHandle, selection: Selection) -> tuple[str, str]:
    """Answer: the target or the clean top prediction; wrong: the corrupted run's top
    prediction when it differs, else the clean run's runner-up."""
    clean_top = inspect_prompt(handle, selection.prompt, n_continue=0)
    answer = selection.target or clean_top.top_predictions[0]["token"]
    corrupt = st.session_state.get("url_corrupt") or _default_corruption(selection.prompt, handle)
    if corrupt:
        corrupt_top = show_user_errors(inspect_prompt, handle, corrupt, None, 0)
        if corrupt_top and corrupt_top.top_predictions[0]["token"] != answer:
            return answer, corrupt_top.top_predictions[0]["token"]
    return answer, next(p["token"] for p in clean_top.top_predictions if p["token"] != answer)


def pair_inputs(handle: ModelHandle, selection: Selection) -> tuple[str, str, str]:
    """Draw the corrupted prompt, answer and wrong inputs; return (corrupt, answer, wrong)."""
    url_state("corrupt", _default_corruption(selection.prompt, handle))
    answer_default, wrong_default = _default_tokens(handle, selection)
    url_state("answer", answer_default)
    url_state("wrong", wrong_default)

    def propose() -> None:
        st.session_state.url_corrupt = _default_corruption(selection.prompt, handle)

    cols = st.columns([4, 1])
    cols[0].text_input("Corrupted prompt (same token length as the prompt in the sidebar)", key="url_corrupt")
    cols[1].button("Propose", on_click=propose, help="Swap two names, or replace a country, city, name, pronoun or "
                                                     "number by another of the same token length.")
    cols = st.columns(2)
    cols[0].text_input("Answer token", key="url_answer")
    cols[1].text_input("Wrong token", key="url_wrong")
    for key in ("corrupt", "answer", "wrong"):
        write_url(key, st.session_state[f"url_{key}"])
    return st.session_state.url_corrupt, st.session_state.url_answer, st.session_state.url_wrong
