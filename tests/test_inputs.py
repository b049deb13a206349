"""Bad input gives one plain UserInputError message; good input resolves as documented."""

import pytest

from backend.errors import UserInputError
from backend.models import get_model, load_uncached
from backend.prompts import encode_prompt, resolve_token


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_refused(tiny_llama, prompt):
    with pytest.raises(UserInputError, match="empty"):
        encode_prompt(tiny_llama, prompt)


def test_prompt_over_the_token_limit_is_refused(tiny_llama, monkeypatch):
    monkeypatch.setenv("CIRCUITSCOPE_MAX_TOKENS", "5")
    with pytest.raises(UserInputError, match="limit is 5"):
        encode_prompt(tiny_llama, "When Mary and John went to the store")


def test_target_resolution(tiny_llama):
    mary = resolve_token(tiny_llama, " Mary")
    assert tiny_llama.tokenizer.decode([mary]) == " Mary"
    assert resolve_token(tiny_llama, f"#{mary}") == mary
    assert resolve_token(tiny_llama, "ĠMary") == mary  # the raw vocabulary entry


@pytest.mark.parametrize("text", [" Mary and John", "#99999", ""])
def test_target_that_is_not_one_token_is_refused(tiny_llama, text):
    with pytest.raises(UserInputError):
        resolve_token(tiny_llama, text)


@pytest.mark.parametrize("name", ["no-such-model", "/no/such/folder.gguf", "./missing-folder", ""])
def test_unknown_models_are_refused(name):
    with pytest.raises(UserInputError):
        load_uncached(name)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserInputError, match="no weights"):
        get_model(str(tmp_path))


def test_truncated_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(UserInputError, match="Could not load gguf"):
        load_uncached(str(bad))
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_local_folder_round_trip(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    handle = load_uncached(str(tmp_path))
    assert handle.adapter.family == "llama"
    import torch

    ids = torch.tensor([encode_prompt(handle, "When Mary went")])
    with torch.no_grad():
        assert torch.allclose(handle.model(ids).logits, tiny_llama.model(ids).logits, atol=1e-6)
