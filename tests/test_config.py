import json

import pytest

from ma_convert import MetaAttnConfig, ObjectiveWeights, RoutingPolicy
from ma_convert.core.config import FORMAT_VERSION, PRESETS, migrate_fields
from ma_convert.core.policy import split_saved_block


def test_defaults_and_derived_fields():
    cfg = MetaAttnConfig()
    assert cfg.n_experts == 3 and cfg.expert_costs == [1.0, 0.15, 0.30]
    assert cfg.kv_heads == cfg.n_heads and cfg.d_head == cfg.d_model // cfg.n_heads
    gqa = MetaAttnConfig(d_model=576, n_heads=9, n_kv_heads=3, head_dim=64)
    assert (gqa.kv_heads, gqa.d_head) == (3, 64)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets(preset):
    cfg = getattr(MetaAttnConfig, preset)()
    assert cfg.d_model % cfg.n_heads == 0 or cfg.head_dim
    assert getattr(MetaAttnConfig, preset)(window_size=7).window_size == 7


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("d_model", 12.5),
        ("n_heads", 7),  # does not divide d_model=512
        ("n_kv_heads", 3),  # does not divide n_heads=8
        ("head_dim", -1),
        ("window_size", 0),
        ("sink_tokens", -1),
        ("dropout", 1.0),
        ("temperature", 0),
        ("controller_hidden", 0),
        ("expert_costs", []),
        ("expert_costs", [1.0, -0.1, 0.3]),
        ("router", "mlp"),
        ("feature_map", "relu"),
        ("linear_window", -1),
        ("linear_window", 2.5),
        ("max_positions", 0),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MetaAttnConfig\.{field}=.*must be"):
        MetaAttnConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "fast"),
        ("full_tail", -2),
        ("full_tail", 1.5),
        ("backend", "cuda"),
        ("dense_below", -1),
        ("uncertainty_threshold", 1.5),
        ("uncertain_route", "linear"),
    ],
)
def test_bad_policy_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RoutingPolicy\.{field}=.*must be"):
        RoutingPolicy(**{field: value})


def test_a_policy_that_the_layer_cannot_run_is_refused():
    with pytest.raises(ValueError, match=r"RoutingPolicy\.uncertainty_threshold=None.*must be.*'auto'"):
        RoutingPolicy(mode="auto")
    with pytest.raises(ValueError, match=r"hard_top_k is no longer supported.*one top expert"):
        RoutingPolicy.from_dict({"hard_top_k": 2})
    assert RoutingPolicy.from_dict({"mode": "hard", "hard_top_k": 1}) == RoutingPolicy(mode="hard")
    for removed in ("fla", "flash_attn", "xformers", "flex"):  # their routed calls ran the triton kernels (or lost to them)
        assert RoutingPolicy.from_dict({"backend": removed}) == RoutingPolicy(backend="triton")


@pytest.mark.parametrize(
    "field,value",
    [("kl_weight", -1), ("cost_lambda", -0.5), ("entropy_coeff", float("nan")), ("gumbel_temp", -1.0),
     ("sample_posterior", "yes"), ("prior", "flat"), ("beta0", 0)],
)
def test_bad_objective_weights_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ObjectiveWeights\.{field}=.*must be"):
        ObjectiveWeights(**{field: value})


def test_policy_and_weights_round_trip_and_reject_unknown_fields():
    policy = RoutingPolicy(mode="auto", uncertainty_threshold=0.3, full_tail=16, dense_below=0)
    assert RoutingPolicy.from_dict(policy.to_dict()) == policy
    assert policy.replace(mode="hard").mode == "hard"
    with pytest.raises(ValueError, match=r"RoutingPolicy has no field\(s\) \['modee'\]"):
        RoutingPolicy.from_dict({"modee": "hard"})
    with pytest.raises(ValueError, match=r"ObjectiveWeights has no field\(s\) \['kl'\]"):
        ObjectiveWeights().replace(kl=1.0)


