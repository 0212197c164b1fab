"""The experts and the routed layer on CUDA in bf16/fp16, against the float32 CPU reference.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest -q tests/test_gpu.py`.
"""

import pytest
import torch

from ma_convert import MetaAttentionLayer, MetaAttnConfig, RoutingPolicy, build_expert, force_expert, set_routing_mode
from reference import allowed_mask, naive_linear, naive_softmax

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DTYPES = [torch.bfloat16, torch.float16]


def rel_err(got, ref):
    got, ref = got.float().cpu(), ref.float().cpu()
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["full", "local", "linear"])
@pytest.mark.parametrize("gathered", [False, True])
def test_expert_on_cuda_matches_reference(dtype, name, gathered):
    b, hq, hkv, t, d = 2, 8, 2, 1000, 64
    cfg = MetaAttnConfig(d_model=hq * d, n_heads=hq, n_kv_heads=hkv, window_size=128, sink_tokens=4)
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    pos = torch.arange(t).expand(b, t)
    if gathered:
        pos = torch.stack([torch.randperm(t)[: t // 3].sort().values for _ in range(b)])
        q = q.gather(2, pos[:, None, :, None].expand(b, hq, pos.shape[1], d))
    expert = build_expert(name, cfg)
    if name == "linear":
        ref = naive_linear(expert.q_map(q), expert.k_map(k), v, pos)
    else:
        window = cfg.window_size if name == "local" else None
        ref = naive_softmax(q, k, v, allowed_mask(pos, t, window=window, sinks=4 if window else 0))
    expert = expert.cuda().to(dtype)
    got = expert.attend(
        q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype), pos.cuda() if gathered else None
    )
    assert got.dtype == dtype and not torch.isnan(got).any()
    assert rel_err(got, ref) <= 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_layer_on_cuda_matches_cpu(dtype):
    cfg = MetaAttnConfig(d_model=256, n_heads=8, n_kv_heads=2, window_size=64)
    layer = MetaAttentionLayer(cfg, policy=RoutingPolicy(dense_below=0)).eval()
    x = torch.randn(2, 700, 256)
    routes = torch.randint(0, 3, (2, 700))
    with torch.no_grad(), force_expert(layer, routes):
        ref, _, _ = layer(x)
    gpu = layer.cuda().to(dtype)
    with torch.no_grad(), force_expert(gpu, routes.cuda()):
        got, _, stats = gpu(x.cuda().to(dtype))
    assert not torch.isnan(got).any() and stats.n_tokens == 1400
    assert rel_err(got, ref) <= 1e-2
    set_routing_mode(gpu, "hard")
    with torch.no_grad():
        out, _, _ = gpu(x.cuda().to(dtype))
    assert torch.isfinite(out).all()


def test_converted_model_on_cuda():
    """Forced-full exactness and cached decoding of a converted model on the GPU (fp32 and bf16)."""
    from arch_cases import all_cases
    from ma_convert import convert, set_routing_mode
    from test_conversion import batch, spread_routing

    case = next(c for c in all_cases() if c.name == "llama-gqa")
    original = case.make("sdpa").cuda()
    model = convert(case.make("sdpa")).cuda().eval()
    ids, mask = (t.cuda() for t in batch(case, "left"))
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).logits
        with force_expert(model, "full"):
            got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    model = model.to(torch.bfloat16)
    spread_routing(model)
    set_routing_mode(model, "hard")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(7, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    cached = torch.cat(steps, 1)
    assert not torch.isnan(cached).any()
    assert rel_err(cached[real], full[real]) <= 1e-2
