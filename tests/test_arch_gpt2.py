"""GPT-2 specifics: the per-layer score scale, attn_pdrop, save/load, cross-attention models."""

import copy

import torch

from cases.gpt2 import make
from ma_convert import convert, force_expert
from ma_convert.adapters.gpt2 import MaGPT2LMHeadModel, MetaGPT2Attention
from ma_convert.modeling.base import read_meta_attention_block

TOL = dict(atol=1e-5, rtol=1e-5)


def ids():
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def test_inverse_layer_scale_is_kept_and_matters():
    original = make("sdpa", scale_attn_by_inverse_layer_idx=True)
    model = convert(copy.deepcopy(original)).eval()
    assert [a.scaling for a in (b.attn for b in model.transformer.h)] == [0.25, 0.125]
    with torch.no_grad(), force_expert(model, "full"):
        got = model(ids()).logits
        for block in model.transformer.h:  # the plain 1/sqrt(d) scale would not match: the case tests it
            block.attn.scaling = 0.25
        wrong = model(ids()).logits
    expected = original(ids()).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(wrong, expected, **TOL)


def test_dropout_comes_from_attn_pdrop():
    model = convert(make("sdpa", attn_pdrop=0.25))
    assert read_meta_attention_block(model.config)[0].dropout == 0.25
    assert convert(make("sdpa", attn_pdrop=0.25), dropout=0.0).transformer.h[0].attn.meta.cfg.dropout == 0.0


def test_save_and_load_keeps_every_weight(tmp_path):
    # GPT-2's _init_weights re-draws c_proj of every GPT2Attention (ours are subclasses), and the
    # routers have their own init: a load must leave every saved tensor as it was.
    model = convert(make("sdpa")).eval()
    model.save_pretrained(tmp_path)
    loaded = MaGPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.transformer.h[0].attn, MetaGPT2Attention)
    before, after = model.state_dict(), loaded.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    for m, l in zip(model.transformer.h, loaded.transformer.h):  # non-persistent buffers too
        assert torch.equal(m.attn.meta.costs, l.attn.meta.costs)
        assert torch.equal(m.attn.meta.router.prior, l.attn.meta.router.prior)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, atol=0, rtol=0)


def test_cross_attention_model_keeps_its_cross_attention_and_caches():
    original = make("sdpa", add_cross_attention=True)
    model = convert(copy.deepcopy(original)).eval()
    assert all(isinstance(b.attn, MetaGPT2Attention) for b in model.transformer.h)
    assert not any(isinstance(b.crossattention, MetaGPT2Attention) for b in model.transformer.h)
    enc = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    x = ids()
    with torch.no_grad(), force_expert(model, "full"):
        expected = original(x, encoder_hidden_states=enc).logits
        torch.testing.assert_close(model(x, encoder_hidden_states=enc).logits, expected, **TOL)
        out = model(x[:, :6], encoder_hidden_states=enc, use_cache=True)
        steps = [out.logits]
        for t in range(6, x.shape[1]):
            out = model(x[:, t : t + 1], encoder_hidden_states=enc, past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)
