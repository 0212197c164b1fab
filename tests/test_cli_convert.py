"""`ma-convert convert` and `verify` on tiny checkpoints, and every bad input they must refuse cleanly."""

import json
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from arch_cases import all_cases
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

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
    assert config["meta_attention"]["base_model"] == "source"  # a name, never this machine's absolute path
    assert main(["verify", str(out), "--base", str(source), "--trust-remote-code"]) == 0
    printed = capsys.readouterr().out
    assert "(b) loaded as remote code" in printed and "ok" in printed
    assert "(c) forced-full vs the base model (float32): max |logit diff| = 0.00e+00 ok" in printed
    assert "(d) cached generation = recomputation, routed, 16 tokens: ok" in printed
    assert "(d) cached generation = recomputation, forced full, 16 tokens: ok" in printed
    assert leftovers(tmp_path, "converted") == []
    assert (out / "README.md").is_file() and (out / ".ma-convert.json").is_file()
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o644) for p in out.iterdir() if p.is_file())


def test_verify_runs_no_remote_code_unless_trusted(source, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out)]) == 0
    planted = tmp_path / "remote-code-ran"
    modeling = out / "modeling_ma_llama.py"
    modeling.write_text(modeling.read_text() + f"\nimport pathlib; pathlib.Path({str(planted)!r}).touch()\n")
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "(b) remote code not run" in capsys.readouterr().out
    assert not planted.exists()
    assert main(["verify", str(out), "--trust-remote-code"]) == 0
    assert planted.exists()


def test_config_file_is_applied(source, tmp_path):
    (tmp_path / "cfg.yaml").write_text("window_size: 16\nrouter: softmax\nfeature_map: elu\n")
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out), "--config", str(tmp_path / "cfg.yaml")]) == 0
    attention = json.loads((out / "config.json").read_text())["meta_attention"]["attention"]
    assert (attention["window_size"], attention["router"], attention["feature_map"]) == (16, "softmax", "elu")


@pytest.mark.parametrize("text", [
    "window_size: 16\nhard_routing: true\nfull_tail: 16\ndense_below: 0\nkl_weight: 0.5\n",  # format 1
    "window_size: 16\npolicy:\n  mode: hard\n  full_tail: 16\n  dense_below: 0\n",
], ids=["format-1", "policy-section"])
def test_config_file_policy_is_the_routing_the_model_loads_with(source, tmp_path, text):
    from ma_convert.core.control import meta_attention_modules

    (tmp_path / "cfg.yaml").write_text(text)
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out), "--config", str(tmp_path / "cfg.yaml")]) == 0
    block = json.loads((out / "config.json").read_text())["meta_attention"]
    assert block["attention"]["window_size"] == 16 and "kl_weight" not in block["attention"]
    assert (block["policy"]["mode"], block["policy"]["full_tail"], block["policy"]["dense_below"]) == ("hard", 16, 0)
    modules = meta_attention_modules(AutoModelForCausalLM.from_pretrained(out))
    assert {(m.routing_mode, m.full_tail, m.dense_below) for m in modules} == {("hard", 16, 0)}


def test_existing_output_is_refused_and_kept(source, tmp_path, capsys):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(source), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(source), str(out), "--overwrite"]) == 2  # not ours: never replaced
    assert "did not write (keep.txt)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(["convert", str(source), str(out), "--overwrite"]) == 0  # empty: fine
    assert main(["convert", str(source), str(out), "--overwrite"]) == 0  # ours: replaced
    assert (out / "model.safetensors").exists()
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


def test_corrupt_weights_are_a_clear_error_and_leave_nothing(source, tmp_path, capsys):
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    assert "could not load the weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_dtype_option(source, tmp_path):
    out = tmp_path / "bf16"
    assert main(["convert", str(source), str(out), "--dtype", "bfloat16"]) == 0
    assert main(["verify", str(out), "--base", str(source)]) == 0  # compared with the base model in the same dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def _slow_convert(tmp_path, source, out, flag):
    """`ma-convert convert` in a child process that pauses once the weights are written."""
    script = textwrap.dedent(f"""
        import sys, time
        from transformers import PreTrainedModel
        real = PreTrainedModel.save_pretrained
        def slow(self, folder, *args, **kwargs):
            real(self, folder, *args, **kwargs)
            open({str(flag)!r}, "w").close()
            time.sleep(120)
        PreTrainedModel.save_pretrained = slow
        from ma_convert.cli import main
        sys.exit(main(["convert", {str(source)!r}, {str(out)!r}]))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.1)
    return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_write_removes_the_temporary_folder(source, tmp_path, signum):
    out = tmp_path / "converted"
    child = _slow_convert(tmp_path, source, out, tmp_path / "writing")
    assert leftovers(tmp_path, "converted")  # the temporary sibling exists while writing
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted; nothing half-written was left behind" in err and "Traceback" not in err
    assert leftovers(tmp_path, "converted") == [] and not out.exists()


def test_a_killed_write_is_cleaned_up_by_the_next_run(source, tmp_path):
    out = tmp_path / "converted"
    child = _slow_convert(tmp_path, source, out, tmp_path / "writing")
    child.kill()  # SIGKILL: no cleanup can run
    child.communicate(timeout=60)
    assert leftovers(tmp_path, "converted")
    (tmp_path / ".converted.tmp-foreign").mkdir()  # a look-alike that ma-convert did not write stays
    assert main(["convert", str(source), str(out)]) == 0
    assert leftovers(tmp_path, "converted") == [".converted.tmp-foreign"]


def test_stale_remote_code_warns_and_upgrade_rewrites_only_the_code(source, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from ma_convert.remote_code import REMOTE_CODE_VERSION, generated_files

    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out)]) == 0
    code = generated_files(out)
    assert code and set(code.values()) == {REMOTE_CODE_VERSION}
    for name in code:  # what ma-convert 0.1 wrote: the same files without a version stamp
        path = out / name
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("# Generated by ma-convert from ma_convert/old.py; do not edit.\n" + "".join(lines[1:]))
    (out / "my_notes.py").write_text("# mine\n")
    others = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".py"}
    stale = rf"remote code version 1, current {REMOTE_CODE_VERSION}\).*ma-convert upgrade"
    with pytest.warns(UserWarning, match=stale):
        AutoModelForCausalLM.from_pretrained(out)
    assert main(["verify", str(out)]) == 1
    assert "older ma-convert" in capsys.readouterr().out
    assert main(["upgrade", str(out)]) == 0
    assert f"remote code version 1 -> {REMOTE_CODE_VERSION}" in capsys.readouterr().out
    assert set(generated_files(out).values()) == {REMOTE_CODE_VERSION}
    assert (out / "my_notes.py").read_text() == "# mine\n"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".py"} == others
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModelForCausalLM.from_pretrained(out)
    assert main(["verify", str(out), "--trust-remote-code"]) == 0


def test_remote_code_of_version_2_is_stale_for_the_new_config_format(tmp_path):
    from ma_convert.remote_code import stale_remote_code_message

    stamp = "# Generated by ma-convert 0.2.0 (remote code version 2); do not edit.\n"
    (tmp_path / "modeling_ma_llama.py").write_text(stamp)
    assert "reads only the config format of ma-convert 0.2" in stale_remote_code_message(tmp_path, "ma_llama")


def test_version_flag(capsys):
    from ma_convert import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"ma-convert {__version__}"
