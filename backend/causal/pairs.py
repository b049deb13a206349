"""Clean/corrupted pairs: validation, a proposed corruption, default answer and wrong tokens,
and the metric every causal analysis (patching, circuits) measures.

The metric is read at the last position from the final-normed residual stream:
``logit_diff`` = logit(answer) - logit(wrong) (default), or ``logprob`` = log p(answer).
Results are shown *normalized* (0 = the corrupted run, 1 = the clean run) only when the
corruption moves the metric by at least ``MIN_SPAN`` nats: below that the denominator
(clean - corrupted) is too small for a ratio to mean anything (a 0.09 denominator turned a
0.25-nat change into "faithfulness 2.77"), so raw changes from the corrupted run are shown,
with a warning that says what to change. One nat multiplies the answer/wrong odds by e.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from backend.errors import UserInputError
from backend.runtime.cache import cached, is_cached
from backend.runtime.models import ModelHandle
from backend.runtime.prompts import encode_prompt, resolve_token, token_text

METRICS = ("logit_diff", "logprob")
MIN_SPAN = 1.0  # nats: below this, normalized numbers are refused

# Words to swap for one another when a prompt has no two names: a corrupted prompt then asks
# the same question about another entity.
SWAP_WORDS = (
    ("France", "Italy", "Germany", "Spain", "Japan", "China", "Egypt", "Canada", "Brazil", "Russia", "India"),
    ("Paris", "Rome", "Berlin", "Madrid", "Tokyo", "London", "Cairo", "Moscow"),
    ("Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah"),
    ("he", "she"), ("his", "her"), ("man", "woman"), ("king", "queen"), ("hot", "cold"), ("big", "small"),
    ("day", "night"), ("up", "down"),
    ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
)


def check_pair(handle: ModelHandle, clean: str, corrupt: str) -> tuple[list[int], list[int]]:
    """Token ids of both prompts, which must differ and have the same length."""
    clean_ids, corrupt_ids = encode_prompt(handle, clean), encode_prompt(handle, corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise UserInputError(
            f"The clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}; "
            "patching needs equal token lengths."
        )
    if clean_ids == corrupt_ids:
        raise UserInputError("The clean and corrupted prompts are the same.")
    return clean_ids, corrupt_ids


def propose_corruption(prompt: str, handle: ModelHandle | None = None) -> str:
    """A corrupted prompt: swap two names (the last occurrence of the most repeated
    capitalized name becomes the other name: "..., John gave a drink to" -> "..., Mary gave
    a drink to"); else replace the last word found in SWAP_WORDS by another of its group with
    the same token length (needs ``handle``): "The capital of France is" -> "... Italy is"."""
    words = re.findall(r"\b[A-Z][a-z]+\b", prompt)
    names = [w for w in dict.fromkeys(words) if words.index(w) > 0 or prompt.find(w) > 0]
    repeated = max(names, key=words.count) if names else None
    if len(names) >= 2 and words.count(repeated) >= 2:
        other = next(n for n in names if n != repeated)
        start = [m.start() for m in re.finditer(rf"\b{repeated}\b", prompt)][-1]
        return prompt[:start] + other + prompt[start + len(repeated):]
    if handle is not None:
        replaced = _replace_same_length(handle, prompt)
        if replaced:
            return replaced
    raise UserInputError("No two names or known words to swap in the prompt; type a corrupted prompt instead.")


def _replace_same_length(handle: ModelHandle, prompt: str) -> str | None:
    length = len(encode_prompt(handle, prompt))
    found = [(m.start(), m.group(), group) for group in SWAP_WORDS
             for m in re.finditer(rf"\b({'|'.join(group)})\b", prompt)]
    for start, word, group in sorted(found, reverse=True):  # the last word first
        for other in group:
            candidate = prompt[:start] + other + prompt[start + len(word):]
            if other != word and len(encode_prompt(handle, candidate)) == length:
                return candidate
    return None


# ---------------------------------------------------------------- answer and wrong tokens


@dataclass(frozen=True)
class AnswerChoice:
    answer: str
    wrong: str
    reason: str  # why these two, in a sentence


def default_answer_wrong(handle: ModelHandle, clean: str, corrupt: str, answer: str | None = None) -> AnswerChoice:
    """The clean run's top token against the corrupted run's top token when they differ;
    when both runs predict the same token (e.g. " the"), the tokens whose probability the
    corruption lowers most (answer) and raises most (wrong). A given ``answer`` is kept.
    Cached (see remember_suggestion)."""
    clean_ids, corrupt_ids = check_pair(handle, clean, corrupt)

    @torch.no_grad()
    def compute() -> AnswerChoice:  # both runs in one batch (equal lengths), read at the last position only
        final = handle.final_residual(torch.tensor([clean_ids, corrupt_ids], device=handle.device))
        return choose_answer_wrong(handle, final[0, -1], final[1, -1], answer)

    return cached(handle, "answer_wrong", (clean, corrupt, answer or None), compute)


def suggestion_ready(handle: ModelHandle, clean: str, corrupt: str, answer: str | None = None) -> bool:
    """Whether default_answer_wrong would return at once (its choice is cached)."""
    return is_cached(handle, "answer_wrong", (clean, corrupt, answer or None))


def remember_suggestion(handle: ModelHandle, clean: str, corrupt: str, answer: str | None,
                        choice: AnswerChoice) -> None:
    """Cache ``choice`` as default_answer_wrong's, for a caller that made it from its own runs
    of both prompts (choose_answer_wrong)."""
    cached(handle, "answer_wrong", (clean, corrupt, answer or None), lambda: choice)


@torch.no_grad()
def choose_answer_wrong(handle: ModelHandle, clean_last: torch.Tensor, corrupt_last: torch.Tensor,
                        answer: str | None = None) -> AnswerChoice:
    """default_answer_wrong's choice from the two runs' final-normed residuals at the last
    position [d] (for a caller that has run both prompts already)."""
    last = torch.stack([clean_last, corrupt_last]).detach()
    p_clean, p_corrupt = handle.adapter.logits_from_residual_normed(last).float().softmax(-1)

    def text(token_id: int) -> str:
        return token_text(handle, token_id)

    def probs(token_id: int) -> str:
        return f"p = {float(p_clean[token_id]):.3f} clean, {float(p_corrupt[token_id]):.3f} corrupted"

    if answer:
        answer_id = resolve_token(handle, answer)
        answer_reason = f"{text(answer_id)!r}: the chosen target ({probs(answer_id)})"
    else:
        answer_id = int(p_clean.argmax())
        answer_reason = f"{text(answer_id)!r}: the clean run's top token ({probs(answer_id)})"
        if answer_id == int(p_corrupt.argmax()):
            answer_id = int((p_clean - p_corrupt).argmax())
            answer_reason = (f"{text(answer_id)!r}: both runs predict {text(int(p_clean.argmax()))!r}, so the token "
                             f"the corruption lowers most ({probs(answer_id)})")
    corrupt_top = int(p_corrupt.argmax())
    if corrupt_top != answer_id:
        wrong_id, wrong_reason = (
            corrupt_top,
            f"{text(corrupt_top)!r}: the corrupted run's top token ({probs(corrupt_top)})",
        )
    else:
        rise = p_corrupt - p_clean
        rise[answer_id] = -1.0
        wrong_id = int(rise.argmax())
        wrong_reason = f"{text(wrong_id)!r}: the token the corruption raises most ({probs(wrong_id)})"
    return AnswerChoice(text(answer_id), text(wrong_id), f"Answer {answer_reason}; wrong {wrong_reason}.")


# ---------------------------------------------------------------- the metric


@dataclass(frozen=True)
class Metric:
    """The measured quantity at the last position (see module doc)."""

    kind: str
    answer: int
    wrong: int | None

    def __call__(self, handle: ModelHandle, final: torch.Tensor) -> torch.Tensor:
        """The metric of each row of a final-normed residual stream [B, P, d] -> [B]."""
        last = final[:, -1]
        if self.kind == "logprob":
            return handle.adapter.logits_from_residual_normed(last).float().log_softmax(-1)[:, self.answer]
        logits = last @ handle.adapter.unembed_weight()[[self.answer, self.wrong]].T
        if handle.adapter.final_softcap:
            logits = torch.tanh(logits / handle.adapter.final_softcap) * handle.adapter.final_softcap
        return logits[:, 0] - logits[:, 1]

    @property
    def label(self) -> str:
        return "log p(answer)" if self.kind == "logprob" else "logit difference"


def make_metric(handle: ModelHandle, answer: str, wrong: str | None, kind: str = "logit_diff") -> Metric:
    if kind not in METRICS:
        raise UserInputError(f"Unknown metric '{kind}'; choose from {', '.join(METRICS)}.")
    answer_id = resolve_token(handle, answer)
    if kind == "logprob":
        return Metric(kind, answer_id, None)
    if not wrong:
        raise UserInputError("The logit difference needs a wrong token.")
    wrong_id = resolve_token(handle, wrong)
    if answer_id == wrong_id:
        raise UserInputError("The answer and wrong tokens are the same token.")
    return Metric(kind, answer_id, wrong_id)


@dataclass(frozen=True)
class Scale:
    """Turns raw metric values into the numbers shown: (value - corrupt) / (clean - corrupt)
    when ``normalized``, else value - corrupt (raw nats, 0 = the corrupted run)."""

    clean: float
    corrupt: float
    normalized: bool
    warning: str | None

    @property
    def span(self) -> float:
        return self.clean - self.corrupt

    def __call__(self, value):
        return (value - self.corrupt) / self.span if self.normalized else value - self.corrupt

    @property
    def unit(self) -> str:
        return (
            "normalized (0 = corrupted, 1 = clean)" if self.normalized else "raw change from the corrupted run (nats)"
        )

    def to_dict(self) -> dict:
        return {"clean": self.clean, "corrupt": self.corrupt, "denominator": self.span,
                "normalized": self.normalized, "warning": self.warning}


def make_scale(clean: float, corrupt: float, label: str = "logit difference") -> Scale:
    """Normalize only when the corruption moves the metric by at least MIN_SPAN (module doc)."""
    span = clean - corrupt
    if abs(span) < 1e-6:
        raise UserInputError(f"The clean and corrupted runs give the same {label}: nothing to localize.")
    if abs(span) >= MIN_SPAN:
        return Scale(clean, corrupt, True, None)
    warning = (f"The corruption moves the {label} by only {span:+.3f} nats (clean {clean:.3f}, corrupted "
               f"{corrupt:.3f}), below {MIN_SPAN:g}: normalized numbers would divide by {span:.3f}, so raw changes "
               "are shown. Choose answer and wrong tokens the corruption swaps (the clean and corrupted runs' top "
               "tokens), or a corruption that changes the answer.")
    return Scale(clean, corrupt, False, warning)


FAITHFULNESS_RANGE = (-0.5, 1.5)


def faithfulness_note(value: float, scale: Scale) -> str | None:
    """A plain note for a normalized faithfulness outside FAITHFULNESS_RANGE."""
    if not scale.normalized:
        return None
    low, high = FAITHFULNESS_RANGE
    if value > high:
        return (f"Overshoot: {value:.2f} means the circuit alone moves the metric {value:.1f} times as far as the "
                "full model does; the edges left out pull the other way.")
    if value < low:
        return (f"Sign flip: {value:.2f} means the circuit alone moves the metric the opposite way from the full "
                "model; its edges oppose the behaviour.")
    return None
