"""Falcon specifics: kv heads of each layout, the grouped kv cache, and the ALiBi reference."""

import copy

import torch

from cases.falcon import make
from ma_convert import convert, force_expert
from ma_convert.adapters import falcon as adapter

TOL = dict(atol=1e-5, rtol=1e-5)
ALIBI = dict(alibi=True, multi_query=False, bias=True)


def batch():
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def test_kv_heads_follow_the_fused_qkv_layout():
    fields = lambda **kw: adapter.FalconAdapter.derived_fields(make("sdpa", **kw).config)
    assert fields(multi_query=True)["n_kv_heads"] == 1
    assert fields(multi_query=False)["n_kv_heads"] == 4
    assert fields(new_decoder_architecture=True, num_kv_heads=2)["n_kv_heads"] == 2


def test_grouped_kv_cache_keeps_one_head_per_group():
    model = convert(make("sdpa", new_decoder_architecture=True, num_kv_heads=2)).eval()
    ids, mask = batch()
    with torch.no_grad(), force_expert(model, "full"):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape == (2, 2, 12, 16)


def test_eager_alibi_original_adds_alibi_twice():
    """Transformers' eager ALiBi path adds ALiBi itself and again through the mask the model folded
    it into, so SDPA is the reference: the converted model matches it, and matches eager only with
    its ALiBi bias doubled."""
    eager, sdpa = make("eager", **ALIBI), make("sdpa", **ALIBI)
    model = convert(copy.deepcopy(sdpa)).eval()
    ids, mask = batch()
    real = mask.bool()
    routed = adapter.MetaFalconAttention.routed_attention

    def doubled(self, *args, **kwargs):
        return routed(self, *args, **{**kwargs, "attn_bias": 2 * kwargs["attn_bias"]})

    with torch.no_grad(), force_expert(model, "full"):
        expected_eager, expected_sdpa = (m(input_ids=ids, attention_mask=mask).logits[real] for m in (eager, sdpa))
        got = model(input_ids=ids, attention_mask=mask).logits[real]
        adapter.MetaFalconAttention.routed_attention = doubled
        try:
            got_doubled = model(input_ids=ids, attention_mask=mask).logits[real]
        finally:
            adapter.MetaFalconAttention.routed_attention = routed
    assert (expected_eager - expected_sdpa).abs().max() > 1e-3
    torch.testing.assert_close(got, expected_sdpa, **TOL)
    torch.testing.assert_close(got_doubled, expected_eager, **TOL)
