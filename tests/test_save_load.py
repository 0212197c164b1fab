"""Hub-style save and load of converted models: both loading paths, strictness, bad checkpoints."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from arch_cases import all_cases
from ma_convert import RoutingPolicy, convert, force_expert, set_routing_mode
from ma_convert.adapters import adapter_for
from ma_convert.convert import convert_config
from ma_convert.core.config import FORMAT_VERSION
from ma_convert.core.controller import DirichletRouter
from ma_convert.core.experts.linear import HedgehogFeatureMap
from test_conversion import TOL, spread_routing

CASES = all_cases()


def converted_and_saved(case, folder):
    model = convert(copy.deepcopy(case.make("sdpa"))).eval()
    spread_routing(model)
    with torch.no_grad():  # move every new parameter off its initial value, so reloading must restore it
        for name, p in model.named_parameters():
            if ".meta." in name:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case converted, saved, and its logits on fixed ids recorded."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for case in CASES:
        folder = root / case.name
        model = converted_and_saved(case, folder)
        ids = torch.randint(3, case.vocab, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        torch.save(ids, folder / "ids.pt")
        torch.save(logits, folder / "expected.pt")
        out[case.name] = (folder, model, ids, logits)
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reload_with_ma_convert_is_identical(case, saved):
    folder, model, ids, logits = saved[case.name]
    config = json.loads((folder / "config.json").read_text())
    block = config["meta_attention"]
    assert config["model_type"] == f"ma_{block['base_model_type']}"
    expected = {"format_version", "converter_version", "base_model", "base_model_revision", "attention", "policy"}
    assert expected <= set(block)
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=0, rtol=0)
    if getattr(model.config, "tie_word_embeddings", False):
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_reload_as_remote_code_without_the_package(saved):
    """A fresh interpreter in which `import ma_convert` fails loads every folder with
    trust_remote_code=True and reproduces the logits exactly."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["ma_convert"] = None
        import torch
        from transformers import AutoModelForCausalLM
        for folder in sys.argv[1:]:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                got = model(torch.load(folder + "/ids.pt")).logits
            diff = (got - torch.load(folder + "/expected.pt")).abs().max().item()
            print(folder, diff)
            assert diff == 0.0, (folder, diff)
        """
    )
    folders = [str(folder) for folder, *_ in saved.values()]
    run = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.splitlines()) == len(folders)


# What format 1 (ma-convert 0.2) saved besides today's config fields: the routing policy and the objective weights.
FORMAT_1_EXTRAS = dict(
    hard_routing=True, hard_top_k=1, gumbel_temp=1.0, uncertainty_threshold=None, uncertain_route="full", full_tail=16,
    backend="auto", dense_below=0, sample_posterior=True, kl_weight=1.0, cost_lambda=0.0, entropy_coeff=0.0,
    prior="compute", beta0=3.0, causal=True, concentration_eps=1e-3,
)


def save_as_format_1(folder):
    """Rewrite a saved folder's config.json as format 1 wrote it: every field in `attention`, no `policy`."""
    config = json.loads((folder / "config.json").read_text())
    block = config["meta_attention"]
    block["attention"] = {**block.pop("attention"), **FORMAT_1_EXTRAS, "format_version": 1}
    block.pop("policy")
    block["format_version"] = 1
    assert len(block["attention"]) == 31 + 1  # the 31 fields of format 1, and its version
    (folder / "config.json").write_text(json.dumps(config))


# What formats 2 and 3 (to 2026-12-03) saved in `attention` that this version drops on load: the
# router's prior (format 2; only training reads it) and `causal` / `concentration_eps` (formats 2-3; fixed now).
OLDER_FORMATS = {2: dict(prior="uniform", beta0=7.0, causal=True, concentration_eps=1e-3),
                 3: dict(causal=True, concentration_eps=1e-3)}


