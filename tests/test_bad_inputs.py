"""Every bad input we tried, and what it prints now: one line on stderr, exit code 2, no traceback, and
nothing on disk created, changed or deleted.

Each row of CLI_CASES builds its input under a fresh folder and returns the command line; the message
is a regular expression the one line must match. MODEL_CASES are bad inputs to a loaded model.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_llama, write_tiny_gguf
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from ma_convert.cli import main


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # makes the input under a fresh folder, returns the command line
    message: str  # regex the one-line error matches
    creates: tuple[str, ...] = ()  # top-level paths a case may add (a run that stops keeps its last checkpoint)

    def __str__(self):
        return self.name


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A source folder, its conversion, a stopped finetune run with a checkpoint, a GGUF and a recipe."""
    from ma_convert.training.loop import finetune
    from ma_convert.training.recipe import Recipe

    root = tmp_path_factory.mktemp("template")
    save_tiny_llama(root / "source")
    assert main(["convert", str(root / "source"), str(root / "converted")]) == 0
    write_tiny_gguf(root / "tiny.gguf")
    (root / "recipe.yaml").write_text(recipe_yaml(root / "source", root / "run"))
    finetune(Recipe.from_yaml(root / "recipe.yaml"), stop_after=2)
    return root


def recipe_yaml(source, out, **training) -> str:
    settings = {"steps": 4, "batch_size": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 1, "log_with": None,
                **training}
    return yaml.safe_dump({
        "output_dir": str(out),
        "model": {"source": str(source), "meta_attention": {"window_size": 8}},
        "data": {"source": "pydoc", "seq_len": 32, "max_train_tokens": 1024, "max_eval_tokens": 128},
        "training": settings,
    })


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------------- builders
def convert_args(root: Path, src, out=None, *extra) -> list[str]:
    return ["convert", str(src), str(out or root / "out"), *extra]


def recipe_at(root: Path, **changes) -> list[str]:
    source = changes.pop("source", root / "source")
    out = changes.pop("out", root / "new-run")
    (root / "r.yaml").write_text(recipe_yaml(source, out, **changes))
    return ["finetune", "--config", str(root / "r.yaml")]


def no_config(root):
    (root / "source" / "config.json").unlink()
    return convert_args(root, root / "source")


def bad_json(root, folder="source"):
    (root / folder / "config.json").write_text("{not json")
    return convert_args(root, root / folder) if folder == "source" else ["verify", str(root / folder)]


def heads_not_dividing(root):
    edit_json(root / "source" / "config.json", lambda c: (c.update(num_attention_heads=3, num_key_value_heads=3),
                                                          c.pop("head_dim", None)))
    return convert_args(root, root / "source")


def neox(root):
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(root / "neox")
    return convert_args(root, root / "neox")


def config_file(root, text):
    (root / "cfg.yaml").write_text(text)
    return convert_args(root, root / "source", None, "--config", str(root / "cfg.yaml"))


def corrupt_weights(root, folder="source", keep=0.3):
    truncate(root / folder / "model.safetensors", keep)
    return convert_args(root, root / folder) if folder == "source" else ["verify", str(root / folder)]


def full_disk(root, monkeypatch):
    from transformers import PreTrainedModel

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    return convert_args(root, root / "source")


def foreign_file_in(root, folder):
    (root / folder).mkdir(exist_ok=True)
    (root / folder / "notes.txt").write_text("mine")


def drop_a_router_weight(root):
    path = root / "converted" / "model.safetensors"
    weights = load_file(path)
    del weights[next(k for k in weights if ".meta.router.fc2.bias" in k)]
    save_file(weights, path, metadata={"format": "pt"})
    return ["verify", str(root / "converted")]


def nan_router(root, folder="converted"):
    path = root / folder / "model.safetensors"
    weights = load_file(path)
    weights[next(k for k in weights if ".meta.router.fc2.weight" in k)].fill_(float("nan"))
    save_file(weights, path, metadata={"format": "pt"})
    return ["verify", str(root / folder)]


def newer_format(root):
    edit_json(root / "converted" / "config.json", lambda c: c["meta_attention"].update(format_version=99))
    return ["verify", str(root / "converted")]


