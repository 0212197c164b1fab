"""The Triton fast path of hard routing against the plain torch reference, on fresh random inputs.

- On CUDA: bf16/fp16 kernels, relative error <= 1e-2 and no NaN (run on the GPU machine).
- Without CUDA: the same kernels in Triton's interpreter (fp32, small shapes), when triton is
  installed; conftest.py sets `TRITON_INTERPRET` before anything imports triton.
"""

import importlib.util

import pytest
import torch

CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

from ma_convert.core.config import MetaAttnConfig  # noqa: E402
from ma_convert.core.control import set_routing_mode  # noqa: E402
from ma_convert.core.meta_attention import CacheInputs, MetaAttention  # noqa: E402
from ma_convert.core.policy import RoutingPolicy  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOL = 1e-2 if CUDA else 1e-5
SHAPES = [  # (Hq, Hkv, d, T): GQA 4:1, an odd group (no head packing) and MHA with an odd head size
    (8, 2, 64, 1500 if CUDA else 300),
    (6, 2, 32, 900 if CUDA else 200),
    (4, 4, 80 if CUDA else 24, 700 if CUDA else 150),
]


def routed():
    from ma_convert.kernels import routed as module

    return module


def rel_err(got, ref):
    got, ref = got.float().cpu(), ref.float().cpu()
    return ((got - ref).norm() / ref.norm()).item()


