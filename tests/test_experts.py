"""Each built-in expert against a naive O(T^2) reference, GQA, gathered queries and masks included."""

import pytest
import torch

from ma_convert import MetaAttentionLayer, MetaAttnConfig, build_expert, list_experts, register_expert
from ma_convert.experts import AttentionExpert, HeadAttentionExpert
from reference import allowed_mask, naive_hybrid, naive_linear, naive_softmax

B, HQ, D = 2, 4, 16


def heads(t_keys, hkv, n=None, dtype=torch.float32):
    n = t_keys if n is None else n
    q = torch.randn(B, HQ, n, D, dtype=dtype)
    k = torch.randn(B, hkv, t_keys, D, dtype=dtype)
    v = torch.randn(B, hkv, t_keys, D, dtype=dtype)
    return q, k, v


def random_positions(t, n):
    """Sorted random key indices per row: a gathered subset of queries."""
    return torch.stack([torch.randperm(t)[:n].sort().values for _ in range(B)])


def cfg_for(hkv, **kw):
    return MetaAttnConfig(d_model=HQ * D, n_heads=HQ, n_kv_heads=hkv, **kw)


def close(a, b, tol=1e-5):
    assert not torch.isnan(a).any()
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("t", [1, 37, 300])
def test_full_dense_causal_matches_naive(hkv, t):
    q, k, v = heads(t, hkv)
    full = build_expert("full", cfg_for(hkv))
    pos = torch.arange(t).expand(B, t)
    close(full.attend(q, k, v), naive_softmax(q, k, v, allowed_mask(pos, t)))


@pytest.mark.parametrize("hkv", [4, 2])
def test_full_gathered_masked_and_biased(hkv):
    t, n = 300, 90
    q, k, v = heads(t, hkv, n)
    pos = random_positions(t, n)
    key_mask = torch.rand(B, t) > 0.2
    bias = torch.randn(1, HQ, n, t)
    full = build_expert("full", cfg_for(hkv))
    got = full.attend(q, k, v, pos, key_mask=key_mask, attn_bias=bias, scale=0.3)
    ref = naive_softmax(q, k, v, allowed_mask(pos, t, key_mask=key_mask), scale=0.3, bias=bias)
    close(got, ref)


def test_full_bidirectional_and_decode_step():
    q, k, v = heads(50, 2)
    full = build_expert("full", cfg_for(2))
    pos = torch.arange(50).expand(B, 50)
    close(full.attend(q, k, v, causal=False), naive_softmax(q, k, v, allowed_mask(pos, 50, causal=False)))
    # One query at the end of a longer key sequence (a decode step) sees every key.
    q1 = q[:, :, -1:]
    close(full.attend(q1, k, v), naive_softmax(q1, k, v, allowed_mask(pos[:, -1:], 50)))


@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("window,sinks", [(1, 0), (16, 0), (16, 4), (400, 0)])
def test_local_dense_matches_banded_naive(hkv, window, sinks):
    t = 300
    q, k, v = heads(t, hkv)
    local = build_expert("local", cfg_for(hkv, window_size=window, sink_tokens=sinks))
    pos = torch.arange(t).expand(B, t)
    want = naive_softmax(q, k, v, allowed_mask(pos, t, window=window, sinks=sinks))
    close(local.attend(q, k, v), want)  # inference: blocks read their sinks from scratch copies
    k, v = k.clone().requires_grad_(), v.clone().requires_grad_()
    got = local.attend(q, k, v)  # gradients flow: the sinks are concatenated instead
    close(got, want)
    got.sum().backward()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    v_only = v.detach().clone().requires_grad_()  # LoRA on v_proj alone: still no in-place writes
    local.attend(q, k.detach(), v_only).sum().backward()
    assert torch.isfinite(v_only.grad).all()


def test_local_gathered_masked_bidirectional():
    t, n, window = 600, 100, 24
    q, k, v = heads(t, 2, n)
    pos = random_positions(t, n)
    key_mask = torch.rand(B, t) > 0.3
    local = build_expert("local", cfg_for(2, window_size=window, sink_tokens=3))
    for causal in (True, False):
        got = local.attend(q, k, v, pos, causal=causal, key_mask=key_mask)
        ref = naive_softmax(q, k, v, allowed_mask(pos, t, causal=causal, window=window, sinks=3, key_mask=key_mask))
        close(got, ref)


def linear_features(expert, q, k):
    return expert.q_map(q), expert.k_map(k)


@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("t", [1, 64, 150])
def test_linear_dense_causal_matches_cumsum(feature_map, hkv, t):
    q, k, v = heads(t, hkv)
    lin = build_expert("linear", cfg_for(hkv, feature_map=feature_map))
    if feature_map == "hedgehog":  # move off the identity initialisation
        for p in lin.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    phi_q, phi_k = linear_features(lin, q, k)
    pos = torch.arange(t).expand(B, t)
    close(lin.attend(q, k, v), naive_linear(phi_q, phi_k, v, pos), tol=1e-4)