def planted_py(root):
    (root / "converted" / "modeling_ma_llama.py").write_text("print('not ours')\n")
    return ["upgrade", str(root / "converted")]


def corrupt_checkpoint(root):
    checkpoint = next((root / "run" / "checkpoints").glob("step-*"))
    truncate(checkpoint / "model.safetensors", 0.5)
    return resume_run(root)


def planted_pickle(root):
    """A checkpoint whose optimizer file is a pickle that would create a file if unpickled without weights_only."""
    checkpoint = next((root / "run" / "checkpoints").glob("step-*"))
    plant_pickle(checkpoint / "optimizer.bin", root)
    return resume_run(root)


def plant_pickle(path: Path, root: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump(_Payload(str(root / "pickle-ran")), handle)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def old_format_checkpoint(root):
    checkpoint = next((root / "run" / "checkpoints").glob("step-*"))
    (checkpoint / "train_state.json").unlink()
    plant_pickle(checkpoint / "custom_checkpoint_0.pkl", root)
    return resume_run(root)


def resume_run(root):
    (root / "r.yaml").write_text(recipe_yaml(root / "source", root / "run"))
    return ["finetune", "--config", str(root / "r.yaml"), "--resume"]


def recipe_inside_output(root):
    (root / "rdir").mkdir()
    (root / "rdir" / "r.yaml").write_text(recipe_yaml(root / "source", root / "rdir"))
    return ["finetune", "--config", str(root / "rdir" / "r.yaml"), "--overwrite"]


def long_blocks(root):
    recipe = yaml.safe_load(recipe_yaml(root / "source", root / "new-run"))
    recipe["data"].update(seq_len=4096, max_train_tokens=8192, max_eval_tokens=4096)
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return ["finetune", "--config", str(root / "r.yaml")]


def no_tokenizer(root):
    save_tiny_llama(root / "bare", tokenizer=False)
    return recipe_at(root, source=root / "bare")


def exploding_lr(root):
    return recipe_at(root, lr=1e30, steps=6, save_every=2)


def push_without_card(root):
    (root / "converted" / "README.md").unlink()
    return ["push", str(root / "converted"), "me/model"]


CLI_CASES = [
    # convert: the source
    Case("convert: source folder does not exist", lambda r: convert_args(r, r / "no" / "such" / "model"), r"the model folder .*no/such/model does not exist"),
    Case("convert: relative source that does not exist", lambda r: convert_args(r, "./missing-model"), r"the model folder ./missing-model does not exist"),
    Case("convert: folder without config.json", no_config, r"source has no config.json: it is not a Hugging Face model folder"),
    Case("convert: config.json is not JSON", bad_json, r"source/config.json is not valid JSON \(Expecting"),
    Case("convert: heads do not divide the hidden size", heads_not_dividing, r"hidden size \(32\) is not a multiple of the number of attention heads \(3\)"),
    Case("convert: unsupported architecture", neox, r"'gpt_neox' is not supported; ma_convert converts: falcon, gpt2, llama, mistral, phi, phi3"),
    Case("convert: already converted", lambda r: convert_args(r, r / "converted"), r"already converted \(ma_llama\)"),
    Case("convert: a file that is neither folder nor GGUF", lambda r: (r / "notes.txt").write_text("x") and convert_args(r, r / "notes.txt"), r"neither a model folder nor a .gguf file"),
    Case("convert: GGUF file does not exist", lambda r: convert_args(r, r / "missing.gguf"), r"the GGUF file .*missing.gguf does not exist"),
    Case("convert: GGUF cut short in its header", lambda r: truncate(r / "tiny.gguf", 0.05) or convert_args(r, r / "tiny.gguf"), r"tiny.gguf is not a readable GGUF file \(truncated or corrupt"),
    Case("convert: GGUF cut short in its data", lambda r: truncate(r / "tiny.gguf", 0.9) or convert_args(r, r / "tiny.gguf"), r"tiny.gguf is (not a readable GGUF file|truncated)"),
    Case("convert: Hub id while offline", lambda r: convert_args(r, "nobody-here/no-such-model"), r"cannot read the config of nobody-here/no-such-model"),
    Case("convert: truncated weights", corrupt_weights, r"could not load the weights of .*source"),
    Case("convert: full disk", None, r"no space left on the device while writing .*out; nothing was written"),
    # convert: the config file
    Case("convert: config file with an unknown key", lambda r: config_file(r, "windw_size: 16\n"), r"MetaAttnConfig has no field\(s\) \['windw_size'\]"),
    Case("convert: config file that is not YAML", lambda r: config_file(r, "window_size: [unclosed\n"), r"cannot read the config file"),
    Case("convert: config file that is a list", lambda r: config_file(r, "- 1\n- 2\n"), r"must hold a mapping of MetaAttnConfig fields"),
    Case("convert: config file that does not exist", lambda r: convert_args(r, r / "source", None, "--config", str(r / "none.yaml")), r"cannot read the config file .*none.yaml"),
    Case("convert: config contradicting the model", lambda r: config_file(r, "n_heads: 3\n"), r"MetaAttnConfig.n_heads=3 contradicts the llama model, which has n_heads=4"),
    Case("convert: two expert costs", lambda r: config_file(r, "expert_costs: [1.0, 0.15]\n"), r"give the three costs"),
    Case("convert: negative window", lambda r: config_file(r, "window_size: -1\n"), r"window_size"),
    Case("convert: config file with an unknown policy key", lambda r: config_file(r, "policy:\n  mod: hard\n"), r"cfg.yaml: RoutingPolicy has no field\(s\) \['mod'\]"),
    Case("convert: config file with a bad policy value", lambda r: config_file(r, "policy:\n  full_tail: -1\n"), r"RoutingPolicy.full_tail=-1 is invalid"),
    Case("convert: config file with a policy that is not a mapping", lambda r: config_file(r, "policy: hard\n"), r"policy must be a mapping of RoutingPolicy fields"),
    Case("convert: format-2 config file with a former field", lambda r: config_file(r, "format_version: 2\nhard_routing: true\n"), r"\['hard_routing'\] moved to the routing policy"),
    # convert: the output folder
    Case("convert: output exists", lambda r: foreign_file_in(r, "out") or convert_args(r, r / "source"), r"out already exists; choose another folder or pass --overwrite"),
    Case("convert: output is the source", lambda r: convert_args(r, r / "source", r / "source", "--overwrite"), r"the output folder .*source is the source .*source"),
    Case("convert: output contains the source", lambda r: convert_args(r, r / "source", r, "--overwrite"), r"contains the source"),
    Case("convert: output lies inside the source", lambda r: convert_args(r, r / "source", r / "source" / "converted"), r"lies inside the source"),
    Case("convert: --overwrite over files ma-convert did not write", lambda r: foreign_file_in(r, "out") or convert_args(r, r / "source", None, "--overwrite"), r"refusing to overwrite .*out: it holds files ma-convert did not write \(notes.txt\)"),
    Case("convert: output's parent is a file", lambda r: (r / "file").write_text("x") and convert_args(r, r / "source", r / "file" / "out"), r"file is a file"),
    Case("convert: output is a file", lambda r: (r / "out.txt").write_text("x") and convert_args(r, r / "source", r / "out.txt", "--overwrite"), r"exists and is not a folder"),
    # verify
    Case("verify: folder does not exist", lambda r: ["verify", str(r / "nowhere")], r"nowhere is not a folder"),
    Case("verify: config.json is not JSON", lambda r: bad_json(r, "converted"), r"converted/config.json is not valid JSON"),
    Case("verify: an unconverted folder", lambda r: ["verify", str(r / "source")], r"not a converted model \(its config.json has no meta_attention block\)"),
    Case("verify: truncated weights", lambda r: corrupt_weights(r, "converted", 0.5), r"cannot load the weights in .*converted"),
    Case("verify: a missing router weight", drop_a_router_weight, r"lacks 1 expected weight"),
    Case("verify: NaN router weights", nan_router, r"router/expert weight\(s\) are not finite"),
    Case("verify: a newer format", newer_format, r"format_version=99 is newer than this ma_convert understands"),
    Case("verify: a base model that does not exist", lambda r: ["verify", str(r / "converted"), "--base", str(r / "gone")], r"the model folder .*gone does not exist"),
    # upgrade
    Case("upgrade: an unconverted folder", lambda r: ["upgrade", str(r / "source")], r"is not a folder exported by ma-convert"),
    Case("upgrade: folder does not exist", lambda r: ["upgrade", str(r / "nowhere")], r"cannot read .*nowhere/config.json"),
    Case("upgrade: a code file ma-convert did not write", planted_py, r"modeling_ma_llama.py were not written by ma-convert"),
    # finetune
    Case("finetune: recipe file does not exist", lambda r: ["finetune", "--config", str(r / "none.yaml")], r"cannot read the recipe .*none.yaml"),
    Case("finetune: recipe with a mistyped key", lambda r: (r / "r.yaml").write_text("training:\n  stpes: 3\n") and ["finetune", "--config", str(r / "r.yaml")], r"stpes \(did you mean steps\?\)"),
    Case("finetune: recipe with a negative learning rate", lambda r: recipe_at(r, lr=-1), r"training.lr=-1 is invalid"),
    Case("finetune: missing model source", lambda r: recipe_at(r, source=r / "gone"), r"the model folder .*gone does not exist"),
    Case("finetune: model folder without a tokenizer", no_tokenizer, r"bare has no usable tokenizer"),
    Case("finetune: seq_len beyond the model's positions", long_blocks, r"seq_len"),
    Case("finetune: output_dir exists", lambda r: recipe_at(r, out=r / "run"), r"run already exists; pass --resume to continue it or --overwrite to start over"),
    Case("finetune: output_dir is the model source", lambda r: recipe_at(r, out=r / "source") + ["--overwrite"], r"the output folder .*source is the source"),
    Case("finetune: output_dir contains the model source", lambda r: recipe_at(r, out=r) + ["--overwrite"], r"contains the source"),
    Case("finetune: output_dir contains the recipe", recipe_inside_output, r"contains the source .*r.yaml"),
    Case("finetune: --overwrite over files ma-convert did not write", lambda r: foreign_file_in(r, "new-run") or recipe_at(r) + ["--overwrite"], r"refusing to overwrite .*new-run: it holds files ma-convert did not write \(notes.txt\)"),
    Case("finetune: --resume without a run", lambda r: recipe_at(r) + ["--resume"], r"--resume: no checkpoint of an ma-convert run"),
    Case("finetune: --resume from a corrupt checkpoint", corrupt_checkpoint, r"cannot resume from .*step-\d+: it is damaged or incomplete"),
    Case("finetune: --resume from a checkpoint with a planted pickle", planted_pickle, r"cannot resume from .*: it is damaged or incomplete"),
    Case("finetune: --resume from a checkpoint with a foreign file", lambda r: plant_pickle(next((r / "run" / "checkpoints").glob("step-*")) / "custom_checkpoint_0.pkl", r) or resume_run(r), r"holds files ma-convert did not write \(custom_checkpoint_0.pkl\), which are never loaded"),
    Case("finetune: --resume from an older checkpoint format", old_format_checkpoint, r"no train_state.json \(it was written by an older ma-convert, whose pickled state is not loaded\)"),
    Case("finetune: a learning rate that drives the router to NaN", exploding_lr, r"the loss is nan in step \d+ \(is the learning rate, 1e\+30, too high\?\).*the last good checkpoint is .*step-0+2", creates=("new-run",)),
    # push
    Case("push: folder does not exist", lambda r: ["push", str(r / "nowhere"), "me/model"], r"nowhere is not a folder; nothing to push"),
    Case("push: folder without a model card", push_without_card, r"refusing to push .*converted: missing README.md"),
    Case("push: a pull request on a branch", lambda r: ["push", str(r / "converted"), "me/model", "--create-pr", "--revision", "dev"], r"opens a pull request against main"),
]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if "__pycache__" not in p.parts}


