"""GPU time against wall time of a SmolLM2 prefill: the original against the learned hybrid mix (as
`bench_real.py` builds it); with `--billion`, of bench_real.py's 1.1B shape, the mix as fixed routes.
Per length: the eager wall time (the two alternating), the summed time of the GPU kernels of one
forward (torch.profiler), and the largest kernels. Where the wall time is well above the kernel time,
the step waits on the host; where the mix's kernel time is above the original's, no host work
removed (CUDA graphs, torch.compile) would make it faster.

    python benchmarks/profile_device.py --base /tmp/g/smol.gguf --out-dir /tmp/out
    python benchmarks/profile_device.py --shape-only    # SmolLM2's shape with random weights (no GGUF)
    python benchmarks/profile_device.py --billion --lengths 32768   # bench_real.py's 1.1B shape
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import bench_real  # noqa: E402
from _common import environment, environment_markdown, log, markdown_table, pick_device, write_results  # noqa: E402

from ma_convert import RoutingPolicy, convert, force_expert, set_routing_mode  # noqa: E402

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the SmolLM2 GGUF (default: the embedded one)")
    p.add_argument("--shape-only", action="store_true", help="SmolLM2's shape with random weights")
    p.add_argument("--billion", action="store_true", help="bench_real.py's 1.1B shape, the mix as fixed routes")
    p.add_argument("--lengths", type=int, nargs="*", default=[2048, 8064])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", type=Path, default=bench_real.RESULTS_DIR)
    p.add_argument("--tag")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


def models(args):
    """(original, learned hybrid mix, prompt ids of the longest length, the mix's fixed routes or None)."""
    if args.billion:
        shape, original, mix = bench_real.billion_models(args.device, args.dtype, small=False)
        ids, routes = bench_real.billion_inputs(shape, max(args.lengths), torch.Generator().manual_seed(1), args.device)
        return original, mix, ids, routes
    if args.shape_only:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        original = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(args.device, args.dtype).eval()
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, max(args.lengths)), device=args.device)
    else:
        original, tokenizer, _ = bench_real.load_smollm2(args)
        ids = bench_real.prompt_ids(tokenizer, max(args.lengths), args.device)
    mix = convert(copy.deepcopy(original), window_size=512, linear_window=64,
                  policy=RoutingPolicy(dense_below=0)).eval()
    set_routing_mode(mix, "hard")
    bench_real.calibrate_mix(mix, ids, bench_real.LEARNED_MIX)
    return original, mix, ids, None


def kernel_time(fn, device) -> tuple[float, list]:
    """GPU ms of one call, summed over its kernels, and its eight largest kernels (name, count, ms)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    top = [[e.key[:48], e.count, round(e.self_device_time_total / 1e3, 2)] for e in kernels[:8]]
    return round(sum(e.self_device_time_total for e in kernels) / 1e3, 2), top


def measure(args) -> list[dict]:
    original, mix, ids, routes = models(args)
    rows = []
    for length in args.lengths:
        x = ids[:, :length]
        fixed = routes[:, :length] if routes is not None else None

        def converted():
            with force_expert(mix, fixed) if fixed is not None else contextlib.nullcontext():
                mix(x, use_cache=False, logits_to_keep=1)

        calls = {"original": lambda: original(x, use_cache=False, logits_to_keep=1), "converted": converted}
        with torch.no_grad():
            wall = bench_real.alternate(calls, args.device, args.repeats)
            gpu = {name: kernel_time(fn, args.device) for name, fn in calls.items()}
        row = {"length": length, "wall_ms": wall, "kernel_ms": {n: g[0] for n, g in gpu.items()},
               "top_kernels": {n: g[1] for n, g in gpu.items()}}
        rows.append(row)
        log(f"  {length}: wall {bench_real.ratio(wall)}; kernels {row['kernel_ms']['original']} -> "
            f"{row['kernel_ms']['converted']} ms")
    return rows


def render(rows, env, billion: bool = False) -> str:
    table = markdown_table(
        ["T", "wall orig", "wall mix", "wall ratio", "kernels orig", "kernels mix", "kernel ratio"],
        [[r["length"], round(r["wall_ms"]["original"], 1), round(r["wall_ms"]["converted"], 1),
          f"**{r['wall_ms']['converted'] / r['wall_ms']['original']:.2f}**", r["kernel_ms"]["original"],
          r["kernel_ms"]["converted"], f"**{r['kernel_ms']['converted'] / r['kernel_ms']['original']:.2f}**"]
         for r in rows])
    tops = "\n".join(f"- {r['length']}, {name}: {r['top_kernels'][name]}" for r in rows for name in r["top_kernels"])
    model = "1.1B LLaMA shape (random weights), the mix as fixed routes" if billion else "SmolLM2"
    return (f"# {model} prefill: wall time against GPU kernel time\n\n{environment_markdown(env)}\n\n"
            f"Learned hybrid mix (11% full / 76% hybrid W=64 / 13% local W=512), bf16, batch 1, "
            f"`logits_to_keep=1`; wall: medians of alternated calls (ms); kernels: the GPU time of one "
            f"forward summed over its kernels (ms).\n\n{table}\n\nLargest kernels (name, count, ms):\n\n{tops}\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.type != "cuda":
        raise SystemExit("profile_device.py measures GPU kernel time: it needs CUDA")
    env = environment(args.device, "benchmarks/profile_device.py", sys.argv[1:] if argv is None else argv)
    rows = measure(args)
    tag = args.tag or ("nvidia-h200-1b" if args.billion else "nvidia-h200-shape" if args.shape_only else "nvidia-h200")
    write_results(args.out_dir, f"profile_device_{tag}", render(rows, env, args.billion), {"env": env, "rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
