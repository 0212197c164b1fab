"""`ma-convert convert` and `verify` on tiny checkpoints, and every bad input they must refuse cleanly."""

import json

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from arch_cases import all_cases
from ma_convert.cli import main

LLAMA = next(c for c in all_cases() if c.name.startswith("llama"))


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "source"
    LLAMA.make("sdpa").save_pretrained(folder)
    return folder


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


def test_convert_then_verify(source, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/4]" in printed and "[4/4]" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ma_llama"
    assert config["meta_attention"]["base_model"] == str(source.resolve())
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(b) loaded as remote code" in printed and "ok" in printed
    assert "(c) forced-full vs the base model (float32): max |logit diff| = 0.00e+00 ok" in printed
    assert leftovers(tmp_path, "converted") == []


def test_config_file_is_applied(source, tmp_path):
    (tmp_path / "cfg.yaml").write_text("window_size: 16\nrouter: softmax\nfeature_map: elu\n")
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out), "--config", str(tmp_path / "cfg.yaml")]) == 0
    attention = json.loads((out / "config.json").read_text())["meta_attention"]["attention"]
    assert (attention["window_size"], attention["router"], attention["feature_map"]) == (16, "softmax", "elu")


def test_existing_output_is_refused_and_kept(source, tmp_path, capsys):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(source), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", str(source), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path, "converted") == []


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    src = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'gpt_neox' is not supported" in err
    for arch in ("falcon", "gpt2", "llama", "mistral", "phi", "phi3"):
        assert arch in err
    assert not (tmp_path / "out").exists()


def test_contradicting_config_fails_before_any_weight_is_read(source, tmp_path, capsys):
    (source / "model.safetensors").write_bytes(b"not weights")  # would fail loudly if it were read
    (tmp_path / "cfg.yaml").write_text("n_heads: 3\n")
    assert main(["convert", str(source), str(tmp_path / "out"), "--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "MetaAttnConfig.n_heads=3 contradicts the llama model, which has n_heads=4" in err
    assert not (tmp_path / "out").exists()


def test_config_file_with_unknown_keys(source, tmp_path):
    (tmp_path / "cfg.yaml").write_text("windw_size: 16\n")
    with pytest.raises(SystemExit, match=r"no field\(s\) \['windw_size'\]"):
        main(["convert", str(source), str(tmp_path / "out"), "--config", str(tmp_path / "cfg.yaml")])


def test_corrupt_weights_are_a_clear_error_and_leave_nothing(source, tmp_path, capsys):
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    assert "could not load the weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_missing_gguf_and_bad_dtype(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path), str(tmp_path / "out"), "--dtype", "float8"])


def test_verify_refuses_an_unconverted_folder(source, capsys):
    assert main(["verify", str(source)]) == 2
    assert "not a converted model" in capsys.readouterr().err


def test_dtype_option(source, tmp_path):
    out = tmp_path / "bf16"
    assert main(["convert", str(source), str(out), "--dtype", "bfloat16"]) == 0
    assert main(["verify", str(out)]) == 0  # compared with the base model in the same dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_inputs_that_fail_early_with_a_message(source, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "no-such-folder"), str(tmp_path / "out")]) == 2
    assert "no-such-folder" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("window_size: [unclosed\n")
    with pytest.raises(SystemExit, match="cannot read the config file"):
        main(["convert", str(source), str(tmp_path / "out"), "--config", str(tmp_path / "bad.yaml")])
    (source / "model.safetensors").write_bytes(b"never read")  # both errors below come first
    (tmp_path / "two.yaml").write_text("expert_costs: [1.0, 0.15]\n")
    assert main(["convert", str(source), str(tmp_path / "out"), "--config", str(tmp_path / "two.yaml")]) == 2
    assert "three costs" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(source), str(tmp_path / "file" / "out")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
