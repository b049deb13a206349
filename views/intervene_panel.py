"""The shared "Intervene" panel: any page opens it with its selected or pinned neurons."""

from __future__ import annotations

import streamlit as st

from backend.causal.interventions import controls, intervene
from backend.runtime.models import ModelHandle
from components.charts import null_histogram, top_tokens_bar
from views.common import show_user_errors

OPERATIONS = {"zero": "Zero-ablate", "scale": "Scale by a factor", "mean": "Mean-ablate (over reference prompts)",
              "add": "Add a value (steer)"}


def _label(item: dict) -> str:
    where = "" if item.get("positions") is None else " @" + ",".join(map(str, item["positions"]))
    return f"L{item['layer']} {'N' if item['kind'] == 'neuron' else 'H'}{item['index']}{where}"


def intervene_panel(handle: ModelHandle, prompt: str, target: str | None, items: list[dict], key: str,
                    extra: dict | None = None) -> None:
    """``items``: neuron or head targets ({kind, layer, index, positions}); ``extra`` adds
    spec fields (e.g. a corrupted prompt for corrupt-ablation)."""
    operations = dict(OPERATIONS)
    if extra and extra.get("corrupt_prompt"):
        operations["corrupt"] = "Corrupt-ablate (value from the corrupted prompt)"
    with st.expander(f"Intervene on {len(items)} target(s)", expanded=False):
        if not items:
            st.info("Select or pin neurons first.")
            return
        st.caption(", ".join(_label(item) for item in items))
        cols = st.columns([2, 1, 1])
        op = cols[0].selectbox("Operation", list(operations), format_func=operations.get, key=f"{key}_op")
        factor = cols[1].number_input("Factor / value", value=2.0 if op == "scale" else 1.0, key=f"{key}_factor")
        n_continue = cols[2].number_input("Continuation tokens", 0, 50, 10, key=f"{key}_continue")
        references = ""
        if op == "mean":
            references = st.text_area("Reference prompts (one per line)", key=f"{key}_refs")
        spec = {"interventions": [{**item, "op": op, "factor": factor} for item in items], "target": target,
                "continue_tokens": int(n_continue),
                "reference_prompts": [line for line in references.splitlines() if line.strip()], **(extra or {})}
        if st.button("Run the intervention", key=f"{key}_run"):
            st.session_state[f"{key}_spec"] = spec
        if st.session_state.get(f"{key}_spec") != spec:
            return
        result = show_user_errors(intervene, handle, prompt, spec)
        if result is None:
            return
        st.metric(f"p({result.target['token']!r})", f"{result.after['target_prob']:.4f}",
                  f"{result.delta_target_prob:+.4f}")
        before, after = st.columns(2)
        before.plotly_chart(top_tokens_bar(result.before["top"], result.target["id"], "Before"), key=f"{key}_before")
        after.plotly_chart(top_tokens_bar(result.after["top"], result.target["id"], "After"), key=f"{key}_after")
        before.markdown("**Continuation before**")
        before.code(result.before["continuation"], language=None, wrap_lines=True)
        after.markdown("**Continuation after**")
        after.code(result.after["continuation"], language=None, wrap_lines=True)
        n_random = st.number_input("Random sets for the controls", 10, 1000, 100, step=10, key=f"{key}_n")
        if st.button("Run the controls (random same-layer sets, re-initialized model)", key=f"{key}_controls"):
            bar = st.progress(0.0, text="Controls")
            control = show_user_errors(controls, handle, prompt, spec, int(n_random),
                                       progress=lambda f, m: bar.progress(min(f, 1.0), text=m))
            bar.empty()
            if control is not None:
                st.plotly_chart(null_histogram(control.null, control.observed, "Trained model: random sets"),
                                key=f"{key}_null")
                salmon = control.dead_salmon
                st.markdown(
                    f"z = **{control.z_score:.2f}**, empirical p = **{control.p_value:.3g}** "
                    f"({len(control.null)} random sets). Re-initialized model: effect {salmon['observed']:+.3g}, "
                    f"z = {salmon['z_score']:.2f}, p = {salmon['p_value']:.3g}."
                )