@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
def test_linear_gathered_unsorted_masked(feature_map):
    t, n = 200, 70
    q, k, v = heads(t, 2, n)
    pos = torch.stack([torch.randperm(t)[:n] for _ in range(B)])  # deliberately unsorted
    key_mask = torch.rand(B, t) > 0.25
    lin = build_expert("linear", cfg_for(2, feature_map=feature_map))
    phi_q, phi_k = linear_features(lin, q, k)
    got = lin.attend(q, k, v, pos, key_mask=key_mask)
    close(got, naive_linear(phi_q, phi_k, v, pos, key_mask=key_mask.float()), tol=1e-4)


def test_linear_bidirectional_and_dtype():
    q, k, v = heads(40, 2)
    lin = build_expert("linear", cfg_for(2, feature_map="elu"))
    phi_q, phi_k = linear_features(lin, q, k)
    pos = torch.arange(40).expand(B, 40)
    close(lin.attend(q, k, v, causal=False), naive_linear(phi_q, phi_k, v, pos, causal=False), tol=1e-4)
    out = lin.attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16


def test_query_with_no_visible_key_gives_zeros_and_finite_gradients():
    q, k, v = heads(20, 2)
    q.requires_grad_(True)
    key_mask = torch.ones(B, 20, dtype=torch.bool)
    key_mask[:, :5] = False  # left padding: the first 5 queries see no key at all
    for name in ("full", "local", "linear"):
        out = build_expert(name, cfg_for(2, window_size=8)).attend(q, k, v, key_mask=key_mask)
        assert torch.isfinite(out).all()
        assert out[:, :, :5].abs().max() == 0
        out.sum().backward()
        assert torch.isfinite(q.grad).all()
        q.grad = None


def test_registry_builds_and_lists():
    assert {"full", "linear", "local"} <= set(list_experts())
    cfg = cfg_for(4)
    assert build_expert("local", cfg).window == cfg.window_size
    with pytest.raises(ValueError, match="unknown expert 'nope'.*full"):
        build_expert("nope", cfg)


def test_register_custom_expert():
    @register_expert("test_scaled_identity")
    class ScaledIdentity(AttentionExpert):
        _cost = 0.05

        def __init__(self, cfg):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, mask=None):
            return self.scale * x

    expert = build_expert("test_scaled_identity", cfg_for(4))
    assert isinstance(expert, ScaledIdentity) and expert.cost == 0.05
    assert not isinstance(expert, HeadAttentionExpert)
    with pytest.raises(ValueError, match="already registered"):

        @register_expert("full")
        class Other(AttentionExpert):
            pass

    with pytest.raises(TypeError, match="AttentionExpert subclass"):
        register_expert("bad")(object)


@pytest.mark.parametrize("name", ["full", "local", "linear"])
def test_padding_slots_are_ignored(name):
    """q_pos = -1 marks padding slots (uneven rows): real slots match the reference, padding stays finite."""
    t = 300
    q, k, v = heads(t, 2, 40)
    pos = random_positions(t, 40)
    pos[1, 3:] = -1  # row 1 routes only 3 tokens
    expert = build_expert(name, cfg_for(2, window_size=16, feature_map="elu"))
    got = expert.attend(q, k, v, pos)
    assert torch.isfinite(got).all()
    real = pos >= 0
    if name == "linear":
        ref = naive_linear(*linear_features(expert, q, k), v, pos.clamp_min(0))
    else:
        window, sinks = (16, expert.sinks) if name == "local" else (None, 0)
        ref = naive_softmax(q, k, v, allowed_mask(pos.clamp_min(0), t, window=window, sinks=sinks))
    close(got.transpose(1, 2)[real], ref.transpose(1, 2)[real], tol=1e-4)


def test_group_tokens_pads_with_minus_one():
    from ma_convert.kernels.gather import group_tokens

    selected = torch.tensor([[True, False, True, True], [False, True, False, False]])
    assert group_tokens(selected).tolist() == [[0, 2, 3], [1, -1, -1]]


