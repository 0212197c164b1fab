"""Mistral and Phi-3 sliding windows: the window lives in the full expert, and cached decoding on
transformers' sliding-window KV cache (which drops keys older than the window) equals recomputation."""

import pytest
import torch

from cases.mistral import make as make_mistral
from cases.phi3 import make as make_phi3
from ma_convert import convert, routing_stats, set_routing_mode
from test_conversion import TOL, spread_routing

MAKERS = {"mistral": make_mistral, "phi3": make_phi3}


@pytest.mark.parametrize("arch", MAKERS)
def test_window_is_the_full_experts_and_caps_the_local_one(arch):
    cfg = convert(MAKERS[arch]("sdpa", sliding_window=5)).config.meta_attention["attention"]
    assert (cfg["full_window"], cfg["window_size"]) == (5, 5)
    assert convert(MAKERS[arch]("sdpa", sliding_window=None)).config.meta_attention["attention"]["full_window"] is None


@pytest.mark.parametrize("arch", MAKERS)
def test_sliding_cache_drops_old_keys_and_decoding_still_equals_recomputation(arch):
    model = convert(MAKERS[arch]("sdpa", sliding_window=5)).eval()
    spread_routing(model)
    set_routing_mode(model, "hard")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        assert (torch.tensor([s.expert_fractions for s in routing_stats(model)]).sum(0) > 0).all()
        out = model(input_ids=ids[:, :3], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(3, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    layer = cache.layers[0]
    assert getattr(layer, "is_sliding", False) and layer.keys.shape[2] == 4  # window - 1 keys kept
    assert cache.get_seq_length() == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("arch", MAKERS)
def test_sink_tokens_are_refused_with_a_sliding_window(arch):
    with pytest.raises(ValueError, match="sink_tokens"):
        convert(MAKERS[arch]("sdpa", sliding_window=5), sink_tokens=2)
    convert(MAKERS[arch]("sdpa", sliding_window=None), sink_tokens=2)  # no window: sinks stay available