@pytest.mark.parametrize("version", sorted(OLDER_FORMATS))
def test_a_format_2_or_3_folder_loads_with_its_former_fields_dropped(tmp_path, version):
    case = next(c for c in CASES if c.name == "llama-gqa")
    model = converted_and_saved(case, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["meta_attention"]["attention"].update(format_version=version, **OLDER_FORMATS[version])
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, case.vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    reloaded.save_pretrained(tmp_path / "again")
    attention = json.loads((tmp_path / "again" / "config.json").read_text())["meta_attention"]["attention"]
    assert attention["format_version"] == FORMAT_VERSION and not set(OLDER_FORMATS[version]) & set(attention)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_format_1_folder_loads_with_its_policy(case, tmp_path):
    original = case.make("sdpa")
    model = converted_and_saved(type("Case", (), {"make": lambda self, impl: original})(), tmp_path)
    save_as_format_1(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    modules = [m for m in reloaded.modules() if type(m).__name__ == "MetaAttention"]
    assert modules and {m.policy for m in modules} == {RoutingPolicy(mode="hard", full_tail=16, dense_below=0)}
    ids = torch.randint(3, case.vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    set_routing_mode(model, "hard", full_tail=16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
        with force_expert(reloaded, "full"):  # as test_conversion (Falcon multi-query differs by 2e-7 there too)
            torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, **TOL)
    reloaded.save_pretrained(tmp_path / "again")  # saved again: today's format, the same policy
    block = json.loads((tmp_path / "again" / "config.json").read_text())["meta_attention"]
    assert block["format_version"] == 2 and block["attention"]["format_version"] == FORMAT_VERSION
    assert "hard_routing" not in block["attention"] and block["policy"]["full_tail"] == 16


def test_a_format_1_folder_loads_as_remote_code_without_the_package(tmp_path):
    """The remote code an export carries migrates format 1 too (a folder whose code was upgraded)."""
    case = next(c for c in CASES if c.name == "llama-gqa")
    model = converted_and_saved(case, tmp_path)
    save_as_format_1(tmp_path)
    ids = torch.randint(3, case.vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    set_routing_mode(model, "hard", full_tail=16)
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["ma_convert"] = None
        import torch
        from transformers import AutoModelForCausalLM
        folder = sys.argv[1]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            got = model(torch.load(folder + "/ids.pt")).logits
        assert torch.equal(got, torch.load(folder + "/expected.pt"))
        """
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_missing_weight_is_an_error(tmp_path):
    case = CASES[0]
    converted_and_saved(case, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if ".meta.router.fc2.bias" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 expected weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("where", ["block", "attention"])
def test_newer_format_version_is_refused(tmp_path, where):
    converted_and_saved(CASES[0], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    target = config["meta_attention"] if where == "block" else config["meta_attention"]["attention"]
    target["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    converted_and_saved(CASES[0], tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)safetensors|deserializ|incomplete|header|truncat"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_original_checkpoint_loads_into_the_converted_class(case, tmp_path):
    original = case.make("sdpa")
    original.save_pretrained(tmp_path)
    adapter = adapter_for(original.config.model_type)
    config = convert_config(AutoConfig.from_pretrained(tmp_path))
    model, info = adapter.causal_lm_class.from_pretrained(tmp_path, config=config, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    assert missing and all(".meta." in key for key in missing), missing
    assert not info["unexpected_keys"]
    # The new parameters are initialised, not left as uninitialised memory.
    for module in model.modules():
        if isinstance(module, DirichletRouter):
            torch.testing.assert_close(module.fc2.bias, module.initial_bias())
            assert module.fc2.weight.abs().max() < 0.2
            torch.testing.assert_close(module.prior, module.initial_bias().new_tensor(module.prior.tolist()))
        if isinstance(module, HedgehogFeatureMap):
            torch.testing.assert_close(module.weight, torch.eye(module.weight.shape[-1]).expand_as(module.weight))
    ids = torch.randint(3, case.vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad(), force_expert(model, "full"):
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)


def test_fresh_converted_model_is_initialised(tmp_path):
    case = CASES[0]
    config = convert_config(case.make("sdpa").config)
    model = adapter_for(config.model_type).causal_lm_class(config)
    for module in model.modules():
        if isinstance(module, DirichletRouter):
            torch.testing.assert_close(module.fc2.bias, module.initial_bias())


def test_sequence_longer_than_the_positions_is_refused():
    case = CASES[0]
    model = convert(case.make("sdpa")).eval()
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"at most {limit} positions"):
        model(torch.zeros(1, limit + 1, dtype=torch.long))


def test_hybrid_linear_expert_saves_and_reloads(tmp_path):
    """linear_window travels in config.json and the per-head weights in the checkpoint; a fresh
    model initialises them to 0 (equal weight for the kernel part)."""
    case = next(c for c in CASES if c.name == "llama-gqa")
    model = convert(copy.deepcopy(case.make("sdpa")), linear_window=3).eval()
    spread_routing(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".meta." in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hybrid")
    assert json.loads((tmp_path / "hybrid" / "config.json").read_text())["meta_attention"]["attention"]["linear_window"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    ids = torch.randint(3, case.vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    fresh = AutoModelForCausalLM.from_config(reloaded.config)
    weights = [p for n, p in fresh.named_parameters() if n.endswith("log_weight")]
    assert weights and all(torch.equal(w, torch.zeros_like(w)) for w in weights)


def test_one_initialisation_path_for_constructors_and_transformers():
    """`init_meta_weights` (what transformers calls for tensors a checkpoint lacks) sets each module's
    `initial_values`, as its constructor did, and leaves tensors marked as loaded alone."""
    from ma_convert.core.config import MetaAttnConfig
    from ma_convert.core.initial import tensor_named
    from ma_convert.core.meta_attention import MetaAttention
    from ma_convert.modeling.base import init_meta_weights

    meta = MetaAttention(MetaAttnConfig(d_model=32, n_heads=4, linear_window=4))
    fresh = {n: t.clone() for n, t in list(meta.named_parameters()) + list(meta.named_buffers())}
    loaded = meta.router.fc2.bias
    with torch.no_grad():
        for t in list(meta.parameters()) + list(meta.buffers()):
            t.add_(1.0)
    loaded._is_hf_initialized = True
    touched = [m for m in meta.modules() if init_meta_weights(m)]
    assert {type(m).__name__ for m in touched} == {"MetaAttention", "DirichletRouter", "HybridAttention",
                                                  "HedgehogFeatureMap"}
    for module in touched:
        for name, value in module.initial_values().items():
            tensor = tensor_named(module, name)
            if tensor is loaded:
                assert torch.equal(tensor, fresh["router.fc2.bias"] + 1.0)
            elif name != "fc2.weight":  # random: only its scale is fixed
                assert torch.equal(tensor, value.to(tensor.dtype)), name
    assert meta.router.fc2.weight.std() < 0.1
    assert torch.equal(meta.costs, fresh["costs"]) and torch.equal(meta.router.prior, fresh["router.prior"])
