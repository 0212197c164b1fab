"""Helpers shared by the benchmarks: timing, the environment record, guarded runs, result files."""

from __future__ import annotations

import json
import platform
import re
import shlex
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- devices
def pick_device(name: str) -> torch.device:
    """"auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def device_tag(device: torch.device) -> str:
    """A file-name-safe tag: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def free_memory(device: torch.device) -> None:
    """Release cached blocks after a failure or a big measurement, so the next one starts clean."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> Timing:
    """Median and min of `repeats` calls after `warmup` calls.

    CUDA: one pair of events per call, read after a single synchronize at the end, so the
    timing loop itself adds no host syncs (the code under test may still sync). CPU: perf_counter.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), min(times), repeats)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float32 (NaN if either has a NaN)."""
    got, ref = got.float(), ref.float()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------- guarded runs
def guarded(label: str, fn: Callable[[], Any], device: torch.device) -> tuple[Any, str | None]:
    """Run `fn`; on any error print it and return (None, short description) instead of raising,
    so one OOM or unsupported path does not end the whole benchmark."""
    try:
        return fn(), None
    except torch.OutOfMemoryError as error:
        message = f"OOM: {str(error).splitlines()[0][:200]}"
    except Exception as error:  # noqa: BLE001 - reported and recorded, the run goes on
        first_line = (str(error).splitlines() or [""])[0]
        message = f"{type(error).__name__}: {first_line[:300]}"
        traceback.print_exc(limit=3)
    print(f"  !! {label}: {message}", flush=True)
    free_memory(device)
    return None, message


# ---------------------------------------------------------------------- environment
def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def environment(device: torch.device, script: str, argv: list[str]) -> dict:
    """Everything needed to tell two result files apart: machine, versions, date, command line."""
    try:
        import ma_convert

        ma_version = ma_convert.__version__
    except ImportError:
        ma_version = None
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join([script, *argv]),
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton", "pytorch-triton"),
        "fla": _version("fla-core", "flash-linear-attention"),
        "ma_convert": ma_version,
        "git_commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def environment_markdown(env: dict) -> str:
    keys = ["date", "device", "torch", "transformers", "triton", "fla", "ma_convert", "git_commit", "cuda", "python"]
    lines = [f"- {k}: {env[k]}" for k in keys if k in env]
    return "\n".join(lines) + f"\n\n```\n{env['command']}\n```\n"


# ---------------------------------------------------------------------- output
def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def write_results(out_dir: Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.json` under `out_dir` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md_path.write_text(markdown)
    # A NaN error stays NaN (Python's JSON extension) rather than vanishing: a broken run should show.
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {md_path} and {json_path}", flush=True)
    return md_path, json_path


def parse_mix(text: str) -> list[float]:
    """"0.25,0.25,0.50" -> fractions of full, linear, local (normalised)."""
    values = [float(v) for v in text.split(",")]
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"--mix needs three non-negative fractions full,linear,local; got {text!r}")
    total = sum(values)
    return [v / total for v in values]


def fixed_routes(n: int, fractions: list[float], generator: torch.Generator) -> torch.Tensor:
    """(n,) expert indices with exactly the given fractions, placed by a seeded random permutation,
    so each expert's tokens (or rows) are spread over the sequence (or the batch)."""
    counts = [round(f * n) for f in fractions]
    counts[-1] = n - sum(counts[:-1])
    routes = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    return routes[torch.randperm(n, generator=generator)]


def log(message: str) -> None:
    print(message, flush=True)
