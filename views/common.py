"""Glue shared by every page: the sidebar (model, prompt, target), its URL state, and
loading the shared model with progress. Pages read ``current()`` and call the backend."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from backend.errors import OUT_OF_MEMORY, UserInputError, is_out_of_memory
from backend.runtime.models import DEFAULT_MODEL, EMBEDDED_MODELS, ModelHandle, get_model, is_loaded
from backend.runtime.prompts import document_start, encode_prompt, resolve_token, with_bos
from backend.settings import SIDEBAR, Setting

DEFAULT_PROMPT = SIDEBAR["prompt"].default
OTHER_MODEL = "other (folder, .gguf, hub id)"
URL_KEYS = ("model", "prompt", "target")


@dataclass(frozen=True)
class Selection:
    """The last valid model, prompt and target: what every page computes on. ``text`` is
    the prompt as the model reads it (with the document-start token when ``bos`` is on)."""

    model: str
    prompt: str
    target: str  # "" = the top prediction
    bos: str = "on"
    text: str = ""

    def with_prompt(self, prompt: str) -> str:
        """Another prompt (a corrupted one, a comparison) read the same way."""
        return with_bos(get_model(self.model), prompt, self.bos)


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
    st.session_state.bos_input = params.get("bos", "on") != "off"
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
        st.toggle("Document-start token first", key="bos_input",
                  help="Prepend the token the model saw at document starts (SmolLM2: <|endoftext|>) when its "
                       "tokenizer adds none. Position 0 is an attention sink; with this token there, the prompt's "
                       "first word is a normal token and graphs leave the sink out of their nodes. The inspector "
                       "shows the prediction with and without it.")
        asked = (
            st.session_state.model_other.strip()
            if st.session_state.model_choice == OTHER_MODEL
            else st.session_state.model_choice
        )
        bos = "on" if st.session_state.bos_input else "off"
        selection = _validate(
            Selection(asked or previous.model, st.session_state.prompt_input, st.session_state.target_input, bos),
            previous,
        )
        start = document_start(get_model(selection.model))
        if start and bos == "on":
            st.caption(f"The model reads `{start}` before the prompt.")
    st.session_state.active = selection
    for key in URL_KEYS:
        value = getattr(selection, key)
        if value:
            st.query_params[key] = value
        elif key in st.query_params:
            del st.query_params[key]
    write_url("bos", "off" if bos == "off" else "")
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
        encode_prompt(handle, with_bos(handle, prompt, asked.bos))
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
    return Selection(model, prompt, target, asked.bos, with_bos(handle, prompt, asked.bos))


def current() -> tuple[Selection, ModelHandle]:
    """The active selection and its (already loaded) model handle, for pages."""
    selection: Selection = st.session_state.active
    return selection, get_model(selection.model)


def show_user_errors(fn, *args, **kwargs):
    """Call ``fn``; a UserInputError or running out of memory becomes st.error and None
    instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except UserInputError as exc:
        st.error(str(exc))
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        st.error(OUT_OF_MEMORY)
    return None


def run_with_progress(fn, *args, label: str, key: str, **kwargs):
    """A long backend call with a progress bar and a Cancel button. Cancel reruns the page,
    which interrupts the call at its next progress report (its hooks are removed by their
    context managers, nothing half-done is cached) and shows that it was cancelled."""
    holder = st.empty()
    with holder.container():
        cancelled = st.button("Cancel", key=f"cancel_{key}", help="Stop this computation; the model stays clean.")
        bar = st.progress(0.0, text=label)
    if cancelled:
        holder.empty()
        st.info("Cancelled. Change a setting (or rerun the page) to compute again.")
        st.stop()
    result = show_user_errors(fn, *args, progress=lambda f, m: bar.progress(min(max(f, 0.0), 1.0), text=m), **kwargs)
    holder.empty()
    return result


