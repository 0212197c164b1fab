"""End to end: a random LLaMA-shaped model against its Meta-Attention conversion, prefill and decode.

Builds the original (seeded random init), converts a deep copy with ma_convert (hard routing,
--backend, --window) and measures, in the same run:

- sanity: converted forced to `full` gives the original's logits (max abs diff, short input);
- P3 prefill: one forward of T tokens (use_cache=False, last-token logits only), original vs
  converted with a fixed per-token mix (25% full / 25% linear / 50% local): speedup original/converted,
  target >= 1.3;
- P4 overhead: converted forced to `full` vs original, target ratio <= 1.03;
- P5 decode: batch B, a cache of C tokens built by one prefill, then single-token steps; median per
  step, original vs converted with per-row routes (each row of the batch one expert, same mix),
  target ratio <= 0.8.

Each measurement is guarded: an OOM or an error is reported and the rest go on. Writes
benchmarks/results/e2e_<device>.{md,json}.

    python benchmarks/bench_e2e.py                      # CUDA: ~1B model, bf16, T=32768, decode 8 x 32768
    python benchmarks/bench_e2e.py --small --device cpu # tiny model, T=512
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from pathlib import Path
from typing import Any

import torch

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
    time_fn,
    write_results,
)
from transformers import LlamaConfig, LlamaForCausalLM

import ma_convert
from ma_convert import RoutingStats, force_expert, routing_stats

EXPERTS = ("full", "linear", "local")
TARGETS = {"P3": ("speedup original/converted", ">=", 1.3), "P4": ("ratio converted/original", "<=", 1.03),
           "P5": ("ratio converted/original", "<=", 0.8)}

PRESETS = {
    # ~1.0B parameters: 16 layers of 2048, 32 query / 8 kv heads of 64, MLP 8192, vocab 32000.
    "1b": dict(
        model=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                   intermediate_size=8192, vocab_size=32000, max_position_embeddings=65536),
        seq_len=32768, decode_batch=8, decode_context=32768, window=1024,
    ),
    "small": dict(
        model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=256, max_position_embeddings=4096),
        seq_len=512, decode_batch=8, decode_context=512, window=64,
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--small", action="store_true", help="tiny model and lengths (CPU, tests)")
    p.add_argument("--dtype", help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seq-len", type=int, help="P3/P4 prefill length (default 32768; --small 512)")
    p.add_argument("--decode-batch", type=int, help="P5 batch (default 8)")
    p.add_argument("--decode-context", type=int, help="P5 cached tokens per row (default 32768; --small 512)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps (each adds one token)")
    p.add_argument("--decode-warmup", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="build the P5 cache in chunks of this many tokens (0: one forward), to limit memory")
    p.add_argument("--backend", default="auto", help="RoutingPolicy.backend of the converted model")
    p.add_argument("--window", type=int, help="local expert window (default 1024; --small 64)")
    p.add_argument("--mix", default="0.25,0.25,0.50", help="fractions full,linear,local (tokens for P3, rows for P5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["sanity", "P3", "P4", "P5", "router"],
                   help="parts to leave out (router: the rows routed by the untrained router)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", help="file-name tag (default: the device; '-small' is appended with --small)")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    preset = PRESETS["small" if args.small else "1b"]
    for key in ("seq_len", "decode_batch", "decode_context", "window"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.model = preset["model"]
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.fractions = parse_mix(args.mix)
    return args


# ---------------------------------------------------------------------- models
def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module | None, str | None]:
    """The seeded random original and its conversion (None and the reason if conversion fails)."""
    config = LlamaConfig(**args.model, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialise on the device: a 1B model initialises slowly on a CPU
        original = LlamaForCausalLM(config)
    original = original.to(args.dtype).eval()
    n_params = sum(p.numel() for p in original.parameters())
    log(f"original: {param_count(n_params)} parameters, {str(args.dtype).replace('torch.', '')}")

    def conversion():
        model = ma_convert.convert(copy.deepcopy(original), window_size=args.window,
                                   policy=ma_convert.RoutingPolicy(mode="hard", backend=args.backend))
        return model.eval()

    converted, error = guarded("convert", conversion, args.device)
    return original, converted, error


def param_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def forward_kwargs(model) -> dict:
    """Last-token logits only where the model supports it: full logits of 32k x 32000 are 2 GiB."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def random_ids(args, batch: int, length: int, salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed * 1000 + salt)
    return torch.randint(0, args.model["vocab_size"], (batch, length), generator=gen).to(args.device)