@pytest.mark.parametrize(
    "hard,threshold,mode", [(False, None, "soft"), (True, None, "hard"), (True, 0.4, "auto"), (False, 0.4, "soft")]
)
def test_format_1_policy_fields_migrate_as_routing_mode_derived_them(hard, threshold, mode):
    old = {"format_version": 1, "d_model": 64, "n_heads": 4, "hard_routing": hard, "uncertainty_threshold": threshold,
           "full_tail": 16, "dense_below": 0, "backend": "torch", "kl_weight": 0.5, "gumbel_temp": 2.0}
    cfg, policy = split_saved_block({"attention": old})
    assert cfg == MetaAttnConfig(d_model=64, n_heads=4)
    assert policy == RoutingPolicy(mode=mode, uncertainty_threshold=threshold, full_tail=16, dense_below=0,
                                   backend="torch")
    assert MetaAttnConfig.from_dict(old) == cfg  # the config alone: the policy and training fields left
    assert migrate_fields({k: v for k, v in old.items() if k != "format_version"}) == migrate_fields(old)
    with pytest.raises(ValueError, match=r"MetaAttnConfig\.hard_routing='yes'.*must be True or False"):
        migrate_fields({**old, "hard_routing": "yes"})


def test_a_saved_policy_wins_over_migrated_fields():
    block = {"attention": {"format_version": 1, "hard_routing": True}, "policy": {"mode": "soft"}}
    assert split_saved_block(block)[1] == RoutingPolicy()


def test_former_fields_in_the_current_format_say_where_they_went():
    with pytest.raises(ValueError, match=r"hard_routing.*moved to the routing policy"):
        MetaAttnConfig.from_dict({"format_version": FORMAT_VERSION, "hard_routing": True})
    with pytest.raises(ValueError, match=r"kl_weight.*moved to training"):
        MetaAttnConfig.from_dict({"format_version": FORMAT_VERSION, "kl_weight": 1.0})
    with pytest.raises(ValueError, match=r"beta0.*moved to training"):
        MetaAttnConfig.from_dict({"format_version": FORMAT_VERSION, "beta0": 5.0})


def test_format_2_reads_with_its_prior_left_to_training():
    """Format 2 (to 2026-12-03) kept the router's prior among the config fields; the KL alone reads it."""
    old = {"format_version": 2, "d_model": 64, "n_heads": 4, "router": "bayesian", "prior": "uniform", "beta0": 5.0,
           "temperature": 0.7}
    cfg, policy = split_saved_block({"attention": old, "policy": {"mode": "hard"}})
    assert cfg == MetaAttnConfig(d_model=64, n_heads=4, temperature=0.7) == MetaAttnConfig.from_dict(old)
    assert policy == RoutingPolicy(mode="hard")


def test_format_3_reads_with_its_fixed_fields_dropped():
    """Format 3 (to 2026-12-03) kept `causal` and `concentration_eps`; both are fixed now."""
    old = {"format_version": 3, "d_model": 64, "n_heads": 4, "causal": True, "concentration_eps": 1e-3}
    assert MetaAttnConfig.from_dict(old) == MetaAttnConfig(d_model=64, n_heads=4)
    with pytest.raises(ValueError, match=r"concentration_eps=0\.01 is no longer supported.*fixed at 1e-3"):
        MetaAttnConfig.from_dict({**old, "concentration_eps": 0.01})
    with pytest.raises(ValueError, match=r"causal=False is no longer supported.*MetaAttentionLayer\(cfg, causal="):
        MetaAttnConfig.from_dict({**old, "causal": False})
    with pytest.raises(ValueError, match=r"no field\(s\) \['causal'\].*MetaAttentionLayer"):
        MetaAttnConfig.from_dict({"format_version": FORMAT_VERSION, "causal": True})


def test_replace_validates():
    with pytest.raises(ValueError, match="window_size"):
        MetaAttnConfig().replace(window_size=-3)


def test_dict_and_json_round_trip():
    cfg = MetaAttnConfig.llama_7b(router="softmax", temperature=0.5)
    data = cfg.to_dict()
    assert data["format_version"] == FORMAT_VERSION
    assert MetaAttnConfig.from_dict(data) == cfg
    assert MetaAttnConfig.from_json(cfg.to_json()) == cfg
    json.loads(cfg.to_json())


def test_from_dict_rejects_unknown_fields_and_newer_formats():
    with pytest.raises(ValueError, match=r"no field\(s\) \['windw_size'\]"):
        MetaAttnConfig.from_dict({"windw_size": 3})
    with pytest.raises(ValueError, match="newer"):
        MetaAttnConfig.from_dict({"format_version": FORMAT_VERSION + 1})
