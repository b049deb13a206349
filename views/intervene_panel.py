"""The shared "Intervene" panel: any page opens it with its selected or pinned neurons."""

from __future__ import annotations

import streamlit as st

from backend.causal.controls import controls
from backend.causal.interventions import intervene
from backend.runtime.models import ModelHandle
from components.charts import null_histogram, top_tokens_bar
from views.common import show_user_errors
from views.unit_panel import unit_panel

OPERATIONS = {"zero": "Zero-ablate", "scale": "Scale by a factor", "mean": "Mean-ablate (over reference prompts)",
              "add": "Add a value (steer)"}
NULLS = {"matched": "matched on activation magnitude", "plain": "uniform within each layer"}


def _label(item: dict) -> str:
    where = "" if item.get("positions") is None else " @" + ",".join(map(str, item["positions"]))
    return f"L{item['layer']} {'N' if item['kind'] == 'neuron' else 'H'}{item['index']}{where}"


def _side(where, side, title: str, key: str) -> None:
    where.markdown(f"**{title}** — {side.selection}")
    cols = where.columns(3)
    cols[0].metric("Effect (logit spreads)", f"{side.observed:+.3f}", f"{side.observed_logit:+.3g} logits",
                   delta_color="off")
    cols[1].metric("z (two-sided)", f"{side.z_score:.2f}")
    cols[2].metric("p (two-sided)", f"{side.p_value:.3g}")
    where.plotly_chart(null_histogram(side.null, side.observed, f"{title}: random sets", "effect (logit spreads)"),
                       key=f"{key}_null_{title[:4]}", theme=None)
    where.caption(f"Δ p(target) = {side.observed_prob:+.4g}; baseline target logit − mean = {side.baseline_logit:.3g}, "
                  f"logit spread {side.logit_spread:.3g}.")


def _neuron_dashboard(handle: ModelHandle, prompt: str, items: list[dict], key: str) -> None:
    neurons = list(dict.fromkeys((item["layer"], item["index"]) for item in items if item["kind"] == "neuron"))
    if not neurons:
        return
    chosen = st.selectbox("Neuron dashboard", [None, *neurons], key=f"{key}_dashboard",
                          format_func=lambda n: "none" if n is None else f"L{n[0]}/N{n[1]}")
    if chosen is not None:
        unit_panel(handle, prompt, chosen[0], chosen[1], f"{key}_unit")


def intervene_panel(handle: ModelHandle, prompt: str, target: str | None, items: list[dict], key: str,
                    extra: dict | None = None) -> None:
    """``items``: neuron or head targets ({kind, layer, index, positions}); ``extra`` adds
    spec fields (a corrupted prompt for corrupt-ablation, the ``selection`` rule that chose
    the items, which the dead-salmon control re-runs)."""
    operations = dict(OPERATIONS)
    if extra and extra.get("corrupt_prompt"):
        operations["corrupt"] = "Corrupt-ablate (value from the corrupted prompt)"
    with st.expander(f"Intervene on {len(items)} target(s)", expanded=False):
        if not items:
            st.info("Select or pin neurons first.")
            return
        st.caption(", ".join(_label(item) for item in items))
        _neuron_dashboard(handle, prompt, items, key)
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
        before.plotly_chart(top_tokens_bar(result.before["top"], result.target["id"], "Before"), key=f"{key}_before",
                            theme=None)
        after.plotly_chart(top_tokens_bar(result.after["top"], result.target["id"], "After"), key=f"{key}_after",
                           theme=None)
        before.markdown("**Continuation before**")
        before.code(result.before["continuation"], language=None, wrap_lines=True)
        after.markdown("**Continuation after**")
        after.code(result.after["continuation"], language=None, wrap_lines=True)

        st.markdown("**Controls** — could chance, or the method itself, give this effect?")
        cols = st.columns(2)
        n_random = cols[0].number_input("Random sets", 10, 1000, 100, step=10, key=f"{key}_n")
        null = cols[1].selectbox("Random sets are", list(NULLS), format_func=NULLS.get, key=f"{key}_nullkind")
        if st.button("Run the controls (random sets, re-initialized model)", key=f"{key}_controls"):
            st.session_state[f"{key}_controls_for"] = (repr(spec), int(n_random), null)
        if st.session_state.get(f"{key}_controls_for") != (repr(spec), int(n_random), null):
            return
        bar = st.progress(0.0, text="Controls")
        control = show_user_errors(controls, handle, prompt, spec, int(n_random), null=null,
                                   progress=lambda f, m: bar.progress(min(f, 1.0), text=m))
        bar.empty()
        if control is None:
            return
        trained, salmon = st.columns(2)
        _side(trained, control.trained, "Trained model", key)
        if control.dead_salmon is not None:
            _side(salmon, control.dead_salmon, "Re-initialized model", key)
            ratio = abs(control.dead_salmon.observed) / max(abs(control.trained.observed), 1e-12)
            verdict = ("The same analysis on a re-initialized network finds an effect of similar size: this set "
                       "explains little beyond what the method produces anyway." if ratio > 0.3 else
                       f"The re-initialized network's own set moves its target {ratio:.0%} as far (in logit spreads).")
            st.info(verdict)
        st.caption(f"z and p are {control.sidedness}. Random sets: same layers and positions, never a claimed unit, "
                   f"never twice in a set, {NULLS[control.null_kind]}.")