def router_mix(model) -> dict:
    """Share of tokens per expert over every layer in the last forward (the router's own routing)."""
    fractions = RoutingStats.aggregate(routing_stats(model)).expert_fractions
    return {name: round(f, 4) for name, f in zip(EXPERTS, fractions)}


# ---------------------------------------------------------------------- measurements
def sanity(args, original, converted) -> dict:
    """Converted forced full vs original logits on a short input: int route and per-token zeros."""
    ids = random_ids(args, 1, min(256, args.seq_len), salt=1)
    result = {"tokens": ids.shape[1]}
    with torch.no_grad():
        reference = original(input_ids=ids, use_cache=False).logits.float()
        for label, route in (("int_full", "full"), ("per_token_full", torch.zeros_like(ids))):
            with force_expert(converted, route):
                logits = converted(input_ids=ids, use_cache=False).logits.float()
            result[label + "_max_abs_diff"] = (logits - reference).abs().max().item()
    result["reference_max_abs_logit"] = reference.abs().max().item()
    log(f"sanity: forced full vs original, max abs logit diff {result['int_full_max_abs_diff']:.3g} (int route), "
        f"{result['per_token_full_max_abs_diff']:.3g} (per-token zeros); |logits| up to "
        f"{result['reference_max_abs_logit']:.3g}")
    for label in ("int_full", "per_token_full"):
        if result[label + "_max_abs_diff"] != 0.0:
            log(f"  !! WARNING: {label}: converted forced full does not reproduce the original logits exactly")
    return result


def prefill_timing(args, model, ids, route=None) -> dict:
    """Time one use_cache=False forward of `ids`, under `route` (force_expert) when given."""
    kwargs = forward_kwargs(model)

    def step():
        model(input_ids=ids, use_cache=False, **kwargs)

    with torch.no_grad():
        if route is None:
            return time_fn(step, args.device, warmup=args.warmup, repeats=args.repeats).to_dict()
        with force_expert(model, route):
            return time_fn(step, args.device, warmup=args.warmup, repeats=args.repeats).to_dict()


def build_cache(args, model, ids):
    """A KV cache (and, converted, the linear states) holding `ids`, in chunks if asked."""
    chunk = args.prefill_chunk or ids.shape[1]
    cache = None
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True,
                        **forward_kwargs(model))
            cache = out.past_key_values
            del out
    return cache


def decode_timing(args, model, cache, token) -> dict:
    """Median per-step time of consecutive single-token steps; each step appends to `cache`, so the
    context grows by warmup + steps tokens over the measurement (negligible next to C)."""

    def step():
        model(input_ids=token, past_key_values=cache, use_cache=True)

    with torch.no_grad():
        return time_fn(step, args.device, warmup=args.decode_warmup, repeats=args.decode_steps).to_dict()


def measure(results: dict, key: str, label: str, fn, args) -> Any | None:
    """Run a measurement under `guarded`; store its result or its error under results[key]."""
    log(f"- {label} ...")
    value, error = guarded(label, fn, args.device)
    results[key] = value if error is None else {"error": error}
    if error is None and isinstance(value, dict) and "median_ms" in value:
        log(f"  {label}: {fmt_ms(value['median_ms'])} ms (min {fmt_ms(value['min_ms'])})")
    return value


def run_p3_p4(args, original, converted, results: dict) -> None:
    ids = random_ids(args, 1, args.seq_len, salt=3)
    routes = fixed_routes(args.seq_len, args.fractions, torch.Generator().manual_seed(args.seed)).unsqueeze(0)
    routes = routes.to(args.device)
    prefill = results.setdefault("prefill", {"T": args.seq_len})
    log(f"\nprefill, T={args.seq_len} (P3, P4)")
    measure(prefill, "original", "original", lambda: prefill_timing(args, original, ids), args)
    if converted is None:
        return
    if "P3" not in args.skip:
        measure(prefill, "converted_mixed", "converted, forced per-token mix",
                lambda: prefill_timing(args, converted, ids, routes), args)
    if "P4" not in args.skip:
        measure(prefill, "converted_full", "converted, forced full", lambda: prefill_timing(args, converted, ids, "full"),
                args)
    if "router" not in args.skip:
        def own_router():
            timing = prefill_timing(args, converted, ids)
            return {**timing, "mix": router_mix(converted)}

        value = measure(prefill, "converted_router", "converted, own (untrained) router, hard", own_router, args)
        if value:
            log(f"  router mix {value['mix']}")
    free_memory(args.device)


