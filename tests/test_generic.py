"""Generic patching of nn.MultiheadAttention: weight-preserving, exact under forced full routing."""

import copy

import pytest
import torch
import torch.nn as nn

from ma_convert import MetaAttnConfig, collect_aux_losses, force_expert, patch_module, routing_stats
from ma_convert.core.generic import MetaMultiheadAttention

D, H = 32, 4
CFG = MetaAttnConfig(d_model=D, n_heads=H, window_size=4, controller_hidden=8)


def patched_copy(module):
    patched = copy.deepcopy(module)
    patch_module(patched, nn.MultiheadAttention, CFG)
    return patched


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forced_full_reproduces_multihead_attention(batch_first, bias):
    mha = nn.MultiheadAttention(D, H, batch_first=batch_first, bias=bias).eval()
    wrapper = nn.Sequential(mha)
    patched = patched_copy(wrapper)
    meta = patched[0]
    assert isinstance(meta, MetaMultiheadAttention)
    # The original parameters keep their names: the state dict is a superset of the original's.
    original_keys = set(wrapper.state_dict())
    assert original_keys <= set(patched.state_dict())
    assert all(torch.equal(wrapper.state_dict()[k], patched.state_dict()[k]) for k in original_keys)

    x = torch.randn(3, 12, D) if batch_first else torch.randn(12, 3, D)
    padding = torch.zeros(3, 12, dtype=torch.bool)
    padding[1, -4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(12)
    arbitrary = torch.randn(12, 12)
    float_padding = torch.zeros(3, 12).masked_fill(padding, float("-inf"))
    cases = [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal, "is_causal": True},
        {"attn_mask": causal},
        {"attn_mask": causal.isinf()},  # boolean: True = blocked
        {"attn_mask": arbitrary, "key_padding_mask": float_padding},
    ]
    with torch.no_grad(), force_expert(patched, "full"):
        for kwargs in cases:
            expected, _ = mha(x, x, x, need_weights=False, **kwargs)
            if kwargs.get("attn_mask") is arbitrary:  # the linear expert cannot apply an arbitrary bias
                with pytest.warns(UserWarning, match="linear expert cannot"):
                    got, weights = meta(x, x, x, need_weights=False, **kwargs)
            else:
                got, weights = meta(x, x, x, need_weights=False, **kwargs)
            assert weights is None
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=str(kwargs.keys()))


def test_causal_mask_is_detected_and_routed_causally():
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    meta = patched_copy(nn.Sequential(mha))[0].eval()
    x = torch.randn(1, 16, D)
    y = x.clone()
    y[:, 10:] += 1.0
    mask = nn.Transformer.generate_square_subsequent_mask(16)
    with torch.no_grad():
        a, _ = meta(x, x, x, attn_mask=mask)
        b, _ = meta(y, y, y, attn_mask=mask)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mask",
    [
        nn.Transformer.generate_square_subsequent_mask(16),
        torch.full((16, 16), -1e9).triu(1),
        torch.full((16, 16), torch.finfo(torch.float32).min).triu(1),
        torch.ones(16, 16, dtype=torch.bool).triu(1),
    ],
    ids=["-inf", "-1e9", "finfo.min", "bool"],
)
@pytest.mark.parametrize("expert", ["full", "linear", "local"])
def test_every_form_of_causal_mask_makes_every_expert_causal(mask, expert):
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, batch_first=True, dropout=0.0), 2)
    patch_module(encoder, nn.MultiheadAttention, CFG)
    encoder.eval()
    x = torch.randn(1, 16, D)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad(), force_expert(encoder, expert):
        a, b = encoder(x, mask=mask), encoder(y, mask=mask)
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=1e-5, rtol=1e-5)


def test_transformer_with_decoder_cross_attention():
    model = nn.Transformer(D, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, batch_first=True)
    names = patch_module(model, nn.MultiheadAttention, CFG)
    assert names == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn"]
    assert isinstance(model.decoder.layers[0].multihead_attn, nn.MultiheadAttention)
    out = model(torch.randn(2, 9, D), torch.randn(2, 7, D))
    assert out.shape == (2, 7, D)
    assert [s.n_tokens for s in routing_stats(model)] == [18, 14]


def test_cross_attention_runs_the_original():
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    meta = patched_copy(nn.Sequential(mha))[0].eval()
    q, mem = torch.randn(2, 5, D), torch.randn(2, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(meta(q, mem, mem)[0], mha(q, mem, mem)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the unpatched original's fast path
def test_seed_transformer_encoder_example():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=256, nhead=8, batch_first=True), num_layers=4)
    original = copy.deepcopy(encoder)
    names = patch_module(encoder, nn.MultiheadAttention, MetaAttnConfig(d_model=256, n_heads=8))
    assert names == [f"layers.{i}.self_attn" for i in range(4)]

    x = torch.randn(2, 32, 256)
    out = encoder(x)
    aux = collect_aux_losses(encoder)
    assert out.shape == (2, 32, 256) and aux.requires_grad
    (out.mean() + aux).backward()
    assert encoder.layers[0].self_attn.meta.router.fc2.weight.grad is not None

    # In eval under no_grad torch would take its fused encoder fast path; ours must still route.
    encoder.eval()
    original.eval()
    with torch.no_grad():
        encoder(x)
        assert all(s.n_tokens == 64 for s in routing_stats(encoder))
        padding = torch.zeros(2, 32, dtype=torch.bool)
        padding[0, -5:] = True
        with force_expert(encoder, "full"):
            for kwargs in ({}, {"src_key_padding_mask": padding}):
                got, expected = encoder(x, **kwargs), original(x, **kwargs)
                if kwargs:  # the fused fast path returns zeros at padded positions; compare real tokens
                    got, expected = got[~padding], expected[~padding]
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_patch_module_errors():
    with pytest.raises(TypeError, match="nn.MultiheadAttention modules only"):
        patch_module(nn.Sequential(nn.Linear(2, 2)), nn.Linear, CFG)
    with pytest.raises(ValueError, match="no MultiheadAttention module found"):
        patch_module(nn.Sequential(nn.Linear(2, 2)), nn.MultiheadAttention, CFG)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        patch_module(nn.Sequential(nn.MultiheadAttention(D, H, add_bias_kv=True)), nn.MultiheadAttention, CFG)
