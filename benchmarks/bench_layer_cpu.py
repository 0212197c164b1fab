"""Hard-routed Meta-Attention layer vs the same layer forced to full attention, measured in one run.

Default: T=4096, d_model=512, 8 heads, W=256, a fixed 25% full / 25% linear / 50% local mix of
randomly placed tokens, batch 1, inference (eval, no_grad). Prints medians and their ratio.

    python benchmarks/bench_layer_cpu.py [--seq-len 4096] [--repeats 7] [--write benchmarks/results/layer_cpu.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import ma_convert
from ma_convert import MetaAttentionLayer, MetaAttnConfig, force_expert


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, run round-robin so drift on a shared machine hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fixed_mix(seq_len: int, fractions: list[float], generator: torch.Generator) -> torch.Tensor:
    """(1, T) expert indices with exactly the given fractions, at random positions."""
    counts = [round(f * seq_len) for f in fractions]
    counts[-1] = seq_len - sum(counts[:-1])
    routes = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    return routes[torch.randperm(seq_len, generator=generator)].unsqueeze(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--mix", default="0.25,0.25,0.50", help="fractions full,linear,local")
    parser.add_argument("--feature-map", default="hedgehog", choices=["hedgehog", "elu"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", default=None, help="append a markdown result block to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = MetaAttnConfig(
        d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads, window_size=args.window,
        feature_map=args.feature_map, max_positions=max(args.seq_len, 4096),
    )
    layer = MetaAttentionLayer(cfg).eval()
    x = torch.randn(1, args.seq_len, args.d_model)
    mix = [float(f) for f in args.mix.split(",")]
    routes = fixed_mix(args.seq_len, mix, torch.Generator().manual_seed(0))
    positions = torch.arange(args.seq_len)

    def run(expert):
        with torch.no_grad(), force_expert(layer, expert):
            layer(x)

    # Attention alone (the experts on shared heads), without the projections both paths share.
    with torch.no_grad():
        b, t_len = x.shape[:2]
        q = layer.q_proj(x).view(b, t_len, cfg.n_heads, -1).transpose(1, 2)
        k = layer.k_proj(x).view(b, t_len, cfg.kv_heads, -1).transpose(1, 2)
        v = layer.v_proj(x).view(b, t_len, cfg.kv_heads, -1).transpose(1, 2)
    full_weights = F.one_hot(torch.zeros_like(routes), 3).float()
    mix_weights = F.one_hot(routes, 3).float()

    with torch.no_grad():
        t = interleaved_medians(
            {
                "attn_full": lambda: layer.meta.run_experts(q, k, v, full_weights),
                "attn_routed": lambda: layer.meta.run_experts(q, k, v, mix_weights),
                "full": lambda: run("full"),
                "routed": lambda: run(routes),
                "router": lambda: layer.meta.router(x, positions),
                "linear": lambda: run("linear"),
                "local": lambda: run("local"),
            },
            args.repeats,
        )
    t_full, t_routed, t_router = t["full"], t["routed"], t["router"]
    per_expert = {"linear": t["linear"], "local": t["local"]}

    ratio = (t_routed + t_router) / t_full
    lines = [
        f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, ma-convert {ma_convert.__version__}",
        f"T={args.seq_len} d_model={args.d_model} heads={args.heads}/{args.kv_heads} W={args.window} "
        f"mix full/linear/local={args.mix} feature_map={args.feature_map} batch=1, medians of {args.repeats}",
        "",
        "| layer forward | median ms | vs full-only |",
        "|---|---|---|",
        f"| full-only (forced) | {t_full * 1e3:.1f} | 1.00 |",
        f"| routed, experts (forced mix) | {t_routed * 1e3:.1f} | {t_routed / t_full:.2f} |",
        f"| router MLP | {t_router * 1e3:.1f} | {t_router / t_full:.2f} |",
        f"| **routed total (experts + router)** | **{(t_routed + t_router) * 1e3:.1f}** | **{ratio:.2f}** |",
        f"| attention only: full expert, all tokens | {t['attn_full'] * 1e3:.1f} | {t['attn_full'] / t_full:.2f} |",
        f"| attention only: routed mix | {t['attn_routed'] * 1e3:.1f} | {t['attn_routed'] / t_full:.2f} "
        f"(routed/full attention = **{t['attn_routed'] / t['attn_full']:.2f}**) |",
        f"| all tokens linear (forced) | {per_expert['linear'] * 1e3:.1f} | {per_expert['linear'] / t_full:.2f} |",
        f"| all tokens local (forced) | {per_expert['local'] * 1e3:.1f} | {per_expert['local'] / t_full:.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n```\npython benchmarks/bench_layer_cpu.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "write"
            ) + "\n```\n\n" + text + "\n")


if __name__ == "__main__":
    main()