def run_p5(args, original, converted, results: dict) -> None:
    b, c = args.decode_batch, args.decode_context
    ids = random_ids(args, b, c, salt=5)
    token = random_ids(args, b, 1, salt=6)
    row_routes = fixed_routes(b, args.fractions, torch.Generator().manual_seed(args.seed + 1)).unsqueeze(1)
    row_routes = row_routes.to(args.device)  # (B, 1): every row's decode token goes to one expert
    decode = results.setdefault("decode", {"batch": b, "context": c, "steps": args.decode_steps,
                                           "row_routes": row_routes.flatten().tolist()})
    log(f"\ndecode, batch {b}, context {c} (P5); rows routed {decode['row_routes']} (0 full, 1 linear, 2 local)")

    # One model's cache at a time: at 8 x 32k the KV cache alone is 4 GiB.
    cache, error = guarded("original prefill", lambda: build_cache(args, original, ids), args.device)
    if error:
        decode["original"] = {"error": f"prefill: {error}"}
    else:
        measure(decode, "original", "original decode step", lambda: decode_timing(args, original, cache, token), args)
    cache = None
    free_memory(args.device)
    if converted is None:
        return

    def converted_cache():
        with force_expert(converted, "full"):  # the values in the cache do not change decode cost
            return build_cache(args, converted, ids)

    cache, error = guarded("converted prefill", converted_cache, args.device)
    if error:
        decode["converted_mixed"] = {"error": f"prefill: {error}"}
        return
    variants = [("converted_mixed", "converted, per-row mix", row_routes),
                ("converted_full", "converted, forced full", "full"),
                ("converted_all_linear", "converted, every row linear", torch.full_like(row_routes, 1)),
                ("converted_all_local", "converted, every row local", torch.full_like(row_routes, 2))]
    for key, label, route in variants:
        def timed(route=route):
            with force_expert(converted, route):
                return decode_timing(args, converted, cache, token)

        measure(decode, key, label + " decode step", timed, args)
    if "router" not in args.skip:
        def own_router():
            return {**decode_timing(args, converted, cache, token), "mix": router_mix(converted)}

        value = measure(decode, "converted_router", "converted, own (untrained) router decode step", own_router, args)
        if value:
            log(f"  router mix (last step) {value['mix']}")
    cache = None
    free_memory(args.device)


# ---------------------------------------------------------------------- report
def median(entry: dict | None) -> float | None:
    return entry.get("median_ms") if isinstance(entry, dict) else None