class Throttle:
    """Lets a redraw through at most once per ``seconds``, the first ``seconds`` after it is
    made; a ``final`` one always passes. Each streamed redraw of a figure is a new Plotly
    chart for the browser to draw (0.2-0.3 s of its main thread on 2 busy cores): redrawn
    after every batch, they kept the figures drawn just before them from being shown."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = seconds
        self.clock = clock
        self.last = clock()

    def ready(self, final: bool = False) -> bool:
        now = self.clock()
        if not final and now - self.last < self.seconds:
            return False
        self.last = now
        return True


def url_state(key: str, default, parse=str):
    """A page setting kept in the session and the URL: seeded once from ``?key=``; a value
    the parser refuses falls back to ``default`` with a warning."""
    state_key = f"url_{key}"
    if state_key not in st.session_state:
        raw = st.query_params.get(key)
        try:
            st.session_state[state_key] = parse(raw) if raw is not None else default
        except (ValueError, TypeError) as exc:
            st.warning(f"Ignored the link's setting {key}={raw[:50]!r} ({exc}); using {default!r}.")
            st.session_state[state_key] = default
    return st.session_state[state_key]


def setting_state(setting: Setting):
    """A page setting from the settings records (backend.settings): seeded once from its URL
    key (a value the record refuses falls back to the default with a warning); widgets use
    the session key ``url_<key>``."""
    return url_state(setting.url, setting.default, setting.from_text)


def write_setting(setting: Setting) -> None:
    """Write a setting's widget value to the URL (removed when it is the default)."""
    value = st.session_state[f"url_{setting.url}"]
    write_url(setting.url, "" if value == setting.default else setting.to_text(value))


def in_range(parse, low, high):
    """A URL parser that also refuses values outside [low, high] (widgets would raise)."""
    def checked(text: str):
        value = parse(text)
        if not low <= value <= high:
            raise ValueError(f"outside {low}..{high}")
        return value

    return checked


def set_url_state(key: str, value, render=str) -> None:
    """Store a page setting in the session and write it to the URL (removed when empty)."""
    st.session_state[f"url_{key}"] = value
    write_url(key, value, render)


def follow_click(clicked, key: str, value=None) -> None:
    """A new click on a figure (not the one already handled) becomes the URL setting ``key``
    (``value``, default the click itself) and reruns the page to show it."""
    marker = f"{key}_last_click"
    if clicked is None or clicked == st.session_state.get(marker):
        return
    st.session_state[marker] = clicked
    set_url_state(key, clicked if value is None else value)
    st.rerun()


def write_url(key: str, value, render=str) -> None:
    """Write one setting to the URL (for widgets whose key is ``url_<key>``)."""
    text = render(value) if value not in (None, "", [], {}) else ""
    if text:
        st.query_params[key] = text
    elif key in st.query_params:
        del st.query_params[key]


def drill_down(label: str, url_key: str):
    """An expander whose content the page draws only while it is open (``.open``): secondary
    figures then cost the browser nothing until asked for. Its open state is the URL setting
    ``url_key`` ("1"), so a shared link reopens it; a page opens it by setting
    ``st.session_state[open_key(url_key)] = True`` (in a callback)."""
    state = open_key(url_key)
    if state not in st.session_state:
        st.session_state[state] = st.query_params.get(url_key) == "1"
    expander = st.expander(label, key=state, on_change="rerun")
    write_url(url_key, "1" if st.session_state[state] else "")
    return expander


def open_key(url_key: str) -> str:
    return f"open_{url_key}"


# ---------------------------------------------------------------- sharing, presenting, saving


def presenting() -> bool:
    """Presentation mode (``?present=1``): controls hidden, figures enlarged."""
    return st.query_params.get("present") == "1"


PNG_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


FRAME_KEY = "frame_"  # figure frames' keys start with it (their containers: class st-key-frame_...)


def figure_frame(fig, name: str, where=None):
    """Draw the frame of a figure the page is about to compute (its axes, labels and size;
    no values) in a placeholder, and return the placeholder for the result to replace. The
    frame holds the figure's place, and the browser loads Plotly and runs it once (a fresh
    page's first figure is its slowest) while the server computes: on 2 cores, the heatmap
    of a new prompt was drawn ~0.4 s sooner after a page load (medians of 24 loads each
    way). Draw one only when the result is not cached: a cached result needs no frame."""
    holder = (where or st).empty()
    holder.plotly_chart(presented(fig), key=f"{FRAME_KEY}{name}", theme=None)
    return holder


def presented(fig):
    """``fig`` enlarged when presenting (the figure itself, changed in place)."""
    if presenting():
        fig.update_layout(height=int((fig.layout.height or 450) * 1.5), font={"size": 16})
    return fig


