"""MetaAttentionLayer: modes, causality, hard dispatch, forcing, masks, stats and the aux loss."""

import re

import pytest
import torch
import torch.nn.functional as F

from ma_convert import (
    MetaAttentionLayer,
    MetaAttnConfig,
    ObjectiveWeights,
    RoutingPolicy,
    RoutingStats,
    build_expert,
    force_expert,
    routing_policy,
    routing_stats,
    set_objective_weights,
    set_routing_mode,
    set_routing_policy,
)
from ma_convert.core.meta_attention import gumbel_top_1
from reference import allowed_mask, naive_softmax

CFG = MetaAttnConfig(d_model=64, n_heads=4, n_kv_heads=2, window_size=8, controller_hidden=16, max_positions=256)
MODES = ["soft", "hard", "auto"]


def make_layer(cfg=CFG, mode="soft", training=False, spread=True, causal=True):
    layer = MetaAttentionLayer(cfg, causal=causal)
    if spread:  # a router whose choices vary from token to token, so every expert gets tokens
        with torch.no_grad():
            layer.meta.router.fc2.weight.normal_(std=2.0)
    set_routing_mode(layer, mode, uncertainty_threshold=0.3 if mode == "auto" else None)
    return layer.train(training)


def reference_attention(layer, x, causal=True):
    """Plain multi-head attention with the layer's projections (what forcing 'full' must give)."""
    cfg = layer.cfg
    b, t, _ = x.shape
    q = layer.q_proj(x).view(b, t, cfg.n_heads, -1).transpose(1, 2)
    k = layer.k_proj(x).view(b, t, cfg.kv_heads, -1).transpose(1, 2)
    v = layer.v_proj(x).view(b, t, cfg.kv_heads, -1).transpose(1, 2)
    out = naive_softmax(q, k, v, allowed_mask(torch.arange(t).expand(b, t), t, causal=causal))
    return layer.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_quick_start_runs_as_written():
    cfg = MetaAttnConfig(d_model=512, n_heads=8)
    layer = MetaAttentionLayer(cfg)
    out, aux_loss, stats = layer(torch.randn(2, 64, 512))
    assert out.shape == (2, 64, 512) and aux_loss.dim() == 0 and isinstance(stats, RoutingStats)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes_in_every_mode(mode, training, dtype):
    layer = make_layer(mode=mode, training=training).to(dtype)
    out, aux, stats = layer(torch.randn(2, 40, 64, dtype=dtype))
    assert out.shape == (2, 40, 64) and out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(aux)
    assert stats.n_tokens == 80


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradients_reach_router_and_experts(mode):
    layer = make_layer(mode=mode, training=True)
    out, aux, _ = layer(torch.randn(2, 30, 64))
    (out.square().mean() + aux).backward()
    linear = layer.experts[1]
    for name, p in [("router", layer.meta.router.fc2.weight), ("hedgehog q", linear.q_map.weight),
                    ("hedgehog k", linear.k_map.weight), ("q_proj", layer.q_proj.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_causality_later_tokens_never_change_earlier_outputs(mode, training):
    layer = make_layer(mode=mode, training=training)
    # One row in training: Dirichlet sampling draws a data-dependent number of random numbers, so
    # only a single row keeps the noise of its early tokens identical across the two runs.
    x = torch.randn(1 if training else 2, 48, 64)
    y = x.clone()
    t = 20
    y[:, t + 1 :] = torch.randn_like(y[:, t + 1 :]) * 3
    torch.manual_seed(1)
    out_x, _, _ = layer(x)
    routes_x = layer.meta.last_routes.clone()
    torch.manual_seed(1)  # same Dirichlet / Gumbel noise for both runs
    out_y, _, _ = layer(y)
    torch.testing.assert_close(out_x[:, : t + 1], out_y[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert torch.equal(routes_x[:, : t + 1], layer.meta.last_routes[:, : t + 1])
    assert not torch.allclose(out_x[:, t + 1 :], out_y[:, t + 1 :])


def test_prefix_routes_do_not_change_when_the_sequence_grows():
    layer = make_layer(mode="hard")
    x = torch.randn(1, 100, 64)
    layer(x[:, :30])
    short = layer.meta.last_routes.clone()
    layer(x)
    assert torch.equal(short, layer.meta.last_routes[:, :30])
    assert len(short.unique()) > 1


def count_expert_queries(layer):
    """Wrap each expert's attend to record how many queries it computed."""
    calls = {i: [] for i in range(len(layer.experts))}
    for i, expert in enumerate(layer.experts):
        original = expert.attend

        def counting(q, k, v, q_pos=None, _i=i, _orig=original, **kw):
            calls[_i].append(q.shape[2])
            return _orig(q, k, v, q_pos, **kw)

        expert.attend = counting
    return calls


def test_hard_inference_runs_each_expert_only_on_its_tokens():
    layer = make_layer(mode="hard")
    calls = count_expert_queries(layer)
    with torch.no_grad():
        layer(torch.randn(1, 64, 64))
    routes = layer.meta.last_routes[0]
    for i in range(3):
        n = int((routes == i).sum())
        assert calls[i] == ([n] if n else []), (i, calls[i], n)
    assert sum(sum(c) for c in calls.values()) == 64
    # Soft routing runs every expert on every token.
    set_routing_mode(layer, "soft")
    calls = count_expert_queries(layer)
    with torch.no_grad():
        layer(torch.randn(1, 64, 64))
    assert all(c == [64] for c in calls.values())


def test_one_hot_routing_gathered_equals_soft_mix():
    layer = make_layer(mode="hard")
    x = torch.randn(3, 50, 64)
    routes = torch.randint(0, 3, (3, 50))
    weights = F.one_hot(routes, 3).float()
    b, t = 3, 50
    q = layer.q_proj(x).view(b, t, 4, 16).transpose(1, 2)
    k = layer.k_proj(x).view(b, t, 2, 16).transpose(1, 2)
    v = layer.v_proj(x).view(b, t, 2, 16).transpose(1, 2)
    with torch.no_grad():
        layer.meta.eval()
        gathered = layer.meta.run_experts(q, k, v, weights)
        layer.meta.train()  # training runs every expert densely and mixes
        dense = layer.meta.run_experts(q, k, v, weights)
    torch.testing.assert_close(gathered, dense, atol=1e-5, rtol=1e-5)
    # The same mix through force_expert with per-token routes, at the layer level.
    layer.eval()
    with torch.no_grad(), force_expert(layer, routes):
        out, _, stats = layer(x)
    expected = layer.o_proj(dense.transpose(1, 2).reshape(b, t, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    fractions = torch.tensor(stats.expert_fractions)
    torch.testing.assert_close(fractions, F.one_hot(routes, 3).float().mean((0, 1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_forced_full_is_plain_attention(causal):
    layer = make_layer(mode="hard", causal=causal)
    x = torch.randn(2, 33, 64)
    with torch.no_grad(), force_expert(layer, "full"):
        out, aux, stats = layer(x)
        assert layer.meta.forced_expert == 0
    assert layer.meta.forced_expert is None  # restored on exit
    torch.testing.assert_close(out, reference_attention(layer, x, causal), atol=1e-5, rtol=1e-5)
    assert aux.item() == 0.0
    assert stats.expert_fractions == [1.0, 0.0, 0.0] and stats.projected_cost == 1.0


def test_force_expert_rejects_unknown_names_before_changing_anything():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"unknown expert 'fast'.*\['full', 'linear', 'local'\]"):
        with force_expert(layer, "fast"):
            pass
    with pytest.raises(ValueError, match="integer expert indices"):
        with force_expert(layer, torch.tensor([0, 5])):
            pass
    assert layer.meta.forced_expert is None
    with pytest.raises(ValueError, match="contains no Meta-Attention"):
        with force_expert(torch.nn.Linear(2, 2), "full"):
            pass


def test_bidirectional_layer_sees_the_future():
    layer = make_layer(mode="soft", causal=False)
    x = torch.randn(1, 20, 64)
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(layer(x)[0][:, 0], layer(y)[0][:, 0])


def test_padding_mask_hides_padded_keys():
    layer = make_layer(mode="hard")
    x = torch.randn(2, 24, 64)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, :6] = False  # left padding on row 0
    y = x.clone()
    y[0, :6] = torch.randn(6, 64)
    with torch.no_grad():
        out_x, _, stats = layer(x, mask)
        out_y, _, _ = layer(y, mask)
    torch.testing.assert_close(out_x[0, 6:], out_y[0, 6:], atol=1e-5, rtol=1e-5)
    assert stats.n_tokens == 48 - 6


def test_attention_mask_forms():
    layer = make_layer(mode="soft")
    x = torch.randn(2, 10, 64)
    causal_bool = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    additive = torch.zeros(1, 1, 10, 10).masked_fill(~causal_bool, float("-inf"))
    with torch.no_grad(), force_expert(layer, "full"):
        a, _, _ = layer(x, causal_bool)
        b, _, _ = layer(x, additive)
        c, _, _ = layer(x)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)
    with pytest.raises(ValueError, match="padding mask"):
        layer(x, torch.ones(3, 10))


def test_auto_mode_sends_uncertain_tokens_to_full():
    layer = make_layer(mode="hard")
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        layer(x)
        hard_routes = layer.meta.last_routes.clone()
        set_routing_mode(layer, "auto", uncertainty_threshold=1e-6)  # every token is uncertain
        _, _, stats = layer(x)
        assert stats.expert_fractions == [1.0, 0.0, 0.0]
        set_routing_mode(layer, "auto", uncertainty_threshold=1.0)  # no token is
        layer(x)
        assert torch.equal(layer.meta.last_routes, hard_routes)
        set_routing_mode(layer, "auto", uncertainty_threshold=1e-6, uncertain_route="soft")
        calls = count_expert_queries(layer)
        _, _, stats = layer(x)
        assert all(c == [40] for c in calls.values())  # uncertain tokens stay soft: all experts, densely
        assert stats.projected_cost == pytest.approx(sum(CFG.expert_costs))
    with pytest.raises(ValueError, match="RoutingPolicy.mode='fast' is invalid"):
        set_routing_mode(layer, "fast")


def test_set_routing_mode_on_a_model():
    model = torch.nn.Sequential(make_layer(), make_layer())
    set_routing_mode(model, "auto", uncertainty_threshold=0.5)
    assert [m[0].meta.routing_mode for m in [model]] == ["auto"]
    assert all(layer.meta.routing_mode == "auto" for layer in model)


def test_routing_policy_sets_and_restores_every_module():
    model = torch.nn.Sequential(make_layer(mode="hard"), make_layer(mode="hard"))
    before = [layer.meta.policy for layer in model]
    with pytest.raises(KeyError), routing_policy(model, mode="auto", uncertainty_threshold=0.4, dense_below=0):
        assert {layer.meta.policy for layer in model} == {
            RoutingPolicy(mode="auto", uncertainty_threshold=0.4, dense_below=0)}
        raise KeyError("the block fails: the policy still comes back")
    assert [layer.meta.policy for layer in model] == before
    set_routing_policy(model, RoutingPolicy(mode="hard", full_tail=4, backend="torch"))
    assert {layer.meta.policy for layer in model} == {RoutingPolicy(mode="hard", full_tail=4, backend="torch")}
    with pytest.raises(ValueError, match="uncertainty_threshold=None"):  # checked on every module before any changes
        set_routing_policy(model, mode="auto")
    assert all(layer.meta.routing_mode == "hard" for layer in model)
    with pytest.raises(ValueError, match="RoutingPolicy has no field"):
        set_routing_policy(model, tail=3)


def test_objective_weights_are_set_on_the_modules():
    layer = make_layer(training=True)
    assert layer.meta.objective_weights == ObjectiveWeights()
    set_objective_weights(layer, sample_posterior=False)
    x = torch.randn(2, 12, 64)
    r = layer.meta.router(x, torch.arange(12))
    weights, _, _ = layer.meta.route(x, torch.arange(12))
    torch.testing.assert_close(weights, r.mean)  # soft training on the posterior mean, not a sample
    set_objective_weights(layer, ObjectiveWeights(kl_weight=0.0))
    assert layer.meta.objective_weights == ObjectiveWeights(kl_weight=0.0)
    with pytest.raises(ValueError, match="ObjectiveWeights.cost_lambda=-1"):
        set_objective_weights(layer, cost_lambda=-1)


def test_routing_stats_format_and_aggregation():
    layers = [make_layer(mode="hard"), make_layer(mode="hard")]
    x = torch.randn(2, 30, 64)
    with torch.no_grad():
        stats = [layer(x)[2] for layer in layers]
    text = repr(stats[0])
    assert re.fullmatch(r"RoutingStats\(E1=\d\.\d\d \| E2=\d\.\d\d \| E3=\d\.\d\d entropy=\d\.\d\d cost=\d\.\d\d\)", text)
    total = RoutingStats.aggregate(stats)
    assert total.n_tokens == 120
    for field in ("entropy", "projected_cost", "expected_cost", "collapsed_fraction", "mean_uncertainty"):
        assert getattr(total, field) == pytest.approx((getattr(stats[0], field) + getattr(stats[1], field)) / 2)
    assert sum(total.expert_fractions) == pytest.approx(1.0)
    assert 0.0 <= total.entropy <= 1.0 and 0.0 < total.mean_uncertainty < 1.0
    routes = layers[0].meta.last_routes
    costs = torch.tensor(CFG.expert_costs)
    assert stats[0].projected_cost == pytest.approx(costs[routes].mean().item(), abs=1e-6)
    model = torch.nn.Sequential(*layers)
    assert [s.n_tokens for s in routing_stats(model)] == [60, 60]


def test_aux_loss_terms():
    x = torch.randn(2, 16, 64)
    base = make_layer(training=True)
    torch.manual_seed(0)
    kl_only = base(x)[1]
    with_cost = MetaAttentionLayer(CFG).train()
    set_objective_weights(with_cost, cost_lambda=2.0, entropy_coeff=0.5)
    with_cost.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    _, aux, _ = with_cost(x)
    r = with_cost.meta.router(x, torch.arange(16))
    costs = torch.tensor(CFG.expert_costs)
    from ma_convert.core.objective import expected_cost, routing_entropy

    expected = kl_only + 2.0 * expected_cost(r.mean, costs).mean() - 0.5 * routing_entropy(r.mean).mean()
    torch.testing.assert_close(aux, expected, atol=1e-5, rtol=1e-5)
    prior_free = MetaAttentionLayer(CFG.replace(router="softmax")).train()
    assert prior_free(x)[1].item() == 0.0  # no KL, and no cost or entropy terms configured


def test_gumbel_top_1_is_hard_forward_and_soft_backward():
    logits = torch.randn(4, 5, 3, requires_grad=True)
    w, mask = gumbel_top_1(logits, 0.5)
    assert torch.equal(w.detach() != 0, mask)
    assert torch.equal(mask.sum(-1), torch.ones(4, 5, dtype=torch.long))
    torch.testing.assert_close(w.detach().sum(-1), torch.ones(4, 5))
    (w * torch.randn_like(w)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_training_hard_stats_report_the_routes_actually_used():
    layer = make_layer(mode="hard", training=True)
    x = torch.randn(2, 64, 64)
    b, t = 2, 64
    q = layer.q_proj(x).view(b, t, 4, 16).transpose(1, 2)
    k = layer.k_proj(x).view(b, t, 2, 16).transpose(1, 2)
    v = layer.v_proj(x).view(b, t, 2, 16).transpose(1, 2)
    _, weights = layer.meta(x, q, k, v)
    used = weights.detach().argmax(-1)
    assert torch.equal(layer.meta.last_routes, used)
    fractions = F.one_hot(used, 3).float().mean((0, 1))
    torch.testing.assert_close(torch.tensor(layer.meta.last_stats.expert_fractions), fractions, atol=1e-6, rtol=0)


def test_padding_given_as_attention_mask_equals_padding_mask():
    layer = make_layer(mode="soft").eval()
    x = torch.randn(2, 24, 64)
    pad = torch.ones(2, 24, dtype=torch.bool)
    pad[1, :7] = False
    as_attention = pad[:, None, :].expand(2, 24, 24)
    for expert in ("full", "linear", "local"):
        with torch.no_grad(), force_expert(layer, expert):
            a, _, stats_a = layer(x, pad)
            b, _, stats_b = layer(x, as_attention)
        torch.testing.assert_close(a[pad], b[pad], atol=1e-5, rtol=1e-5, msg=expert)
        assert stats_a.n_tokens == stats_b.n_tokens == 48 - 7
    additive = torch.zeros(2, 24).masked_fill(~pad, float("-inf"))  # the additive form of the same padding
    with torch.no_grad(), force_expert(layer, "linear"):
        torch.testing.assert_close(layer(x, additive)[0][pad], layer(x, pad)[0][pad])


def test_uneven_rows_match_one_row_at_a_time():
    """Rows that route very different numbers of tokens (padding slots) give the per-row results."""
    layer = make_layer(mode="hard").eval()
    x = torch.randn(2, 130, 64)
    routes = torch.stack([torch.ones(130, dtype=torch.long), torch.randint(0, 3, (130,))])
    routes[0, 5] = 2  # row 0: everything linear but one local token
    with torch.no_grad():
        with force_expert(layer, routes):
            both, _, _ = layer(x)
        for row in range(2):
            with force_expert(layer, routes[row : row + 1]):
                alone, _, _ = layer(x[row : row + 1])
            torch.testing.assert_close(both[row], alone[0], atol=1e-5, rtol=1e-5)


def test_expert_count_must_match_costs():
    with pytest.raises(ValueError, match="expert_costs has 3 entries but 2 experts"):
        MetaAttentionLayer(CFG, experts=[build_expert("full", CFG), build_expert("local", CFG)])


def test_custom_hidden_state_expert_mixes_with_built_ins():
    from ma_convert.experts import AttentionExpert

    class Double(AttentionExpert):
        _cost = 0.05

        def forward(self, x, mask=None):
            return 2 * x

    cfg = CFG.replace(expert_costs=[1.0, 0.15, 0.05])
    layer = MetaAttentionLayer(cfg, experts=[build_expert("full", cfg), build_expert("linear", cfg), Double()]).eval()
    x = torch.randn(2, 20, 64)
    routes = torch.randint(0, 3, (2, 20))
    with torch.no_grad():
        with force_expert(layer, "full"):
            full_out, _, _ = layer(x)
        with force_expert(layer, "linear"):
            linear_out, _, _ = layer(x)
        with force_expert(layer, 2):
            custom_out, _, _ = layer(x)
        with force_expert(layer, routes):
            mixed, _, _ = layer(x)
    torch.testing.assert_close(custom_out, 2 * x)
    torch.testing.assert_close(full_out, reference_attention(layer, x), atol=1e-5, rtol=1e-5)
    expected = torch.stack([full_out, linear_out, custom_out])[routes, torch.arange(2)[:, None], torch.arange(20)]
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
