import math

import pytest
import torch
from torch.distributions import Dirichlet, kl_divergence

from ma_convert import MetaAttnConfig, cosine_ramp, linear_ramp
from ma_convert.core.controller import DirichletRouter, SoftmaxRouter, position_feature
from ma_convert.core.objective import dirichlet_kl, expected_cost, prior_concentration, prior_mean, routing_entropy

CFG = MetaAttnConfig(d_model=32, n_heads=4, controller_hidden=16, max_positions=512)


def test_kl_matches_torch_distributions():
    alpha = torch.rand(5, 7, 3) * 4 + 0.05
    beta = torch.rand(3) * 3 + 0.1
    ref = kl_divergence(Dirichlet(alpha), Dirichlet(beta.expand_as(alpha)))
    torch.testing.assert_close(dirichlet_kl(alpha, beta), ref, atol=1e-5, rtol=1e-5)
    assert dirichlet_kl(beta, beta).abs().max() < 1e-5


def test_compute_prior_prefers_cheap_experts():
    costs = [1.0, 0.15, 0.30]
    pi = prior_mean(costs, "compute")
    assert math.isclose(pi.sum().item(), 1.0, rel_tol=1e-6)
    assert pi[1] > pi[2] > pi[0]  # cheapest first
    assert expected_cost(pi, torch.tensor(costs)) < expected_cost(prior_mean(costs, "uniform"), torch.tensor(costs))
    torch.testing.assert_close(prior_mean(costs, "uniform"), torch.full((3,), 1 / 3))
    torch.testing.assert_close(prior_concentration(costs, "uniform", 3.0), torch.ones(3))


def test_entropy_normalised():
    assert routing_entropy(torch.full((3,), 1 / 3)).item() == pytest.approx(1.0)
    assert routing_entropy(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_position_feature_is_causal_and_length_free():
    pos = torch.arange(10)
    f = position_feature(pos, 512)
    assert f[0] == 0 and torch.all(f[1:] > f[:-1])
    torch.testing.assert_close(f, position_feature(torch.arange(1000), 512)[:10])
    assert f[-1].item() == pytest.approx(math.log1p(9) / math.log1p(512))


def test_router_starts_at_the_prior():
    router = DirichletRouter(CFG, 3).eval()
    r = router(torch.randn(2, 6, 32) * 10, torch.arange(6))
    torch.testing.assert_close(r.mean, prior_mean(CFG.expert_costs).expand_as(r.mean), atol=0.05, rtol=0)
    assert dirichlet_kl(r.concentration, router.prior).abs().max() < 0.05


def test_the_objectives_prior_sets_the_kl_target_and_can_restart_routing():
    """The prior is the training objective's: `set_objective_weights` moves the KL's target, and with
    `start_at_prior` an untrained router's routing too (the KL ~0 again)."""
    from ma_convert import MetaAttentionLayer, ObjectiveWeights, set_objective_weights

    layer = MetaAttentionLayer(CFG)
    x = torch.randn(2, 6, 32) * 10
    set_objective_weights(layer, ObjectiveWeights(prior="uniform", beta0=6.0))
    router = layer.meta.router
    torch.testing.assert_close(router.prior, torch.full((3,), 2.0))
    assert layer.meta.objective_weights.prior == "uniform" and layer.meta.objective_weights.beta0 == 6.0
    before = router(x, torch.arange(6))
    assert dirichlet_kl(before.concentration, router.prior).abs().max() > 0.1  # still at the default prior
    set_objective_weights(layer, prior="uniform", beta0=6.0, start_at_prior=True)
    after = router(x, torch.arange(6))
    torch.testing.assert_close(after.mean, torch.full_like(after.mean, 1 / 3), atol=0.05, rtol=0)
    assert dirichlet_kl(after.concentration, router.prior).abs().max() < 0.05


def test_dirichlet_router_sample_mean_uncertainty():
    router = DirichletRouter(CFG, 3)
    x = torch.randn(2, 6, 32)
    router.train()
    r = router(x, torch.arange(6), sample=True)
    assert not torch.allclose(r.sample, r.mean)
    torch.testing.assert_close(r.sample.sum(-1), torch.ones(2, 6))
    torch.testing.assert_close(r.mean, r.concentration / r.concentration.sum(-1, keepdim=True))
    assert ((r.uncertainty > 0) & (r.uncertainty < 1)).all()
    r = router(x, torch.arange(6))  # no sample asked for: the mean
    torch.testing.assert_close(r.sample, r.mean)
    # Larger total concentration means lower uncertainty.
    with torch.no_grad():
        router.fc2.bias.add_(5.0)
    assert (router(x, torch.arange(6)).uncertainty < r.uncertainty).all()


def test_softmax_router_temperature():
    x = torch.randn(2, 6, 32)
    hot = SoftmaxRouter(CFG.replace(temperature=10.0), 3)
    cold = SoftmaxRouter(CFG.replace(temperature=0.1), 3)
    cold.load_state_dict(hot.state_dict())
    with torch.no_grad():
        hot.fc2.weight.normal_()
        cold.fc2.weight.copy_(hot.fc2.weight)
    r_hot, r_cold = hot(x, torch.arange(6)), cold(x, torch.arange(6))
    assert r_hot.concentration is None
    assert routing_entropy(r_cold.mean).mean() < routing_entropy(r_hot.mean).mean()
    torch.testing.assert_close(r_hot.uncertainty, routing_entropy(r_hot.mean))


def test_ramps():
    assert linear_ramp(0, 10, 0.0, 1.0) == 0.0
    assert linear_ramp(5, 10, 0.0, 1.0) == pytest.approx(0.5)
    assert linear_ramp(20, 10, 0.0, 1.0) == 1.0
    assert cosine_ramp(0, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_ramp(5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_ramp(10, 10, 1.0, 0.0) == pytest.approx(0.0)
    assert linear_ramp(3, 0, 0.0, 2.0) == 2.0
