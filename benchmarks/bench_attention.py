"""Attention only: hard-routed Meta-Attention vs causal SDPA on one layer's projected heads.

q, k, v are given (no projections, no router): batch 1, Hq/Hkv heads of size d, a fixed mix of
25% full / 25% linear / 50% local tokens placed by a seeded random permutation. For each T, in the
same run: the SDPA baseline `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`,
and `MetaAttention.run_experts` with forced per-token routes for every backend in --backends
(`RoutingPolicy.backend`; one that fails to build or to run is reported, not fatal).

Before timing, each backend's routed output is checked against the torch reference backend (and,
routed all-full, against SDPA). Writes benchmarks/results/attention_<device>.{md,json,png}.

    python benchmarks/bench_attention.py                       # CUDA: T=4k..64k, 32/8 heads, d=128, bf16, W=1024
    python benchmarks/bench_attention.py --device cpu          # CPU: T=1k..4k, 8/2 heads, d=64, fp32, W=256
    python benchmarks/bench_attention.py --seq-lens 32768 --backends auto torch --single-expert
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# _common beside this file, and the ma_convert of this checkout rather than whichever is installed.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import (
    RESULTS_DIR,
    device_tag,
    environment,
    environment_markdown,
    fixed_routes,
    fmt_ms,
    free_memory,
    guarded,
    log,
    markdown_table,
    parse_mix,
    pick_device,
    rel_error,
    time_fn,
    write_results,
)

from ma_convert import MetaAttention, MetaAttnConfig, RoutingPolicy

EXPERTS = ("full", "linear", "local")  # MetaAttention's default expert order: route index = position here
TOLERANCE = 1e-2

# Defaults that depend on the device: the GPU figures of the design notes, and what a 2-core CPU manages.
CUDA_DEFAULTS = dict(seq_lens=[4096, 16384, 32768, 65536], heads=32, kv_heads=8, head_dim=128, window=1024,
                     backends=["auto", "auto-routed", "torch"], dtype="bfloat16")
CPU_DEFAULTS = dict(seq_lens=[1024, 2048, 4096], heads=8, kv_heads=2, head_dim=64, window=256,
                    backends=["torch"], dtype="float32")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", help="default: 4096 16384 32768 65536 (CUDA), 1024 2048 4096 (CPU)")
    p.add_argument("--heads", type=int, help="query heads (default 32 CUDA, 8 CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default 8 CUDA, 2 CPU)")
    p.add_argument("--head-dim", type=int, help="default 128 CUDA, 64 CPU")
    p.add_argument("--window", type=int, help="local expert window (default 1024 CUDA, 256 CPU)")
    p.add_argument("--backends", nargs="+",
                   help="RoutingPolicy.backend values (default: auto auto-routed torch on CUDA, torch on CPU)")
    p.add_argument("--dtype", help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--mix", default="0.25,0.25,0.50", help="token fractions full,linear,local")
    p.add_argument("--feature-map", default="hedgehog", choices=["hedgehog", "elu"])
    p.add_argument("--linear-window", type=int, default=0,
                   help="the kernel expert as the hybrid with this exact window (0: pure linear)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-ref-above", type=int, default=32768, help="no torch-reference check for longer T")
    p.add_argument("--single-expert", action="store_true",
                   help="also time every token forced to one expert, for each expert and backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", help="file-name tag (default: the device, e.g. nvidia-h100-80gb-hbm3 or cpu)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    for key, value in (CUDA_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = getattr(torch, args.dtype)
    args.fractions = parse_mix(args.mix)
    return args


def build_meta(args, backend: str, max_t: int) -> MetaAttention:
    """One layer's MetaAttention for `backend`, hard routing, eval, on the device and dtype."""
    # "<backend>-routed": the same backend with dense_below=0, so short prompts are routed too
    # instead of running all-full (the fast path's short-prompt fallback).
    routed_always = backend.endswith("-routed")
    cfg = MetaAttnConfig(
        d_model=args.heads * args.head_dim, n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
        window_size=args.window, feature_map=args.feature_map, max_positions=max_t, linear_window=args.linear_window,
    )
    policy = RoutingPolicy(mode="hard", backend=backend.removesuffix("-routed"),
                           dense_below=0 if routed_always else None)
    return MetaAttention(cfg, policy=policy).to(args.device, args.dtype).eval()