def make_layer(hq, hkv, d, feature_map="hedgehog", window=64, sinks=4, dense_below=0, hybrid=0):
    """A layer of the three built-in experts (the kernel expert pure linear, or the hybrid with a
    `hybrid`-key window), its learnable parts moved off their initial values."""
    cfg = MetaAttnConfig(
        d_model=hq * d, n_heads=hq, n_kv_heads=hkv, window_size=window, sink_tokens=sinks,
        feature_map=feature_map, linear_window=hybrid,
    )
    meta = MetaAttention(cfg, policy=RoutingPolicy(mode="hard", backend="torch", dense_below=dense_below)).eval()
    with torch.no_grad():  # a feature map (and the hybrid's weight) away from the identity start
        for p in meta.experts[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    return meta


class Store:
    """A kernel-state store as a cache layer keeps it: (S, z, keys seen)."""

    def __init__(self, held=None):
        self.held = held

    def get(self):
        return self.held

    def set(self, s, z, seen):
        self.held = (s, z, seen)


def inputs(b, hq, hkv, d, t, keys=None):
    keys = keys or t
    q = torch.randn(b, t, hq, d).transpose(1, 2)  # strided, as the adapters hand them over
    return q, torch.randn(b, hkv, keys, d), torch.randn(b, hkv, keys, d)


def reference(meta, q, k, v, routes, cached=False):
    """The torch path in float32 on the CPU; with `cached`, k/v start with keys a cache held (the
    kernel expert's state is caught up from them)."""
    meta = meta.float().cpu()
    meta.forced_expert = routes.cpu()
    weights = torch.nn.functional.one_hot(routes.cpu(), len(meta.experts)).float()
    cache = CacheInputs(Store()) if cached else None
    with torch.no_grad():
        return meta.run_experts(q.float().cpu(), k.float().cpu(), v.float().cpu(), weights, cache=cache)


def fast(meta, q, k, v, routes, dtype, state=None):
    """The kernels on DEVICE in `dtype`: the heads and the state they hand back."""
    meta = meta.to(DEVICE)
    cast = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    state = None if state is None else tuple(s.to(DEVICE) for s in state)
    with torch.no_grad():
        return routed().routed_heads(meta.routed_spec(), cast(q), cast(k), cast(v), routes.to(DEVICE), scale=None,
                                     state=state)


def kernel_state(meta, k, v, end):
    """The kernel expert's state over keys start .. end-1, in float32 on the CPU."""
    expert = meta.float().cpu().experts[1]
    start = getattr(expert, "state_start", 0)
    with torch.no_grad():
        return expert.advance_state(k[:, :, start:end].float(), v[:, :, start:end].float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("feature_map,hybrid", [("hedgehog", 0), ("elu", 0), ("hedgehog", 16), ("elu", 16)])
def test_prefill_matches_reference(dtype, shape, feature_map, hybrid):
    hq, hkv, d, t = shape
    meta = make_layer(hq, hkv, d, feature_map, hybrid=hybrid)
    q, k, v = inputs(2, hq, hkv, d, t)
    routes = torch.randint(0, 3, (2, t))
    routes[1, : t // 2] = 2  # rows route differently: one half-local, one mixed
    got, _ = fast(meta, q, k, v, routes, dtype)
    ref = reference(meta, q, k, v, routes)
    assert got.shape == ref.shape and not torch.isnan(got).any()
    for e in range(3):  # each expert's tokens on their own
        sel = (routes == e)[:, None, :, None].expand_as(ref)
        assert rel_err(got.cpu()[sel], ref[sel]) <= TOL, e


@pytest.mark.parametrize("dtype", DTYPES)
def test_hybrid_kernel_with_a_window_over_every_key_is_softmax(dtype):
    """A window as long as the sequence leaves the kernel part nothing: the hybrid's tokens get
    plain causal softmax attention, as the full expert's do."""
    hq, hkv, d, t = 4, 2, 32, 130
    meta = make_layer(hq, hkv, d, hybrid=t)
    q, k, v = inputs(1, hq, hkv, d, t)
    got, _ = fast(meta, q, k, v, torch.ones(1, t, dtype=torch.long), dtype)
    assert rel_err(got, reference(meta, q, k, v, torch.zeros(1, t, dtype=torch.long))) <= TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_mostly_full_and_rows_without_softmax_tokens(dtype):
    """A row routed almost all to full and a row with no full or local token at all."""
    hq, hkv, d, t = 4, 2, 32, 260
    meta = make_layer(hq, hkv, d)
    q, k, v = inputs(2, hq, hkv, d, t)
    routes = torch.randint(0, 3, (2, t))
    routes[0] = 1
    routes[1, 10:] = 0
    got, _ = fast(meta, q, k, v, routes, dtype)
    assert rel_err(got, reference(meta, q, k, v, routes)) <= TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hybrid", [0, 24])
def test_cached_chunk_and_decode_match_reference(dtype, hybrid):
    """A prompt continued over a cache: a chunk of several tokens, then one decode step per row, each
    row on another expert. The linear expert reads its state over the earlier keys and hands back
    the state after all of them; the hybrid decodes from its state over the keys left of its window."""
    hq, hkv, d = 8, 2, 32
    t_prev, t_new = (700, 300) if CUDA else (150, 60)
    meta = make_layer(hq, hkv, d, hybrid=hybrid)
    q, k, v = inputs(3, hq, hkv, d, t_new, keys=t_prev + t_new)
    routes = torch.randint(0, 3, (3, t_new))
    got, next_state = fast(meta, q, k, v, routes, dtype, None if hybrid else kernel_state(meta, k, v, t_prev))
    assert rel_err(got, reference(meta, q, k, v, routes, cached=True)) <= TOL
    if not hybrid:
        final = kernel_state(meta, k, v, k.shape[2])
        assert rel_err(next_state[0], final[0]) <= TOL and rel_err(next_state[1], final[1]) <= TOL

    q1, routes1 = q[:, :, -1:], torch.tensor([[0], [1], [2]])
    expert = meta.experts[1]
    end = expert.state_end(k.shape[2] - 1) if hybrid else k.shape[2] - 1
    got, next_state = fast(meta, q1, k, v, routes1, dtype, kernel_state(meta, k, v, end))
    assert rel_err(got, reference(meta, q1, k, v, routes1, cached=True)) <= TOL
    if not hybrid:
        assert rel_err(next_state[0], kernel_state(meta, k, v, k.shape[2])[0]) <= TOL


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_meta_attention_takes_the_fast_path_on_cuda(monkeypatch):
    """run_experts on CUDA with backend auto goes through the kernels (and matches torch)."""
    hq, hkv, d, t = 8, 2, 64, 2048
    meta = make_layer(hq, hkv, d)
    set_routing_mode(meta, "hard", backend="auto")  # dense_below=0: routed even at this length
    calls = []
    original = routed().routed_heads
    monkeypatch.setattr(routed(), "routed_heads", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = inputs(1, hq, hkv, d, t)
    routes = torch.randint(0, 3, (1, t))
    meta = meta.cuda().to(torch.bfloat16)
    meta.forced_expert = routes.cuda()
    weights = torch.nn.functional.one_hot(routes, 3).float().cuda()
    with torch.no_grad():
        got = meta.run_experts(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), weights)
    assert calls == [1]
    assert rel_err(got, reference(meta, q, k, v, routes)) <= 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hybrid", [0, 5])
def test_converted_model_generates_the_same_with_kernels(hybrid):
    """Mixed hard routing in a converted model: the fast path's cached generation equals the
    torch path's, token for token (bf16), with the pure linear or the hybrid kernel expert."""
    from arch_cases import all_cases
    from test_conversion import spread_routing

    from ma_convert import convert, set_routing_mode, set_routing_policy

    case = next(c for c in all_cases() if c.name == "llama-gqa")
    model = convert(case.make("sdpa"), linear_window=hybrid).cuda().to(torch.bfloat16).eval()
    spread_routing(model)
    set_routing_mode(model, "hard")
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    outs = {}
    for backend in ("torch", "triton"):
        set_routing_policy(model, backend=backend, dense_below=0)  # route the short prompt too
        with torch.no_grad():
            outs[backend] = model.generate(ids, max_new_tokens=12, do_sample=False)
            logits = model(ids).logits
            outs[backend + "_logits"] = logits
    assert rel_err(outs["triton_logits"], outs["torch_logits"]) <= 1e-2
    assert (outs["triton"] == outs["torch"]).float().mean() >= 0.9


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hybrid", [0, 64])
def test_decode_step_replays_in_a_cuda_graph(hybrid):
    """The decode path has no host sync, so one step captures in a CUDA graph and replays on new
    inputs (written into the captured tensors) with the eager result; the hybrid's too."""
    hq, hkv, d, length, b = 8, 2, 64, 3000, 4
    meta = make_layer(hq, hkv, d, hybrid=hybrid).to(DEVICE)
    expert = meta.experts[1]
    end = expert.state_end(length - 1) if hybrid else length - 1

    def fresh():
        q, k, v = inputs(b, hq, hkv, d, 1, keys=length)
        k, v = k.to(DEVICE, torch.bfloat16), v.to(DEVICE, torch.bfloat16)
        start = getattr(expert, "state_start", 0)
        state = expert.advance_state(k[:, :, start:end].float(), v[:, :, start:end].float())
        return q.to(DEVICE, torch.bfloat16), k, v, state, torch.randint(0, 3, (b, 1), device=DEVICE)

    def step(q, k, v, state, routes):
        return routed().routed_heads(meta.routed_spec(), q, k, v, routes, scale=None, state=state)

    static = fresh()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
            step(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, next_state = step(*static)
        new = fresh()
        for dst, src in zip(static[:3] + (static[4],), new[:3] + (new[4],)):
            dst.copy_(src)
        for dst, src in zip(static[3], new[3]):
            dst.copy_(src)
        graph.replay()
        expected, expected_state = step(*new)
    torch.testing.assert_close(out, expected)
    if not hybrid:
        torch.testing.assert_close(next_state[0], expected_state[0])


def test_fast_path_serves_the_hybrid_and_refuses_custom_experts():
    from ma_convert import build_expert

    hybrid = make_layer(4, 2, 16, hybrid=8)
    q = torch.randn(1, 4, 32, 16, dtype=torch.bfloat16, device=DEVICE)
    spec = hybrid.to(DEVICE).routed_spec()
    assert spec.hybrid and spec.kernel_window == 8 and spec.kernel_sinks == 4
    assert routed().unsupported_reason(spec, q, causal=True, key_mask=None, attn_bias=None) is None
    cfg = hybrid.cfg.replace(expert_costs=[1.0, 0.3])
    two = MetaAttention(cfg, [build_expert("full", cfg), build_expert("local", cfg)]).eval()
    reason = routed().unsupported_reason(two.to(DEVICE).routed_spec(), q, causal=True, key_mask=None, attn_bias=None)
    assert reason is not None and "three built-in experts" in reason


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_short_contexts_run_the_original_attention_without_a_router(monkeypatch):
    """Below dense_below (prompt and cache) a hard-routed model on the fast path runs every token on
    the full expert and never calls its router: the original's logits and tokens, at its cost."""
    from arch_cases import all_cases
    from test_conversion import spread_routing

    from ma_convert import RoutingPolicy, convert, force_expert, set_routing_mode
    from ma_convert.core.controller import DirichletRouter

    case = next(c for c in all_cases() if c.name == "llama-gqa")
    model = convert(case.make("sdpa"), policy=RoutingPolicy(dense_below=64)).cuda().to(torch.bfloat16).eval()
    spread_routing(model)
    set_routing_mode(model, "hard")
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    with torch.no_grad(), force_expert(model, "full"):
        expected = model(ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(DirichletRouter, "forward", lambda *a, **k: pytest.fail("the router ran"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected_tokens)
    assert all(m.last_stats.expert_fractions[0] == 1.0 for m in model.modules() if isinstance(m, MetaAttention))


# ----------------------------------------------------------------------------- routing and decode kernels
def routing():
    from ma_convert.kernels import triton_routing as module

    return module


@pytest.mark.parametrize("router", ["bayesian", "softmax"])
@pytest.mark.parametrize("mode", ["hard", "auto"])
def test_routing_kernel_matches_the_torch_router(router, mode):
    """One launch computes the router MLP, its argmax, auto routing's uncertain tokens and the full
    tail: the same raw output and routes as the torch router, for (T,) and (B, T) positions."""
    if mode == "auto" and router == "softmax":
        pytest.skip("auto routing of the softmax router stays on the torch path (its uncertainty is an entropy)")
    torch.manual_seed(0)
    d, t = 96, 300  # d: not a multiple of the kernel's column block
    cfg = MetaAttnConfig(d_model=d, n_heads=4, window_size=32, router=router, controller_hidden=40, max_positions=512,
                         temperature=1.7)
    meta = MetaAttention(cfg).eval()
    with torch.no_grad():
        for p in meta.router.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0))
    meta.router.temperature = 0.8  # schedules move it after the spec is built: the kernel reads it per call
    meta.routed_spec()
    set_routing_mode(meta, mode, uncertainty_threshold=0.3 if mode == "auto" else None, full_tail=7)
    x = torch.randn(2, t, d) * 3 + 0.5
    for positions in (torch.arange(t), torch.randint(0, 500, (2, t))):
        with torch.no_grad():
            want_routes, want_raw = meta.route_hard(x, positions)
            if mode == "auto":  # the uncertainty rule must change some routes, or this checks nothing
                assert (want_routes[:, :-7] != want_raw[:, :-7].argmax(-1)).any()
            dtype = torch.bfloat16 if CUDA else torch.float32
            router_copy = meta.to(DEVICE, dtype)
            routes, raw = routing().route_tokens(
                router_copy.routed_spec().router, x.to(DEVICE, dtype), positions.to(DEVICE), temperature=0.8,
                full_index=0, full_tail=7, uncertainty_threshold=0.3 if mode == "auto" else None)
            meta.float().cpu()
        assert routes.dtype == torch.int32 and raw.dtype == torch.float32
        assert rel_err(raw, want_raw) <= (2e-2 if CUDA else 1e-5)
        margin = want_raw.topk(2, -1).values.diff(dim=-1).abs().squeeze(-1)
        clear = margin > (0.1 if CUDA else 1e-4)  # where rounding cannot flip the argmax
        if mode == "auto":  # nor move a token across the uncertainty threshold
            clear &= (meta.router.from_raw(want_raw).uncertainty - 0.3).abs() > (0.02 if CUDA else 1e-5)
        assert clear.float().mean() > 0.5
        assert torch.equal(routes.cpu().long()[clear], want_routes[clear])
        assert (routes[:, -7:] == 0).all()


@pytest.mark.parametrize("t", [1, 700, 2500])
def test_sort_kernel_groups_tokens_by_expert_in_position_order(t):
    routes = torch.randint(0, 3, (3, t))
    routes[1] = 2  # a row with one expert only
    got = routing().sort_by_expert(routes.to(DEVICE, torch.int32), 3)
    counts = torch.nn.functional.one_hot(routes, 3).sum(1)
    want = (routes.argsort(dim=1, stable=True), counts, counts.cumsum(1) - counts)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.to(torch.int32))


@pytest.mark.parametrize("carried", [False, True])
def test_chunk_states_are_running_sums_over_many_chunks(carried):
    """The state before every chunk is the carried state plus phi(k)^T v over the keys before it, over
    more chunks than the prefix-sum kernel scans in one block (its carry between blocks)."""
    from ma_convert.kernels.triton_linear import CHUNK, key_features_and_states

    b, h, d, t = 1, 2, 16, CHUNK * 20 + 5  # 21 chunks, 22 slots: two blocks of the scan
    k, v = torch.randn(b, h, t, d, device=DEVICE), torch.randn(b, h, t, d, device=DEVICE)
    weight = torch.randn(h, d, d, device=DEVICE) * 0.3
    state = (torch.randn(b, h, 2 * d, d, device=DEVICE), torch.rand(b, h, 2 * d, device=DEVICE)) if carried else None
    with torch.no_grad():
        phi_k, s, z, end = key_features_and_states(weight, k, v, state)
    phi, values = phi_k.float().cpu(), v.float().cpu()
    s0 = state[0].cpu() if carried else torch.zeros(b, h, 2 * d, d)
    z0 = state[1].cpu() if carried else torch.zeros(b, h, 2 * d)
    close = lambda got, want: (got.cpu() - want).norm() <= TOL * (want.norm() + 1)  # noqa: E731 (slot 0 may be zero)
    for c in (0, 1, 16, 17, t // CHUNK):
        keys = slice(0, c * CHUNK)
        assert close(s[:, :, c], s0 + torch.einsum("bhtf,bhtd->bhfd", phi[:, :, keys], values[:, :, keys]))
        assert close(z[:, :, c], z0 + phi[:, :, keys].sum(2))
    assert close(end[0], s0 + torch.einsum("bhtf,bhtd->bhfd", phi, values)) and close(end[1], z0 + phi.sum(2))


@pytest.mark.parametrize("feature_map", ["hedgehog", "elu"])
@pytest.mark.parametrize("n", [1, 150])
def test_state_kernel_matches_the_expert(feature_map, n):
    """The kernel expert's state after more keys (strided, as a cache's slices): one key (a decode
    step) or many (the catch-up after a prefill)."""
    from ma_convert.kernels.triton_decode import advance_state

    meta = make_layer(8, 2, 32, feature_map)
    expert = meta.experts[1]
    _, k, v = inputs(2, 8, 2, 32, 1, keys=200)
    s0 = expert.advance_state(k[:, :, :20], v[:, :, :20])
    want = expert.advance_state(k[:, :, 20:20 + n], v[:, :, 20:20 + n], None, s0)
    dtype = torch.bfloat16 if CUDA else torch.float32
    spec = meta.to(DEVICE).routed_spec()
    with torch.no_grad():
        keys, values = k.to(DEVICE, dtype), v.to(DEVICE, dtype)
        state = tuple(x.to(DEVICE) for x in s0)
        got = advance_state(spec.k_map_weight, keys[:, :, 20:20 + n], values[:, :, 20:20 + n], state)
    assert rel_err(got[0], want[0]) <= TOL and rel_err(got[1], want[1]) <= TOL


@pytest.mark.parametrize("hybrid", [0, 16])
def test_long_prefills_launch_each_softmax_expert_with_its_own_tiles(monkeypatch, hybrid):
    """From ONE_LAUNCH_BELOW queries each softmax expert gets its own launch: the same result."""
    monkeypatch.setattr(routed(), "ONE_LAUNCH_BELOW", 1)
    hq, hkv, d, t = 8, 2, 32, 400 if CUDA else 150
    meta = make_layer(hq, hkv, d, hybrid=hybrid)
    q, k, v = inputs(2, hq, hkv, d, t)
    routes = torch.randint(0, 3, (2, t))
    got, _ = fast(meta, q, k, v, routes, DTYPES[0])
    assert rel_err(got, reference(meta, q, k, v, routes)) <= TOL


def test_direct_launch_key_separates_what_triton_specialises_on():
    """Integers that are 1, multiples of 16 or past 32 bits, tensors of another dtype or 16-byte
    alignment: each gets its own key, so one cached kernel never serves two specialisations."""
    from ma_convert.kernels.launch import _arg_keys

    def _arg_key(value):  # a non-constexpr argument's key
        return _arg_keys([value], [False])[0]

    ints = [1, 2, 16, 2**31, 2**31 + 1, -(2**31) - 1, 2**63]
    assert len({_arg_key(i) for i in ints}) == len(ints)
    assert _arg_key(2) == _arg_key(17) and _arg_key(16) == _arg_key(48)
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert _arg_key(base) != _arg_key(base[1:])  # 2 bytes off: not 16-byte aligned
    assert _arg_key(base) == _arg_key(base[8:])
    assert _arg_key(base) != _arg_key(base.float())
    assert _arg_key(True) != _arg_key(False) and _arg_key(None) is None


@pytest.mark.skipif(not CUDA, reason="direct launches run compiled kernels (CUDA)")
def test_direct_launches_match_tritons_own_launcher():
    """The state kernel through the direct launcher and through `kernel[grid]`, calls interleaved
    over head sizes (constexprs), key counts (1, 16, other) and an unaligned view: equal results."""
    from ma_convert.kernels import launch, triton_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for d, n, offset in [(32, 1, 0), (64, 16, 0), (32, 37, 1), (64, 1, 3), (32, 16, 0)]:
        # offset: a view 2*offset bytes into wider rows (unaligned pointer, strides not multiples of 16)
        k = torch.randn(2, 3, n, d + offset, device="cuda", dtype=torch.bfloat16, generator=g)[..., offset:]
        v = torch.randn(2, 3, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(3, d, d, device="cuda", dtype=torch.bfloat16, generator=g)
        s = (torch.randn(2, 3, 2 * d, d, device="cuda", generator=g),
             torch.randn(2, 3, 2 * d, device="cuda", generator=g))
        calls.append((w, k, v, s))
    for _ in range(2):  # the second round runs on cached kernels
        for w, k, v, s in calls:
            direct = triton_decode.advance_state(w, k, v, s)
            runner = launch._launchers[id(triton_decode._advance_state)]
            runner.direct = False
            try:
                own = triton_decode.advance_state(w, k, v, s)
            finally:
                runner.direct = launch.ENABLED
            assert torch.equal(direct[0], own[0]) and torch.equal(direct[1], own[1])
