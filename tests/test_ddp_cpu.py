"""Two CPU processes (torchrun, gloo) against one, at the same global batch and seed: the same losses
and the same trained weights, with and without gradient accumulation (the multi-GPU check of
benchmarks/ddp/, in CI's minutes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny_models import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, source: Path, name: str, processes: int, batch: int, accum: int) -> Path:
    out = tmp_path / name
    recipe = {
        "output_dir": str(out),
        # No posterior samples and no Gumbel noise: each process draws its own, so only deterministic
        # routing can match one process bit for bit.
        "model": {"source": str(source), "meta_attention": {"window_size": 8}},
        "data": {"source": "pydoc", "seq_len": 32, "max_train_tokens": 4096, "max_eval_tokens": 256},
        "training": {"steps": 4, "batch_size": batch, "grad_accum": accum, "eval_every": 4, "save_every": 5,
                     "sample_posterior": False,
                     "warmup_steps": 1, "transfer_steps": 1, "hard_switch": "never", "log_with": None, "seed": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(29500 + processes * 10 + accum)]
    done = subprocess.run([*launcher, str(ROOT / "recipes" / "router_finetune.py"), "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
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
