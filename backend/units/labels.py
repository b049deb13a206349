"""Unit labels without any external service.

``auto_label`` is deterministic: the tokens a unit fires on most (the token at the maximum
of its top examples, counted with case and spacing folded), the token before them when most
examples share it, and the tokens its output promotes most. Example:
``on "Paris" "London" (after "of") → "France" "city"``. Users edit labels on the dashboard;
edited labels live in the gallery database (``Store.unit_labels``), keyed by the model's
weight fingerprint, and replace the automatic ones in graphs and exports (``clerp``).
"""

from __future__ import annotations

from collections import Counter

from backend.runtime.models import ModelHandle
from backend.units.unitset import Neurons, UnitSet, model_fingerprint

MAX_ON = 3
MAX_PROMOTES = 2
SHARED_CONTEXT = 0.5  # the previous token is named when at least this share of examples have it


def label_key(handle: ModelHandle, units: UnitSet | None = None) -> str:
    """Whose labels: this model's weights and units (labels of another fine-tune never show)."""
    units = units or Neurons.of(handle)
    return f"{handle.name}:{model_fingerprint(handle)}:{units.key()}"


def _folded(token: str) -> str:
    return token.strip().lower()


def _quoted(token: str) -> str:
    return '"' + token.strip().replace('"', "'") + '"'


def auto_label(top_examples: list[dict], promotes: list[str]) -> str:
    """A short deterministic label from the top examples ({tokens, max_pos}) and promoted tokens."""
    fired = [e["tokens"][e["max_pos"]] for e in top_examples if e.get("tokens")]
    if not fired:
        return "never active in the corpus"
    counts = Counter(_folded(t) for t in fired if _folded(t))
    first_spelling: dict[str, str] = {}
    for token in fired:
        first_spelling.setdefault(_folded(token), token)
    repeated = [t for t, c in counts.most_common() if c >= 2][:MAX_ON]
    chosen = repeated or [_folded(t) for t in fired[:2] if _folded(t)]
    parts = ["on " + " ".join(_quoted(first_spelling.get(t, t)) for t in dict.fromkeys(chosen))] if chosen else []
    before = [_folded(e["tokens"][e["max_pos"] - 1]) for e in top_examples if e.get("tokens") and e["max_pos"] > 0]
    if before:
        word, count = Counter(before).most_common(1)[0]
        if word and count >= SHARED_CONTEXT * len(top_examples):
            parts.append(f"(after {_quoted(word)})")
    readable = [t for t in promotes if t.strip() and "\ufffd" not in t]  # a lone byte of a character reads as �
    promoted = list(dict.fromkeys(_quoted(t) for t in readable))[:MAX_PROMOTES]
    if promoted:
        parts.append("→ " + " ".join(promoted))
    return " ".join(parts) or "fires on whitespace"
