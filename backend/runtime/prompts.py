"""Prompt and token handling: validation with plain messages, readable token strings."""

from __future__ import annotations

import unicodedata

from backend.errors import UserInputError
from backend.runtime.config import max_prompt_chars, max_prompt_tokens
from backend.runtime.models import ModelHandle


def encode_prompt(handle: ModelHandle, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as the model sees it (the tokenizer's own special tokens)."""
    check_text(prompt)
    ids = handle.tokenizer(prompt)["input_ids"]
    limit = max_prompt_tokens()
    if len(ids) > limit:
        raise UserInputError(
            f"The prompt is {len(ids)} tokens long; the limit is {limit} (set CIRCUITSCOPE_MAX_TOKENS)."
        )
    return list(ids)


def check_text(prompt: str) -> None:
    """Refuse empty prompts, overly long ones (before tokenizing), control characters other
    than tab and newline, and unpaired surrogates (undecodable bytes from a file)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserInputError("The prompt is empty: type some text.")
    if len(prompt) > max_prompt_chars():
        raise UserInputError(f"The prompt has {len(prompt)} characters; the limit is {max_prompt_chars()} "
                             "(set CIRCUITSCOPE_MAX_CHARS).")
    for position, char in enumerate(prompt):
        category = unicodedata.category(char)
        if (category == "Cc" and char not in "\t\n\r") or category == "Cs":
            raise UserInputError(f"The prompt contains an invisible control or undecodable character "
                                 f"(U+{ord(char):04X}) at character {position}; remove it.")


def token_text(handle: ModelHandle, token_id: int) -> str:
    return handle.tokenizer.decode([int(token_id)])


def token_texts(handle: ModelHandle, ids: list[int]) -> list[str]:
    return [token_text(handle, i) for i in ids]


def resolve_token(handle: ModelHandle, text: str) -> int:
    """The vocabulary id of ``text``, which must be exactly one token.

    Accepts the decoded text (" Paris", leading space included), a raw vocabulary entry
    ("ĠParis"), or "#1234" for an id.
    """
    if text is None or text == "":
        raise UserInputError("No target token given.")
    if text.startswith("#") and text[1:].isdigit():
        token_id = int(text[1:])
        if token_id >= handle.vocab_size:
            raise UserInputError(f"Token id {token_id} is outside the vocabulary (size {handle.vocab_size}).")
        return token_id
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    raw = handle.tokenizer.convert_tokens_to_ids(text)
    unk = getattr(handle.tokenizer, "unk_token_id", None)
    if isinstance(raw, int) and raw != unk and raw is not None:
        return raw
    pieces = " + ".join(repr(token_text(handle, i)) for i in ids) or "nothing"
    raise UserInputError(
        f"Target {text!r} is not one token of the vocabulary (it is {len(ids)}: {pieces}); "
        "type a single token, e.g. ' Paris' with its leading space."
    )


# ---------------------------------------------------------------- the document-start token

BOS_MODES = ("on", "off")


def adds_special_start(handle: ModelHandle) -> bool:
    """Whether the tokenizer itself starts every prompt with a special token (Gemma's <bos>)."""
    ids = handle.tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] in set(handle.tokenizer.all_special_ids)


def document_start(handle: ModelHandle) -> str | None:
    """The text of the token the model saw at document boundaries in pretraining, to prepend
    when its tokenizer adds none: "<|endoftext|>" where the vocabulary has it as a special
    token (GPT-2, SmolLM2, Qwen, Pythia), else the BOS token, else the EOS token.

    Why: position 0 of every sequence is an attention sink with an unusually large norm, and
    gradient-based attributions pile up there. A fixed special token takes that role, so the
    first word of the prompt is a normal token, and graphs leave the sink out of their nodes
    (as circuit-tracer does with the BOS). On SmolLM2 the instruct model's BOS
    "<|im_start|>" lowers p(" cold") after "The opposite of hot is" from 0.68 to 0.26, while
    "<|endoftext|>" keeps every measured top-1 (and raises p: 0.68 -> 0.76)."""
    if adds_special_start(handle):
        return None
    tokenizer = handle.tokenizer
    if "<|endoftext|>" in tokenizer.all_special_tokens:
        return "<|endoftext|>"
    return tokenizer.bos_token or tokenizer.eos_token


def with_bos(handle: ModelHandle, text: str, mode: str = "on") -> str:
    """``text`` as the model should read it: with the document-start token in front when
    ``mode`` is "on" and the tokenizer adds no special token itself (idempotent)."""
    if mode not in BOS_MODES:
        raise UserInputError(f"Unknown document-start mode '{mode}'; choose on or off.")
    check_text(text)  # an empty prompt stays empty, not "<|endoftext|>"
    start = document_start(handle) if mode == "on" else None
    if not start or text.startswith(start):
        return text
    return start + text


def starts_with_special(handle: ModelHandle, ids: list[int]) -> bool:
    """Whether position 0 holds a special token (a BOS or document start: the attention sink)."""
    return bool(ids) and ids[0] in set(handle.tokenizer.all_special_ids)
