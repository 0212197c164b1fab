import json

import pytest

from ma_convert import MetaAttnConfig
from ma_convert.core.config import FORMAT_VERSION, PRESETS


def test_defaults_and_derived_fields():
    cfg = MetaAttnConfig()
    assert cfg.n_experts == 3 and cfg.expert_costs == [1.0, 0.15, 0.30]
    assert cfg.kv_heads == cfg.n_heads and cfg.d_head == cfg.d_model // cfg.n_heads
    assert cfg.routing_mode == "soft"
    assert MetaAttnConfig(hard_routing=True).routing_mode == "hard"
    assert MetaAttnConfig(hard_routing=True, uncertainty_threshold=0.4).routing_mode == "auto"
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
        ("full_tail", -2),
        ("full_tail", 1.5),
        ("dropout", 1.0),
        ("temperature", 0),
        ("gumbel_temp", -1.0),
        ("controller_hidden", 0),
        ("expert_costs", []),
        ("expert_costs", [1.0, -0.1, 0.3]),
        ("hard_top_k", 4),
        ("router", "mlp"),
        ("prior", "flat"),
        ("feature_map", "relu"),
        ("linear_window", -1),
        ("linear_window", 2.5),
        ("backend", "cuda"),
        ("beta0", 0),
        ("kl_weight", -1),
        ("uncertainty_threshold", 1.5),
        ("uncertain_route", "linear"),
        ("max_positions", 0),
        ("hard_routing", "yes"),
        ("causal", 1),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MetaAttnConfig\.{field}=.*must be"):
        MetaAttnConfig(**{field: value})


def test_replace_validates():
    with pytest.raises(ValueError, match="window_size"):
        MetaAttnConfig().replace(window_size=-3)


def test_dict_and_json_round_trip():
    cfg = MetaAttnConfig.llama_7b(router="softmax", uncertainty_threshold=0.3, hard_routing=True)
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
