"""Two CPU processes (torchrun, gloo) against one, at the same global batch and seed: the same losses
and the same trained weights, with and without gradient accumulation; and two processes killed after a
checkpoint and resumed against an uninterrupted two-process run (the multi-GPU checks of
benchmarks/ddp/, in CI's minutes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, source: Path, name: str, processes: int, batch: int, accum: int, steps: int = 4,
           port: int = 0, extra=()) -> tuple[list[str], dict, Path]:
    """The torchrun command, environment and output folder of one run of a tiny recipe."""
    out = tmp_path / name
    recipe = {
        "output_dir": str(out),
        # No posterior samples and no Gumbel noise: each process draws its own, so only deterministic
        # routing can match one process bit for bit.
        "model": {"source": str(source), "meta_attention": {"window_size": 8}},
        "data": {"source": "pydoc", "seq_len": 32, "max_train_tokens": 4096, "max_eval_tokens": 256},
        "training": {"steps": steps, "batch_size": batch, "grad_accum": accum, "eval_every": 4, "save_every": 5,
                     "sample_posterior": False,
                     "warmup_steps": 1, "transfer_steps": 1, "hard_switch": "never", "log_with": None, "seed": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(port or 29500 + processes * 10 + accum)]
    return [*launcher, str(ROOT / "recipes" / "router_finetune.py"), "--config", str(path), *extra], env, out


def run(tmp_path: Path, source: Path, name: str, processes: int, batch: int, accum: int, **kwargs) -> Path:
    command, env, out = launch(tmp_path, source, name, processes, batch, accum, **kwargs)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_as_one(tmp_path, accum):
    import json

    source = save_tiny_llama(tmp_path / "source")
    one = run(tmp_path, source, f"one-{accum}", processes=1, batch=2, accum=accum)
    two = run(tmp_path, source, f"two-{accum}", processes=2, batch=1, accum=accum)
    losses = [[r["loss"] for r in json.loads((o / "results.json").read_text())["history"]] for o in (one, two)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    weights = [load_file(o / "model" / "model.safetensors") for o in (one, two)]
    trained = [k for k in weights[0] if ".meta." in k]
    gaps = {k: (weights[0][k] - weights[1][k]).abs().max().item() for k in trained}
    assert trained and max(gaps.values()) < 1e-4


def test_two_processes_killed_and_resumed_train_as_if_uninterrupted(tmp_path):
    """DDP's kill and resume: SIGKILL both processes once a checkpoint exists, resume, and the trained
    weights equal an uninterrupted two-process run's bit for bit."""
    import signal
    import time

    source = save_tiny_llama(tmp_path / "source")
    whole = run(tmp_path, source, "whole", processes=2, batch=1, accum=1, steps=30, port=29611)
    command, env, out = launch(tmp_path, source, "killed", processes=2, batch=1, accum=1, steps=30, port=29622)
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-000010").is_dir() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "model").exists(), "the run ended before it could be killed"
    run(tmp_path, source, "killed", processes=2, batch=1, accum=1, steps=30, port=29633, extra=("--resume",))
    weights = [load_file(o / "model" / "model.safetensors") for o in (whole, out)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
