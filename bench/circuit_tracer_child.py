"""circuit-tracer's own attribute(), run in its virtual environment (.venv-ct: circuit-tracer
0.5.0 pins transformers<=4.57.3; `make ct-venv`), for bench/run.py and tests to compare with.

    .venv-ct/bin/python bench/circuit_tracer_child.py MODEL_DIR TRANSCODER_DIR IDS OUT.npz
        [--max-feature-nodes N] [--batch-size B]

MODEL_DIR: a Hugging Face model folder (config.json + safetensors); TRANSCODER_DIR: a
per-layer or cross-layer set in circuit-tracer's format; IDS: comma-separated token ids (so both tools read
the same tokens). Writes the graph's arrays and the attribution time. Imports nothing from
Circuitscope.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def load(model_dir: str, transcoder_dir: str):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.utils.hf_utils import load_transcoders
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = Path(transcoder_dir)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    if config["model_kind"] == "cross_layer_transcoder":  # load_transcoders would download config["repo_id"]
        transcoders = load_clt(str(folder), feature_input_hook=config["feature_input_hook"],
                               feature_output_hook=config["feature_output_hook"], scan=config.get("scan"),
                               device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    else:
        entries = config.get("transcoders") or [f"layer_{i}.safetensors"
                                                for i in range(len(list(folder.glob("layer_*"))))]
        config["transcoders"] = [str(folder / Path(p).name) for p in entries]  # local files, as a hub set lists them
        transcoders = load_transcoders(config, device=torch.device("cpu"), lazy_decoder=False)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = get_pretrained_model_config(model_dir, fold_ln=False, device="cpu", dtype=torch.float32)
    # TransformerLens 2.18's generic Llama conversion leaves rotary_base at 10,000 (SmolLM2 uses 100,000),
    # and transformers 4.57 does not read a transformers-5 config's rope_parameters: take it from the file
    raw = json.loads(Path(model_dir, "config.json").read_text())
    rope = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
    if rope:
        cfg.rotary_base = float(rope)
    state = get_pretrained_state_dict(model_dir, cfg, hf_model)
    # the folder's tokenizer_config.json names a transformers-5 class: re-save it in this version's format
    saved = tempfile.mkdtemp()
    original = json.loads(Path(model_dir, "tokenizer_config.json").read_text())
    special = {key: original[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
               if isinstance(original.get(key), str)}
    PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", **special).save_pretrained(saved)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(saved)
    model = TransformerLensReplacementModel(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model._configure_replacement_model(transcoders)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("transcoder_dir")
    parser.add_argument("ids")
    parser.add_argument("out")
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from circuit_tracer import attribute

    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    model = load(args.model_dir, args.transcoder_dir)
    load_s = time.perf_counter() - started
    ids = torch.tensor([int(x) for x in args.ids.split(",")])
    started = time.perf_counter()
    graph = attribute(ids, model, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
                      verbose=False)
    attribute_s = time.perf_counter() - started
    np.savez(args.out, adjacency=graph.adjacency_matrix.numpy(), active_features=graph.active_features.numpy(),
             activation_values=graph.activation_values.numpy(), selected_features=graph.selected_features.numpy(),
             logit_targets=np.array([t.vocab_idx for t in graph.logit_targets]),
             logit_probabilities=graph.logit_probabilities.numpy(), attribute_s=attribute_s, load_s=load_s)


if __name__ == "__main__":
    main()