def chart(fig, key: str, where=None, export: str | None = None, **kwargs):
    """``st.plotly_chart`` with the PNG button of the modebar, enlarged when presenting, and
    (``export`` = a title) a download of the figure as a standalone HTML file."""
    from components.export import figure_html

    presented(fig)
    config = {**PNG_CONFIG, "toImageButtonOptions": {**PNG_CONFIG["toImageButtonOptions"], "filename": key}}
    event = (where or st).plotly_chart(fig, key=key, config=config, **kwargs, theme=None)
    if export and not presenting():
        settings = {k: st.query_params.get(k) for k in st.query_params}
        notes = st.session_state.get("save_notes", "")
        (where or st).download_button(  # built on click: plotly.js inlined makes it ~5 MB
            "Download figure (HTML)", lambda: figure_html(fig, export, settings, notes),
            file_name=f"{key}.html", mime="text/html", key=f"{key}_html")
    return event


def share_box() -> None:
    """The link to this exact view (page + every setting in the URL), with a copy button, in
    the sidebar. Drawn when opened: the code block's highlighter cost the browser ~0.5 s on
    every page load; as a fragment, opening it reruns only this box, not the page's work."""
    with st.sidebar:
        _share_fragment()


@st.fragment
def _share_fragment() -> None:
    from urllib.parse import urlencode

    box = st.expander("Copy link", key="share_open", on_change="rerun")
    with box:
        if box.open:
            base = (st.context.url or "").split("?")[0]
            link = f"{base}?{urlencode({k: st.query_params.get(k) for k in st.query_params})}"
            st.caption("This link reopens this page with the same model, prompt, settings and selection.")
            st.code(link, language=None, wrap_lines=True)


def gallery_store():
    from backend.storage.store import Store

    return Store()


def opened(kind: str):
    """The saved analysis named by ``?saved=ID`` when it is of ``kind`` (else None), with a
    banner saying so and a way back to live computation."""
    raw = st.query_params.get("saved")
    if not raw:
        return None
    try:
        saved = gallery_store().get(int(raw))
    except (UserInputError, ValueError) as exc:
        st.error(f"{exc}" if isinstance(exc, UserInputError) else f"'{raw}' is not a saved analysis id.")
        return None
    if saved.kind != kind:
        st.error(f"Saved analysis #{saved.id} is a {saved.kind}, not a {kind}: computing live instead.")
        return None
    cols = st.columns([5, 1])
    cols[0].info(f"Saved analysis #{saved.id}: **{saved.title}** (model {saved.model}). Shown as saved, not "
                 "recomputed." + (f"\n\n{saved.notes}" if saved.notes else ""))
    if cols[1].button("Compute live", key="leave_saved"):
        del st.query_params["saved"]
        st.rerun()
    return saved


@st.cache_resource
def _examples_started() -> dict:
    return {}


def start_examples_once(model: str) -> None:
    """On a server's first start, build the worked examples its gallery lacks, in the
    background (CIRCUITSCOPE_EXAMPLES=0 turns this off, as the tests do)."""
    import os

    from backend.storage.examples import build_missing_in_background

    started = _examples_started()
    if os.environ.get("CIRCUITSCOPE_EXAMPLES", "1") == "0" or started.get(model):
        return
    started[model] = True
    show_user_errors(build_missing_in_background, model, gallery_store())


def why_attend_link(handle: ModelHandle, text: str, layer: int, head: int, query: int = -1,
                    key: int | None = None, where=None) -> None:
    """A link to the attention page's QK explanation of ``head`` from ``query`` to ``key``
    (default: the key it attends to most)."""
    from backend.analyses.qk import strongest_key

    n = len(encode_prompt(handle, text))
    query %= n
    if key is None:
        key = show_user_errors(strongest_key, handle, text, layer, head, query)
        if key is None:
            return
    (where or st).page_link("views/attention.py", label=f"Why does a{layer}.h{head} attend from position {query} "
                                                        f"to {key}? (QK attribution)", icon="🔎",
                            query_params={**{k: st.query_params[k] for k in URL_KEYS if k in st.query_params},
                                          "qk": f"{layer}.{head}.{query}.{key}"})