def runs_all_full(meta: MetaAttention, t: int, device) -> bool:
    """Whether the GPU fast path runs this prompt all-full (shorter than its dense_below): its
    expected output is then SDPA's, not the routed reference's."""
    from ma_convert.kernels.backends import resolve_backend

    try:
        backend = resolve_backend(meta.backend, torch.device(device))
    except Exception:  # noqa: BLE001 - an unavailable backend is reported elsewhere
        return False
    if backend in ("torch", "sdpa"):
        return False
    from ma_convert.core.meta_attention import dense_below_keys

    return t < dense_below_keys(meta.dense_below)


def warn(message: str) -> None:
    bar = "!" * 78
    log(f"\n{bar}\n!! WARNING: {message}\n{bar}\n")


@dataclass
class Backend:
    """One RoutingPolicy.backend under test, and what happened to it so far."""

    name: str
    meta: MetaAttention | None = None
    status: str = "ok"  # ok | unavailable (never ran) ; per-T failures are recorded per row
    error: str | None = None
    ran: bool = False


def measure_length(t: int, args, backends: list[Backend], reference: MetaAttention) -> dict:
    """Check and time SDPA and every available backend at sequence length t."""
    device, dtype = args.device, args.dtype
    gen = torch.Generator().manual_seed(args.seed + t)
    q = torch.randn(1, args.heads, t, args.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(1, args.kv_heads, t, args.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(1, args.kv_heads, t, args.head_dim, generator=gen).to(device, dtype)
    routes = fixed_routes(t, args.fractions, gen).unsqueeze(0).to(device)  # (1, T)
    weights = F.one_hot(routes, len(EXPERTS)).float()  # (1, T, K), what MetaAttention.route gives
    full_weights = F.one_hot(torch.zeros_like(routes), len(EXPERTS)).float()
    counts = {name: int((routes == i).sum()) for i, name in enumerate(EXPERTS)}
    row = {"T": t, "tokens_per_expert": counts, "backends": {}}
    log(f"\nT={t}: tokens per expert {counts}")

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def routed(meta):
        if runs_all_full(meta, t, device):  # what a routed call of a user's model runs below dense_below
            meta.forced_expert = meta.full_index
            return meta.run_experts(q, k, v, full_weights)
        meta.forced_expert = routes
        return meta.run_experts(q, k, v, weights)

    def all_full(meta):
        # Per-token zeros rather than the int 0: an int "full" takes the plain SDPA call in every
        # backend, this goes through the backend's own routed path.
        meta.forced_expert = torch.zeros_like(routes)
        return meta.run_experts(q, k, v, full_weights)

    with torch.no_grad():
        sdpa_out, _ = guarded(f"SDPA T={t}", sdpa, device)
        ref = None
        if t <= args.skip_ref_above:
            ref, ref_error = guarded(f"torch reference T={t}", lambda: routed(reference), device)
            if ref_error:
                warn(f"T={t}: the torch reference failed ({ref_error}); no correctness check at this length")
        else:
            log(f"  (T={t} > --skip-ref-above {args.skip_ref_above}: no torch-reference check)")

        # Correctness first: a backend that computes the wrong thing is reported before it is timed.
        for b in backends:
            entry = row["backends"][b.name] = {"status": b.status}
            if b.status != "ok":
                continue
            out, error = guarded(f"{b.name} T={t}", lambda meta=b.meta: routed(meta), device)
            if error:
                if failure_status(error, b.ran) == "unavailable":  # failed on its first call: cannot run here
                    b.status, b.error = "unavailable", error
                entry.update(status=failure_status(error, b.ran), error=error)
                continue
            b.ran = True
            finite = bool(torch.isfinite(out).all())
            expected = sdpa_out if runs_all_full(b.meta, t, device) else ref
            err = rel_error(out, expected) if expected is not None and b.meta is not reference else None
            entry.update(finite=finite, rel_err_vs_torch=err)
            del out
            if sdpa_out is not None:
                full, full_error = guarded(f"{b.name} all-full T={t}", lambda meta=b.meta: all_full(meta), device)
                entry["all_full_rel_err_vs_sdpa"] = None if full_error else rel_error(full, sdpa_out)
                del full
            shown = "(is the reference)" if b.meta is reference else ("skipped" if err is None else f"{err:.2e}")
            log(f"  {b.name}: routed vs torch reference rel err {shown}; all-full vs SDPA "
                f"{entry.get('all_full_rel_err_vs_sdpa')}")
            if not finite or (err is not None and not err <= TOLERANCE):  # `not <=` also catches NaN
                warn(f"backend {b.name!r} at T={t}: routed output finite={finite}, rel err vs the torch "
                     f"reference {err} (tolerance {TOLERANCE})")
        del ref, sdpa_out
        free_memory(device)

        timing, error = guarded(f"time SDPA T={t}", lambda: time_fn(sdpa, device, warmup=args.warmup, repeats=args.repeats), device)
        row["sdpa"] = timing.to_dict() if timing else {"error": error}
        base = timing.median_ms if timing else None
        log(f"  SDPA: {fmt_ms(base)} ms")
        for b in backends:
            entry = row["backends"][b.name]
            if entry["status"] != "ok":
                continue
            timing, error = guarded(
                f"time {b.name} T={t}",
                lambda meta=b.meta: time_fn(lambda: routed(meta), device, warmup=args.warmup, repeats=args.repeats),
                device,
            )
            if error:
                entry.update(status=failure_status(error, True), error=error)
                continue
            entry.update(timing.to_dict(), ratio_vs_sdpa=timing.median_ms / base if base else None)
            ratio = entry["ratio_vs_sdpa"]
            log(f"  {b.name}: {fmt_ms(timing.median_ms)} ms (min {fmt_ms(timing.min_ms)}), routed/SDPA "
                f"{'-' if ratio is None else f'{ratio:.3f}'}")
            if args.single_expert:
                entry["single_expert_ms"] = single_expert_times(b.meta, q, k, v, routes, args, f"{b.name} T={t}")
    for b in backends:
        if b.meta is not None:
            b.meta.forced_expert = None
    return row


def failure_status(error: str, ran_before: bool) -> str:
    if error.startswith("OOM"):
        return "OOM"
    return "error" if ran_before else "unavailable"


def single_expert_times(meta, q, k, v, routes, args, label) -> dict:
    """Every token forced to one expert (a per-token tensor, so the fast path takes it too), per expert.

    An expert cannot be timed alone on its share of a mixed routing through `run_experts` (every
    token goes somewhere), so this gives each expert's cost on all T tokens instead.
    """
    times = {}
    for i, name in enumerate(EXPERTS):
        same = torch.full_like(routes, i)
        w = F.one_hot(same, len(EXPERTS)).float()

        def call(same=same, w=w):
            meta.forced_expert = same
            return meta.run_experts(q, k, v, w)

        timing, error = guarded(f"{label} all {name}", lambda: time_fn(call, args.device, warmup=args.warmup,
                                                                        repeats=args.repeats), args.device)
        times[name] = timing.median_ms if timing else error
        log(f"    all tokens {name}: {fmt_ms(timing.median_ms) if timing else error} ms")
    meta.forced_expert = routes
    return times


def cell(entry: dict, key: str) -> str:
    if entry.get("status") != "ok":
        return entry.get("status", "-")
    value = entry.get(key)
    if value is None:
        return "-"
    return fmt_ms(value) if key.endswith("ms") else f"{value:.3f}"


def render(args, env: dict, rows: list[dict], backends: list[Backend]) -> str:
    names = [b.name for b in backends]
    headers = ["T", "SDPA ms"] + [f"{n} ms" for n in names] + [f"{n} / SDPA" for n in names]
    table = []
    for row in rows:
        sdpa = row["sdpa"].get("median_ms")
        table.append(
            [row["T"], fmt_ms(sdpa) if sdpa is not None else "error"]
            + [cell(row["backends"][n], "median_ms") for n in names]
            + [cell(row["backends"][n], "ratio_vs_sdpa") for n in names]
        )
    checks = []
    for row in rows:
        for n in names:
            e = row["backends"][n]
            if e.get("finite") is None:
                continue
            err, full = e.get("rel_err_vs_torch"), e.get("all_full_rel_err_vs_sdpa")
            checks.append([row["T"], n, "yes" if e["finite"] else "**NO**",
                           "reference" if n == "torch" else ("-" if err is None else f"{err:.2e}"),
                           "-" if full is None else f"{full:.2e}"])
    mix = ", ".join(f"{f:.0%} {n}" for f, n in zip(args.fractions, EXPERTS))
    parts = [
        f"# Attention only: routed Meta-Attention vs causal SDPA ({env['device']})\n",
        (f"B=1, {args.heads} query / {args.kv_heads} kv heads, d={args.head_dim}, {str(args.dtype).replace('torch.', '')}, "
         f"local window {args.window}, feature map {args.feature_map}"
         f"{f', hybrid window {args.linear_window}' if args.linear_window else ''}; routing {mix}, tokens placed by a seeded "
         f"random permutation. Routed = `MetaAttention.run_experts` with forced per-token routes (no router, no "
         f"projections). Median of {args.repeats} after {args.warmup} warm-up calls"
         f"{' (CUDA events)' if args.device.type == 'cuda' else ''}; ratio = routed / SDPA (below 1 is faster).\n"),
        environment_markdown(env),
        markdown_table(headers, table),
        ("\nCorrectness before timing: routed output finite; relative error (L2 norm) against the torch reference "
         f"backend (T <= {args.skip_ref_above}); every token routed to `full` (per-token routes) against SDPA.\n"),
        markdown_table(["T", "backend", "finite", "rel err vs torch", "all-full vs SDPA"], checks) if checks else "(no checks ran)",
    ]
    failed = [[row["T"], n, row["backends"][n]["status"], row["backends"][n].get("error", "")]
              for row in rows for n in names if row["backends"][n].get("error")]
    failed += [["all", b.name, "unavailable", b.error] for b in backends if b.meta is None]
    if failed:
        parts += ["\nUnavailable backends and failures:\n", markdown_table(["T", "backend", "status", "error"], failed)]
    if args.single_expert:
        per = [[row["T"], n] + [fmt_ms(x) if isinstance(x, float) else str(x)
                                for x in row["backends"][n].get("single_expert_ms", {}).values()]
               for row in rows for n in names if row["backends"][n].get("single_expert_ms")]
        parts += ["\nEvery token forced to one expert (ms, same T; per-token routes, so fast paths apply):\n",
                  markdown_table(["T", "backend", *(f"all {e}" for e in EXPERTS)], per)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    env = environment(args.device, "benchmarks/bench_attention.py", argv)
    tag = args.tag or device_tag(args.device)
    log(f"device {env['device']}; torch {env['torch']}; backends {args.backends}; T {args.seq_lens}")

    max_t = max(args.seq_lens)
    reference = build_meta(args, "torch", max_t)

    def build(name: str) -> MetaAttention:
        meta = build_meta(args, name, max_t)
        meta.load_state_dict(reference.state_dict())  # identical expert parameters in every backend
        return meta

    backends = []
    for name in args.backends:
        meta, error = (reference, None) if name == "torch" else guarded(
            f"build backend {name}", lambda name=name: build(name), args.device
        )
        backends.append(Backend(name, status="unavailable", error=error) if error else Backend(name, meta))

    rows = [measure_length(t, args, backends, reference) for t in args.seq_lens]
    markdown = render(args, env, rows, backends)
    log("\n" + markdown)
    data = {
        "environment": env,
        "config": {k: (str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else v) for k, v in vars(args).items()},
        "results": rows,
    }
    md_path, json_path = write_results(args.out_dir, f"attention_{tag}", markdown, data)
    data["files"] = {"md": str(md_path), "json": str(json_path)}
    if not args.no_plot:
        from plot_attention import plot_results

        png = plot_results(data, args.out_dir / f"attention_{tag}.png")
        if png:
            data["files"]["png"] = str(png)
    return data


if __name__ == "__main__":
    main()