@pytest.mark.parametrize("case", CLI_CASES, ids=str)
def test_bad_input_gets_one_clear_line_and_changes_nothing(case, template, tmp_path, capsys, monkeypatch):
    root = tmp_path / "w"
    shutil.copytree(template, root)
    argv = full_disk(root, monkeypatch) if case.build is None else case.build(root)
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr:\n{err}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ma-convert: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), f"not one error line:\n{err}"
    assert re.search(case.message, errors[0]), errors[0]
    after = snapshot(root)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    changed = {k for k in changed if not any(k == c or k.startswith(c + "/") for c in case.creates)}
    assert not changed, f"files changed: {sorted(changed)[:5]}"
    assert not (root / "pickle-ran").exists()
    for created in case.creates:
        assert not list((root / created).rglob(".*tmp*")), "a temporary folder was left behind"


def test_planted_pickles_in_a_checkpoint_are_never_run(template, tmp_path):
    """A checkpoint file that is read only with weights_only=True (Accelerate's RNG pickle) can hold
    anything: its payload never runs, and resume still ends exactly where an uninterrupted run does
    (ma-convert restores the generators from its own safetensors file)."""
    from ma_convert.training.loop import finetune
    from ma_convert.training.recipe import Recipe

    root = tmp_path / "w"
    shutil.copytree(template, root)
    checkpoint = next((root / "run" / "checkpoints").glob("step-*"))
    plant_pickle(checkpoint / "random_states_0.pkl", root)  # Accelerate's file: read only with weights_only=True
    assert main(resume_run(root)) == 0
    assert not (root / "pickle-ran").exists()
    finetune(Recipe.from_dict({**yaml.safe_load((root / "r.yaml").read_text()), "output_dir": str(root / "straight")}))
    resumed, straight = (load_file(root / run / "model" / "model.safetensors") for run in ("run", "straight"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_the_table_is_long_enough():
    assert len(CLI_CASES) + len(MODEL_CASES) >= 40


def test_two_processes_that_accelerate_does_not_see_are_refused(template, tmp_path):
    """WORLD_SIZE=2 with one process (torchrun on CPUs without ACCELERATE_USE_CPU): a clear error, not
    two processes writing one output_dir."""
    root = tmp_path / "w"
    shutil.copytree(template, root)
    argv = recipe_at(root)
    env = {"WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "ma_convert.cli", *argv], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("ma-convert: WORLD_SIZE=2 but Accelerate sees one process")
    assert "Traceback" not in run.stderr


# ------------------------------------------------------------------------------ bad model inputs
def loaded(template):
    return AutoModelForCausalLM.from_pretrained(template / "converted").eval()


MODEL_CASES = [
    ("an empty input", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), r"the input is empty"),
    ("a token id past the vocabulary", lambda m: m(torch.tensor([[1, 2, 128]])), r"token id 128 is outside the vocabulary \(0..127\)"),
    ("a negative token id", lambda m: m(torch.tensor([[1, -3, 2]])), r"token id -3 is outside the vocabulary"),
    ("a prompt past the positions", lambda m: m(torch.ones(1, 129, dtype=torch.long)), r"the sequence has 129 tokens but the model handles at most 128"),
    ("generation past the positions", lambda m: m.generate(torch.ones(1, 126, dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False),
     r"the sequence has 129 tokens but the model handles at most 128"),
]


@pytest.mark.parametrize("name,call,message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_input_is_a_clear_error(name, call, message, template):
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        call(loaded(template))


def test_the_vocabulary_check_makes_no_host_sync_while_compiling(template, monkeypatch):
    """Under torch.compile (or a CUDA-graph capture) the prompt's ids are not read back to the host:
    that would break the graph. The embedding lookup is then what fails on a bad id."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad(), pytest.raises(IndexError):
        loaded(template)(torch.tensor([[1, 2, 128]]))


def test_nan_router_weights_are_refused_at_load(template, tmp_path):
    shutil.copytree(template / "converted", tmp_path / "c")
    nan_router(tmp_path, "c")
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\), e.g. model.layers.0.self_attn.meta.router"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
