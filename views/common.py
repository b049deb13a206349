"""Glue shared by every page: the sidebar (model, prompt, target), its URL state, and
loading the shared model with progress. Pages read ``current()`` and call the backend."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from backend.errors import UserInputError
from backend.models import DEFAULT_MODEL, EMBEDDED_MODELS, ModelHandle, get_model, is_loaded
from backend.prompts import encode_prompt, resolve_token

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
OTHER_MODEL = "other (folder, .gguf, hub id)"
URL_KEYS = ("model", "prompt", "target")


@dataclass(frozen=True)
class Selection:
    """The last valid model, prompt and target: what every page computes on."""

    model: str
    prompt: str
    target: str  # "" = the top prediction


def _seed_from_url() -> None:
    """First run of a session: take model, prompt and target from the URL, else defaults."""
    if "seeded" in st.session_state:
        return
    params = st.query_params
    model = params.get("model", DEFAULT_MODEL)
    st.session_state.model_choice = model if model in EMBEDDED_MODELS else OTHER_MODEL
    st.session_state.model_other = "" if model in EMBEDDED_MODELS else model
    st.session_state.prompt_input = params.get("prompt", DEFAULT_PROMPT)
    st.session_state.target_input = params.get("target", "")
    st.session_state.active = Selection(DEFAULT_MODEL, DEFAULT_PROMPT, "")
    st.session_state.seeded = True


def load_model(name: str) -> ModelHandle:
    """The shared handle, with a progress bar the first time this process loads ``name``."""
    if is_loaded(name):
        return get_model(name)
    with st.status(f"Loading model {name}…", expanded=True) as status:
        bar = st.progress(0.0)

        def progress(fraction: float, message: str) -> None:
            bar.progress(min(max(fraction, 0.0), 1.0), text=message)

        try:
            handle = get_model(name, progress)
        except UserInputError:
            status.update(label=f"Could not load {name}", state="error")
            raise
        status.update(label=f"Model {name} ready", state="complete", expanded=False)
    return handle


def sidebar() -> Selection:
    """Draw the shared sidebar; validate; keep the previous valid choice on any error."""
    _seed_from_url()
    previous: Selection = st.session_state.active
    with st.sidebar:
        st.selectbox("Model", [*EMBEDDED_MODELS, OTHER_MODEL], key="model_choice")
        if st.session_state.model_choice == OTHER_MODEL:
            st.text_input("Folder, .gguf file or hub id", key="model_other", placeholder="/path/to/model")
        st.text_area("Prompt", key="prompt_input", height=100)
        st.text_input(
            "Target token",
            key="target_input",
            placeholder="top prediction",
            help="One token of the vocabulary, e.g. ' Paris' with its leading space; '#1234' for an id.",
        )
        asked = (
            st.session_state.model_other.strip()
            if st.session_state.model_choice == OTHER_MODEL
            else st.session_state.model_choice
        )
        selection = _validate(
            Selection(asked or previous.model, st.session_state.prompt_input, st.session_state.target_input),
            previous,
        )
    st.session_state.active = selection
    for key in URL_KEYS:
        value = getattr(selection, key)
        if value:
            st.query_params[key] = value
        elif key in st.query_params:
            del st.query_params[key]
    return selection


def _validate(asked: Selection, previous: Selection) -> Selection:
    """Each part that fails keeps its previous valid value and shows one plain message."""
    model = asked.model
    try:
        handle = load_model(model)
    except UserInputError as exc:
        st.error(str(exc))
        if model == previous.model:
            st.stop()  # nothing valid to fall back to; the message says what to fix
        model = previous.model
        handle = load_model(model)
    prompt = asked.prompt
    try:
        encode_prompt(handle, prompt)
    except UserInputError as exc:
        st.error(f"{exc} Showing the previous prompt.")
        prompt = previous.prompt
    target = asked.target
    if target:
        try:
            resolve_token(handle, target)
        except UserInputError as exc:
            st.error(f"{exc} Using the top prediction.")
            target = ""
    return Selection(model, prompt, target)


def current() -> tuple[Selection, ModelHandle]:
    """The active selection and its (already loaded) model handle, for pages."""
    selection: Selection = st.session_state.active
    return selection, get_model(selection.model)


def show_user_errors(fn, *args, **kwargs):
    """Call ``fn``; a UserInputError becomes st.error and None instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except UserInputError as exc:
        st.error(str(exc))
        return None


def url_state(key: str, default, parse=str):
    """A page setting kept in the session and the URL: seeded once from ``?key=``."""
    state_key = f"url_{key}"
    if state_key not in st.session_state:
        raw = st.query_params.get(key)
        try:
            st.session_state[state_key] = parse(raw) if raw is not None else default
        except (ValueError, TypeError):
            st.session_state[state_key] = default
    return st.session_state[state_key]


def set_url_state(key: str, value, render=str) -> None:
    """Store a page setting in the session and write it to the URL (removed when empty)."""
    st.session_state[f"url_{key}"] = value
    write_url(key, value, render)


def write_url(key: str, value, render=str) -> None:
    """Write one setting to the URL (for widgets whose key is ``url_<key>``)."""
    text = render(value) if value not in (None, "", [], {}) else ""
    if text:
        st.query_params[key] = text
    elif key in st.query_params:
        del st.query_params[key]