def test_linear_bucket_width_ignores_padding_slots():
    """Padding slots of an uneven batch must not widen the per-chunk buckets (work and memory)."""
    from ma_convert.core.experts.linear import chunk_slots

    t, c = 4096, 64
    row0 = torch.arange(t)  # every token
    row1 = torch.cat([torch.tensor([0]), torch.full((t - 1,), t)])  # one token, then padding (sorted last)
    slot, m = chunk_slots(torch.stack([row0, row1]), c, t // c)
    assert m == c
    assert slot[1, 1:].eq(t // c * m).all() and slot[1, 0] == 0
    assert slot[0].tolist() == list(range(t))


@pytest.mark.parametrize("split", [1, 63, 130])
def test_linear_state_continues_a_prefix(split):
    """Attending the suffix with the prefix's state equals attending everything (cached decoding)."""
    t = 200
    q, k, v = heads(t, 2)
    key_mask = torch.rand(B, t) > 0.1
    lin = build_expert("linear", cfg_for(2))
    full = lin.attend(q, k, v, key_mask=key_mask)
    state = lin.advance_state(k[:, :, :split], v[:, :, :split], key_mask[:, :split])
    rest = (k[:, :, split:], v[:, :, split:])
    got = lin.attend(q[:, :, split:], *rest, key_mask=key_mask[:, split:], state=state)
    close(got, full[:, :, split:], tol=1e-4)
    pos = random_positions(t - split, min(20, t - split))  # gathered queries of the suffix
    got = lin.attend(q[:, :, split:].gather(2, pos[:, None, :, None].expand(B, HQ, pos.shape[1], D)), *rest,
                     pos, key_mask=key_mask[:, split:], state=state)
    ref = full[:, :, split:].gather(2, pos[:, None, :, None].expand(B, HQ, pos.shape[1], D))
    close(got, ref, tol=1e-4)
    s_all, z_all = lin.advance_state(k, v, key_mask)
    s_two, z_two = lin.advance_state(*rest, key_mask[:, split:], state=state)
    close(s_two, s_all, tol=1e-4)
    close(z_two, z_all, tol=1e-4)


def test_full_expert_keeps_the_base_models_window():
    t = 120
    q, k, v = heads(t, 2)
    full = build_expert("full", cfg_for(2, full_window=32, window_size=16))
    pos = torch.arange(t).expand(B, t)
    close(full.attend(q, k, v), naive_softmax(q, k, v, allowed_mask(pos, t, window=32)))
    with pytest.raises(ValueError, match="window_size"):
        cfg_for(2, full_window=8, window_size=16)


def hybrid_expert(hkv, window, sinks):
    """The hybrid expert (exact window + kernel attention beyond), moved off its initialisation."""
    lin = build_expert("hybrid", cfg_for(hkv, linear_window=window, sink_tokens=sinks))
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lin


@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 2), (70, 4)])
def test_hybrid_linear_dense_matches_naive(hkv, window, sinks):
    t = 150
    q, k, v = heads(t, hkv)
    lin = hybrid_expert(hkv, window, sinks)
    phi_q, phi_k = linear_features(lin, q, k)
    pos = torch.arange(t).expand(B, t)
    got = lin.attend(q, k, v, scale=0.3)
    close(got, naive_hybrid(q, k, v, phi_q, phi_k, lin.log_weight.detach(), pos, window, sinks, scale=0.3), tol=1e-4)
    got.sum().backward()  # every parameter takes part: the maps through the kernel part, the weight through both
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lin.parameters())


def test_hybrid_linear_gathered_masked_and_padded():
    t, n = 120, 40
    q, k, v = heads(t, 2, n)
    pos = random_positions(t, n)
    pos[0, -3:] = -1  # padding slots
    key_mask = torch.rand(B, t) > 0.2
    lin = hybrid_expert(2, 6, 3)
    with torch.no_grad():
        phi_q, phi_k = linear_features(lin, q, k)
        got = lin.attend(q, k, v, pos, key_mask=key_mask)
        want = naive_hybrid(q, k, v, phi_q, phi_k, lin.log_weight, pos, 6, 3, key_mask=key_mask)
    close(got, want, tol=1e-4)
    assert (got[0, :, -3:] == 0).all()


def test_hybrid_linear_with_a_window_over_every_key_is_softmax_attention():
    t = 50
    q, k, v = heads(t, 2)
    lin = hybrid_expert(2, t, 0)
    pos = torch.arange(t).expand(B, t)
    with torch.no_grad():
        close(lin.attend(q, k, v), naive_softmax(q, k, v, allowed_mask(pos, t)), tol=1e-5)


def test_hybrid_linear_chunks_long_query_runs_the_same(monkeypatch):
    q, k, v = heads(90, 2)
    lin = hybrid_expert(2, 8, 2)
    with torch.no_grad():
        whole = lin.attend(q, k, v)
        monkeypatch.setattr(type(lin), "query_chunk", 16)
        close(lin.attend(q, k, v), whole, tol=1e-6)


def test_hybrid_is_causal_only_and_decodes_from_a_lagging_state():
    """Decoding reads the window and sinks from the keys, and the older keys through a state over
    keys sinks .. T-1-W: the same output as attending over every key, in O(W)."""
    for window, sinks in [(4, 0), (5, 2), (1, 3)]:
        lin = hybrid_expert(2, window, sinks)
        q, k, v = heads(23, 2)
        end = lin.state_end(k.shape[2] - 1)
        assert end == max(k.shape[2] - window, sinks)
        state = lin.advance_state(k[:, :, sinks:end], v[:, :, sinks:end])
        with torch.no_grad():
            decoded = lin.attend(q[:, :, -1:], k, v, state=state)
            recomputed = lin.attend(q[:, :, -1:], k, v)
        torch.testing.assert_close(decoded, recomputed, atol=1e-5, rtol=1e-5)
    assert not lin.recurrent and build_expert("linear", cfg_for(2)).recurrent
    with pytest.raises(ValueError, match="causally"):
        lin.attend(q, k, v, causal=False)
    with pytest.raises(ValueError, match="linear_window=4 is invalid for a bidirectional"):
        MetaAttentionLayer(cfg_for(2, linear_window=4), causal=False)
