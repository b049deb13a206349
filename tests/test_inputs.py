"""Bad input gives one plain UserInputError message; good input resolves as documented."""

import re

import pytest

from backend.errors import UserInputError
from backend.runtime.models import get_model, load_uncached
from backend.runtime.prompts import encode_prompt, resolve_token


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
    with pytest.raises(UserInputError, match=r"no \*\.safetensors weights\.$"):
        get_model(str(tmp_path))


def test_pickled_weights_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle would run code")
    with pytest.raises(UserInputError, match="pickled .bin weights are never loaded"):
        load_uncached(str(tmp_path))


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


def test_long_prompts_are_refused_by_tokens_then_by_characters(tiny_llama):
    with pytest.raises(UserInputError, match="tokens long; the limit is 256"):
        encode_prompt(tiny_llama, "word " * 2000)  # 10,000 characters
    with pytest.raises(UserInputError, match="characters; the limit is 20000"):
        encode_prompt(tiny_llama, "x" * 20_001)


@pytest.mark.parametrize("text, code", [("abc\x00def", "U+0000"), ("bell\x07", "U+0007"),
                                        ("bytes \udcff from a bad file", "U+DCFF")])
def test_control_and_undecodable_characters_are_refused(tiny_llama, text, code):
    with pytest.raises(UserInputError, match=re.escape(code)):
        encode_prompt(tiny_llama, text)


def test_emoji_and_non_latin_scripts_work(tiny_llama):
    from backend.analyses.lens import logit_lens

    prompt = "東京は日本の首都です 🗼 — Ελληνικά, русский\tand tabs\n"
    result = logit_lens(tiny_llama, prompt)
    assert tiny_llama.tokenizer.decode(tiny_llama.tokenizer(prompt)["input_ids"]) == prompt
    assert len(result.tokens) == len(tiny_llama.tokenizer(prompt)["input_ids"])


def test_allowed_model_folders(tiny_llama, tmp_path, monkeypatch):
    inside = tmp_path / "allowed" / "tiny"
    tiny_llama.model.save_pretrained(inside)
    tiny_llama.tokenizer.save_pretrained(inside)
    outside = tmp_path / "elsewhere"
    tiny_llama.model.save_pretrained(outside)
    tiny_llama.tokenizer.save_pretrained(outside)
    monkeypatch.setenv("CIRCUITSCOPE_MODEL_DIRS", str(tmp_path / "allowed"))
    assert load_uncached(str(inside)).adapter.family == "llama"
    for name in (str(outside), str(inside / ".." / ".." / "elsewhere"), "HuggingFaceTB/SmolLM2-135M"):
        with pytest.raises(UserInputError, match="outside the model folders"):
            load_uncached(name)


def test_remote_code_is_off_unless_the_operator_turns_it_on(tiny_llama, tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append((kwargs["trust_remote_code"], kwargs.get("use_safetensors")))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    load_uncached(str(tmp_path))
    monkeypatch.setenv("CIRCUITSCOPE_TRUST_REMOTE_CODE", "1")
    load_uncached(str(tmp_path))
    assert seen == [(False, True), (True, True)]


def test_no_page_can_turn_on_remote_code_and_nothing_unpickles():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pages = " ".join(p.read_text() for p in [root / "app.py", *(root / "views").glob("*.py")])
    assert "trust_remote_code" not in pages and "TRUST_REMOTE_CODE" not in pages
    backend = " ".join(p.read_text() for p in (root / "backend").glob("*.py"))
    assert "import pickle" not in backend and "torch.load(" not in backend


def test_out_of_memory_is_a_plain_message_and_leaves_the_model_clean(tiny_llama, tmp_path, monkeypatch):
    import torch

    from backend.cli import main
    from backend.errors import is_out_of_memory
    from backend.graphs.attribution import attribution_graph

    def exhausted(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    ids = torch.tensor([encode_prompt(tiny_llama, "When Mary and John went")])
    with torch.no_grad():
        before = tiny_llama.model(ids).logits
    injected = tiny_llama.adapter.layers[1].mlp.register_forward_pre_hook(exhausted)
    try:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            attribution_graph(tiny_llama, "When Mary and John went", max_nodes=5)
    finally:
        injected.remove()
    assert is_out_of_memory(caught.value)
    hooks = [m for m in tiny_llama.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []
    with torch.no_grad():
        assert torch.equal(tiny_llama.model(ids).logits, before)

    monkeypatch.setattr("backend.cli.get_model", lambda name: tiny_llama)
    monkeypatch.setattr("backend.analyses.lens.logit_lens", exhausted)
    assert main(["lens", "--prompt", "a b", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_server_binds_to_localhost_with_an_upload_limit():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost" and config["server"]["maxUploadSize"] <= 50
