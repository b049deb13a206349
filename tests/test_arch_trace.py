"""The adapter reads the right tensors on every family: rebuilt sums equal what the model computed."""

import numpy as np
import torch

from backend.runtime.trace import run_trace

PROMPT = "When Mary and John went to the store"


def test_residual_rebuilt_from_components(tiny):
    trace = run_trace(tiny, PROMPT)
    rebuilt = trace.resid[0] + trace.attn_out.sum(0) + trace.mlp_out.sum(0)
    np.testing.assert_allclose(rebuilt, trace.resid[-1], atol=1e-5)
    for layer in range(tiny.adapter.n_layers):  # block by block, too
        step = trace.resid[layer] + trace.attn_out[layer] + trace.mlp_out[layer]
        np.testing.assert_allclose(step, trace.resid[layer + 1], atol=1e-5)


def test_first_residual_is_the_embedding_input(tiny):
    trace = run_trace(tiny, PROMPT)
    ids = torch.tensor([trace.token_ids])
    with torch.no_grad():
        hidden = tiny.model(ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(trace.resid[0], hidden[0][0].numpy(), atol=1e-6)


def test_logits_are_the_readout_of_the_last_residual(tiny):
    trace = run_trace(tiny, PROMPT)
    with torch.no_grad():
        readout = tiny.adapter.logits_from_residual(torch.as_tensor(trace.resid[-1])).numpy()
    np.testing.assert_allclose(readout, trace.logits, atol=1e-4)


def test_heads_sum_to_the_output_projection(tiny):
    trace = run_trace(tiny, PROMPT, heads=True)
    for layer, parts in enumerate(tiny.adapter.layers):
        bias = parts.o_proj.bias.detach().numpy() if parts.o_proj.bias is not None else 0.0
        projected = trace.head_out[layer].sum(1) + bias
        if tiny.adapter.family == "gemma":  # post-attention norm sits between o_proj and the residual
            with torch.no_grad():
                projected = parts.attn_out(torch.as_tensor(projected)).numpy()
        np.testing.assert_allclose(projected, trace.attn_out[layer], atol=1e-5)


def test_neurons_through_down_projection_give_mlp_output(tiny):
    trace = run_trace(tiny, PROMPT, neurons=True)
    assert trace.neurons.shape[-1] == tiny.adapter.d_mlp
    for layer, parts in enumerate(tiny.adapter.layers):
        weight = tiny.adapter.down_proj_weight(layer).detach().numpy()
        bias = parts.down_proj.bias.detach().numpy() if parts.down_proj.bias is not None else 0.0
        out = trace.neurons[layer] @ weight.T + bias
        if tiny.adapter.family == "gemma":
            with torch.no_grad():
                out = parts.mlp_out(torch.as_tensor(out)).numpy()
        np.testing.assert_allclose(out, trace.mlp_out[layer], atol=1e-5)


def test_attention_patterns_are_causal_distributions(tiny):
    trace = run_trace(tiny, PROMPT, patterns=True)
    n_pos = len(trace.tokens)
    assert trace.patterns.shape == (tiny.adapter.n_layers, tiny.adapter.n_heads, n_pos, n_pos)
    np.testing.assert_allclose(trace.patterns.sum(-1), 1.0, atol=1e-5)
    future = np.triu(np.ones((n_pos, n_pos), dtype=bool), k=1)
    assert np.abs(trace.patterns[..., future]).max() == 0.0


def test_hooks_are_removed_after_a_trace(tiny_llama):
    run_trace(tiny_llama, PROMPT, patterns=True, heads=True, neurons=True)
    for module in tiny_llama.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