def summarise(results: dict) -> dict:
    """P3/P4/P5 figures and whether each meets its target (None where a measurement is missing)."""
    pre, dec = results.get("prefill", {}), results.get("decode", {})

    def ratio(num, den):
        a, b = median(num), median(den)
        return a / b if a and b else None

    values = {
        "P3": ratio(pre.get("original"), pre.get("converted_mixed")),
        "P4": ratio(pre.get("converted_full"), pre.get("original")),
        "P5": ratio(dec.get("converted_mixed"), dec.get("original")),
    }
    summary = {}
    for key, value in values.items():
        what, op, target = TARGETS[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        summary[key] = {"what": what, "value": value, "target": f"{op} {target}", "met": met}
    return summary


def table_rows(section: dict, base_key: str, labels: dict) -> list[list[str]]:
    base = median(section.get(base_key))
    rows = []
    for key, label in labels.items():
        entry = section.get(key)
        if entry is None:
            continue
        if "error" in entry:
            rows.append([label, entry["error"][:120], "", ""])
            continue
        ms = entry["median_ms"]
        mix = f" (mix {entry['mix']})" if "mix" in entry else ""
        rows.append([label + mix, fmt_ms(ms), fmt_ms(entry["min_ms"]), f"{ms / base:.3f}" if base else "-"])
    return rows


def render(args, env: dict, results: dict) -> str:
    m = args.model
    mix = ", ".join(f"{f:.0%} {n}" for f, n in zip(args.fractions, EXPERTS))
    parts = [
        f"# End to end: LLaMA-shaped random model vs its Meta-Attention conversion ({env['device']})\n",
        (f"Model: {param_count(results['n_params'])} parameters ({m['num_hidden_layers']} layers, hidden "
         f"{m['hidden_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads of {m['head_dim']}, "
         f"MLP {m['intermediate_size']}, vocab {m['vocab_size']}), sdpa, {str(args.dtype).replace('torch.', '')}, "
         f"random init (seed {args.seed}). Converted: hard routing, backend `{args.backend}`, window {args.window}. "
         f"Routing mix {mix}. Medians (prefill: {args.repeats} after {args.warmup} warm-up; decode: "
         f"{args.decode_steps} consecutive steps after {args.decode_warmup}).\n"),
        environment_markdown(env),
        "## Summary\n",
        markdown_table(
            ["", "measures", "value", "target", "met"],
            [[k, s["what"], "-" if s["value"] is None else f"{s['value']:.3f}", s["target"],
              {True: "yes", False: "**no**", None: "-"}[s["met"]]] for k, s in results["summary"].items()],
        ),
    ]
    if "conversion_error" in results:
        parts.append(f"\n**Conversion failed**: {results['conversion_error']}\n")
    if "sanity" in results:
        s = results["sanity"]
        if "error" in s:
            parts.append(f"\nSanity check failed to run: {s['error']}\n")
        else:
            parts.append(
                f"\nSanity ({s['tokens']} tokens): converted forced full vs original logits, max abs diff "
                f"{s['int_full_max_abs_diff']:.3g} (int route `full`), {s['per_token_full_max_abs_diff']:.3g} "
                f"(per-token routes, all full); max |logit| {s['reference_max_abs_logit']:.3g}.\n"
            )
    if "prefill" in results:
        labels = {"original": "original", "converted_mixed": "converted, forced per-token mix (P3)",
                  "converted_full": "converted, forced full (P4)",
                  "converted_router": "converted, own untrained router (hard; includes the router)"}
        parts += [f"\n## Prefill, batch 1, T={results['prefill']['T']}, use_cache=False, last-token logits\n",
                  markdown_table(["model", "median ms", "min ms", "vs original"],
                                 table_rows(results["prefill"], "original", labels))]
    if "decode" in results:
        d = results["decode"]
        labels = {"original": "original", "converted_mixed": "converted, per-row mix (P5)",
                  "converted_full": "converted, forced full",
                  "converted_all_linear": "converted, every row linear",
                  "converted_all_local": "converted, every row local",
                  "converted_router": "converted, own untrained router (hard)"}
        parts += [f"\n## Decode, batch {d['batch']}, context {d['context']}, one token per step\n",
                  (f"Per-row routes (0 full, 1 linear, 2 local): {d['row_routes']}. The converted cache was "
                   f"built with every token routed full (cache contents do not change decode cost).\n"),
                  markdown_table(["model", "median ms / step", "min ms", "vs original"],
                                 table_rows(d, "original", labels))]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    env = environment(args.device, "benchmarks/bench_e2e.py", argv)
    tag = args.tag or (device_tag(args.device) + ("-small" if args.small else ""))
    log(f"device {env['device']}; torch {env['torch']}, transformers {env['transformers']}; backend {args.backend}")

    original, converted, conversion_error = build_models(args)
    results: dict[str, Any] = {"n_params": sum(p.numel() for p in original.parameters())}
    if conversion_error:
        results["conversion_error"] = conversion_error
        log(f"!! conversion failed ({conversion_error}): only the original is measured")
    if converted is not None and "sanity" not in args.skip:
        value, error = guarded("sanity", lambda: sanity(args, original, converted), args.device)
        results["sanity"] = value if error is None else {"error": error}
    if not {"P3", "P4"} <= set(args.skip):
        run_p3_p4(args, original, converted, results)
    if "P5" not in args.skip:
        run_p5(args, original, converted, results)

    results["summary"] = summarise(results)
    markdown = render(args, env, results)
    log("\n" + markdown)
    config = {k: (str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else v) for k, v in vars(args).items()}
    data = {"environment": env, "config": config, "results": results}
    md_path, json_path = write_results(args.out_dir, f"e2e_{tag}", markdown, data)
    data["files"] = {"md": str(md_path), "json": str(json_path)}
    return data


if __name__ == "__main__":
    main()
