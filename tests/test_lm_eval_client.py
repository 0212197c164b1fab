"""lm-evaluation-harness as a client: its `hf` model loads a converted folder from disk and runs the
repo's local tasks (ma_convert/eval/lm_eval_tasks) from any working directory; the README's command
runs as written; forced full reproduces the original model's numbers exactly.

Everything but the data-file check skips where lm-eval is not installed (`pip install 'ma-convert[eval]'`).
"""

import copy
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from arch_cases import all_cases

from ma_convert import convert
from ma_convert.core.control import meta_attention_modules
from ma_convert.eval.lm_eval_client import TASKS_DIR, evaluate, routing_for_eval, set_saved_routing, task_manager

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 8  # documents per task: the point is the plumbing, not the score


def _task_data_module():
    spec = importlib.util.spec_from_file_location("ma_pydoc_cloze_data", TASKS_DIR / "pydoc_cloze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_data_file_is_what_the_generator_writes():
    data = _task_data_module()
    raw = data.DATA_FILE.read_bytes()
    assert len(raw) < 200_000
    docs = data.read_docs()
    assert len(docs) == data.N_DOCS and len({d["id"] for d in docs}) == len(docs)
    assert all(d["context"] and re.fullmatch(r"[A-Za-z][A-Za-z-]*[A-Za-z]", d["target"]) for d in docs)
    source = json.loads(data.SOURCE_FILE.read_text())
    topics = data.pydoc_topics()
    if data.topics_digest(topics) != source["topics_sha256"]:
        pytest.skip(f"the data was generated from Python {source['python']}'s pydoc text, which this Python "
                    f"({sys.version.split()[0]}) does not have; the committed file still defines the task")
    assert source["generator_version"] == data.GENERATOR_VERSION and source["docs"] == len(docs)
    assert raw.decode("utf-8") == data.render_jsonl(data.build_docs(topics)), "regenerate: python " + str(
        data.DATA_FILE.parent / "pydoc_cloze.py")


# ----------------------------------------------------------------------------------------- lm-eval
@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ma-convert[eval]')")


@pytest.fixture(scope="module")
def tasks(lm_eval):
    """The repo's tasks only: indexing lm-eval's own thousands of task files takes seconds."""
    manager = task_manager(include_defaults=False)  # = lm_eval.tasks.TaskManager(include_path=TASKS_DIR, ...)
    assert {"ma_pydoc_cloze", "ma_pydoc_ppl"} <= set(manager.all_tasks)
    return manager


@pytest.fixture(autouse=True)
def _one_thread():
    """The models are tiny; one thread is as fast and does not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_tokenizer():
    """A word-level tokenizer over the task's own words (the tiny models have no real tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = _task_data_module().read_docs()
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator([f"{d['context']} {d['target']}" for d in docs],
                             trainers.WordLevelTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, lm_eval):
    """The tiny GQA LLaMA saved as it is ("original") and converted ("converted", remote code included),
    each with a word-level tokenizer."""
    root = tmp_path_factory.mktemp("lm_eval")
    case = next(c for c in all_cases() if c.name == "llama-gqa")
    original = case.make("sdpa")
    tokenizer = word_tokenizer()
    assert len(tokenizer) <= original.config.vocab_size
    original.save_pretrained(root / "original")
    tokenizer.save_pretrained(root / "original")
    convert(copy.deepcopy(original)).save_pretrained(root / "converted")
    tokenizer.save_pretrained(root / "converted")
    return {"original": root / "original", "converted": root / "converted"}


def hf_args(folder, **extra):
    return ",".join(f"{k}={v}" for k, v in {"pretrained": folder, "dtype": "float32", **extra}.items())


def metrics(results, task="ma_pydoc_cloze"):
    found = results["results"][task]
    return {name: found[name] for name in ("acc,none", "perplexity,none")}


def test_hf_model_loads_the_converted_folder_and_runs_the_task_from_another_cwd(lm_eval, tasks, folders, tmp_path,
                                                                                monkeypatch):
    from lm_eval.models.huggingface import HFLM

    monkeypatch.chdir(tmp_path)  # the task's data file is found wherever lm-eval runs
    # What `--model hf --model_args pretrained=...,trust_remote_code=True` builds:
    lm = HFLM(pretrained=str(folders["converted"]), trust_remote_code=True, dtype="float32", device="cpu",
              batch_size=4)
    assert lm.model.config.model_type == "ma_llama"
    meta = [m for m in lm.model.modules() if type(m).__name__ == "MetaAttention"]
    assert len(meta) == 2 and all(m.routing_mode == "soft" for m in meta)  # a fresh conversion routes softly
    from_instance = lm_eval.simple_evaluate(model=lm, tasks=["ma_pydoc_cloze", "ma_pydoc_ppl"],
                                            task_manager=tasks, limit=LIMIT)
    # ...and the same through the model name and argument string, as the command line passes them.
    results = lm_eval.simple_evaluate(
        model="hf", model_args=hf_args(folders["converted"], trust_remote_code=True), tasks=["ma_pydoc_cloze"],
        task_manager=tasks, limit=LIMIT, device="cpu", batch_size=4,
    )
    got = metrics(results)
    assert 0.0 <= got["acc,none"] <= 1.0 and math.isfinite(got["perplexity,none"]) and got["perplexity,none"] > 1
    assert got == metrics(from_instance)
    rolling = from_instance["results"]["ma_pydoc_ppl"]
    assert math.isfinite(rolling["word_perplexity,none"]) and rolling["bits_per_byte,none"] > 0
    assert results["n-samples"]["ma_pydoc_cloze"]["effective"] == LIMIT


def test_forced_full_gives_the_original_models_numbers(lm_eval, tasks, folders):
    original = lm_eval.simple_evaluate(model="hf", model_args=hf_args(folders["original"]), tasks=["ma_pydoc_cloze"],
                                       task_manager=tasks, limit=LIMIT, device="cpu", batch_size=4, log_samples=True)
    full = evaluate(folders["converted"], routing="full", limit=LIMIT, log_samples=True)
    routed = evaluate(folders["converted"], limit=LIMIT, log_samples=True)  # as saved: soft, untrained routers

    def loglikelihoods(results):
        return [s["resps"][0][0][0] for s in results["samples"]["ma_pydoc_cloze"]]

    assert loglikelihoods(full) == pytest.approx(loglikelihoods(original), abs=1e-5)  # in practice bit-identical
    assert metrics(full) == pytest.approx(metrics(original), abs=1e-5)
    # The saved (soft) routing mixes in the cheap experts: the numbers move (a little: the tiny random
    # model's outputs are nearly uniform whatever its attention does).
    assert max(abs(a - b) for a, b in zip(loglikelihoods(routed), loglikelihoods(original))) > 1e-4


def test_saved_routing_is_what_lm_eval_loads(lm_eval, folders, tmp_path):
    import shutil

    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / "hard"
    shutil.copytree(folders["converted"], folder)
    policy = set_saved_routing(folder, "hard", dense_below=0)
    assert policy["mode"] == "hard" and policy["dense_below"] == 0
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", device="cpu", batch_size=4)
    meta = [m for m in lm.model.modules() if type(m).__name__ == "MetaAttention"]
    assert meta and all(m.routing_mode == "hard" and m.dense_below == 0 for m in meta)
    set_saved_routing(folder, "auto", uncertainty_threshold=0.5)
    assert json.loads((folder / "config.json").read_text())["meta_attention"]["policy"]["dense_below"] == 0
    with pytest.raises(ValueError, match="uncertainty_threshold"):
        set_saved_routing(folder, "auto")
    with pytest.raises(ValueError, match="forced full"):
        set_saved_routing(folder, "full")
    with pytest.raises(ValueError, match="dense_below"):
        set_saved_routing(folder, "hard", dense_below=-1)


def test_routing_for_eval_restores_the_model():
    case = next(c for c in all_cases() if c.name == "llama-gqa")
    model = convert(case.make("sdpa"))
    modules = meta_attention_modules(model)

    def state():
        return [(m.policy, id(m.cfg), m.forced_expert) for m in modules]

    before = state()
    with routing_for_eval(model, "full", dense_below=0):
        assert all(m.forced_expert == m.full_index and m.dense_below == 0 for m in modules)
    with routing_for_eval(model, "auto", uncertainty_threshold=0.3):
        assert all(m.routing_mode == "auto" and m.uncertainty_threshold == 0.3 for m in modules)
    assert state() == before
    with pytest.raises(ValueError, match="routing"), routing_for_eval(model, "fast"):
        pass


def readme_command() -> tuple[dict, list[str]]:
    """(environment assignments, argv) of the lm_eval command in the lm-eval section of docs/integrations.md."""
    section = re.search(r"## Evaluating with lm-evaluation-harness\n(.*?)(?:\n## |\Z)", (ROOT / "docs" / "integrations.md").read_text(),
                        flags=re.S).group(1)
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    line = next(line for line in block.splitlines() if "lm_eval --model" in line)
    words = shlex.split(line.split(" #")[0])
    env = {}
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def test_readme_command_runs_from_another_directory_without_ma_convert(lm_eval, folders, tmp_path):
    env, args = readme_command()
    assert args[0] == "lm_eval" and "--include_path" in args and "--limit" in args
    folder = str(folders["converted"])
    args = [a.replace("out/", folder + "/").replace("$TASKS", str(TASKS_DIR)) for a in args[1:]]
    args[args.index("--limit") + 1] = "4"
    env = dict(os.environ, **env, OMP_NUM_THREADS="1")
    # `python -m lm_eval ARGS` in a fresh interpreter where ma_convert cannot be imported: the folder's
    # remote code alone serves lm-eval, as it would on a machine without the package.
    script = "import runpy, sys; sys.modules['ma_convert'] = None; runpy.run_module('lm_eval', run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout
    for task in ("ma_pydoc_cloze", "ma_pydoc_ppl"):
        assert task in table, table
    assert re.search(r"\|perplexity\s*\|", table), table
