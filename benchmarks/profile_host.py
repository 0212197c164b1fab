"""Where a routed SmolLM2 step spends its host time: per-step wall time of decode and prefill, the
original against the learned hybrid mix (as `bench_real.py` builds it), with Triton's own launcher
and with `ma_convert.kernels.launch`'s direct one; a cProfile of each; the cost of one launch.

    python benchmarks/profile_host.py --base /tmp/g/smol.gguf --out-dir /tmp/out
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import bench_real  # noqa: E402
from _common import environment, environment_markdown, log  # noqa: E402

from ma_convert import RoutingPolicy, convert, set_routing_mode  # noqa: E402
from ma_convert.kernels import launch  # noqa: E402


def set_direct(flag: bool) -> None:
    for runner in launch._launchers.values():
        runner.direct = flag


def step_times(calls: dict, repeats: int) -> dict:
    """Median ms per call, the calls alternating; each call synchronised."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def decoder(model, ids):
    """A decode step on a cache of `ids` (each step adds one key and passes the attention mask, as
    `generate` does: without one, SDPA's cuDNN backend builds a new graph for every length)."""
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    token = ids[:, -1:]
    mask = torch.ones(1, ids.shape[1] + 4096, dtype=torch.long, device=ids.device)

    def step():
        with torch.no_grad():
            model(token, past_key_values=cache, use_cache=True, attention_mask=mask[:, :cache.get_seq_length() + 1])
    return step


def profiled(fn, n: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def launch_cost(n: int = 3000) -> dict:
    """Host µs of one small launch: Triton's launcher, the direct one, and a torch op."""
    from ma_convert.kernels import triton_decode

    k = torch.randn(1, 3, 1, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 64, 64, device="cuda", dtype=torch.bfloat16)
    s = torch.zeros(1, 3, 128, 64, device="cuda"), torch.zeros(1, 3, 128, device="cuda")
    out = {}
    for name, flag in (("triton launcher", False), ("direct", True)):
        triton_decode.advance_state(w, k, k, s)
        set_direct(flag)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            triton_decode.advance_state(w, k, k, s)
        torch.cuda.synchronize()
        out[f"advance_state, {name}"] = round((time.perf_counter() - start) / n * 1e6, 2)
    start = time.perf_counter()
    for _ in range(n):
        torch.add(k, k)
    torch.cuda.synchronize()
    out["torch.add"] = round((time.perf_counter() - start) / n * 1e6, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out-dir", type=Path, default=Path("."))
    args = p.parse_args(argv)
    args.device, args.dtype, args.model = torch.device("cuda"), torch.bfloat16, None
    original, tokenizer, _ = bench_real.load_smollm2(args)
    ids = bench_real.prompt_ids(tokenizer, args.length, args.device)
    import copy

    mix = convert(copy.deepcopy(original), window_size=512, linear_window=64,
                  policy=RoutingPolicy(dense_below=0)).eval()
    set_routing_mode(mix, "hard")
    bench_real.calibrate_mix(mix, ids, bench_real.LEARNED_MIX)
    report = {"launch_us": launch_cost()}
    log(f"launch cost: {report['launch_us']}")
    steps = {"original": decoder(original, ids), "mix": decoder(mix, ids)}

    def mix_with(flag):
        def run():
            set_direct(flag)
            steps["mix"]()
        return run

    def prefill(model):
        def run():
            with torch.no_grad():
                model(ids, logits_to_keep=1)
        return run

    set_direct(True)
    for fn in list(steps.values()) * 3:
        fn()
    report["decode_ms"] = step_times({"original": steps["original"], "mix, triton launcher": mix_with(False),
                                      "mix, direct": mix_with(True)}, args.repeats)
    log(f"decode step at {args.length}: {report['decode_ms']}")
    pre_mix = prefill(mix)
    report["prefill_ms"] = step_times({"original": prefill(original),
                                       "mix, triton launcher": lambda: (set_direct(False), pre_mix()),
                                       "mix, direct": lambda: (set_direct(True), pre_mix())}, max(5, args.repeats // 3))
    log(f"prefill at {args.length}: {report['prefill_ms']}")
    set_direct(True)
    texts = {
        "decode, original": profiled(steps["original"], 20, 25),
        "decode, mix (direct)": profiled(steps["mix"], 20, 45),
        "prefill, mix (direct)": profiled(pre_mix, 5, 35),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args.device, "benchmarks/profile_host.py", sys.argv[1:] if argv is None else argv)
    with open(args.out_dir / "profile_host.md", "w") as f:
        f.write(f"# Host time of a routed SmolLM2 step\n\n{environment_markdown(env)}\n\n"
                f"Medians of alternated calls (ms; launch: µs per call).\n\n```\n{report}\n```\n")
        for name, text in texts.items():
            f.write(f"\n## cProfile: {name}\n\n```\n{text}```\n")
    log(str(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
