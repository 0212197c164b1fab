"""What fixed routings cost in quality on SmolLM2-135M: held-out WikiText-2 perplexity at T=2048
with every token forced to one expert, or with full attention kept in some layers only.

No training: the ceiling and floor a router finetune works between, and the effect of the local
expert's attention sinks. CPU, about 8 minutes on 2 cores.

    python benchmarks/forced_routing.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import quality  # noqa: E402
from _common import RESULTS_DIR, device_tag, environment, environment_markdown, log, markdown_table  # noqa: E402

import ma_convert  # noqa: E402
from ma_convert.core.control import meta_attention_modules  # noqa: E402


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=6, help="held-out WikiText blocks of 2048 tokens")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args, rest = p.parse_known_args(argv)
    qargs = quality.parse_args(["--device", "cpu", "--batch-size", "1", "--work-dir", "outputs/forced_routing",
                                "--eval-tokens", str(args.blocks * 2048), "--retrieval-docs", "0", *rest])
    data = quality.prepare_data(qargs)
    original, tokenizer = quality.load_original(qargs)
    blocks = quality.eval_blocks(data["wikitext"], tokenizer, qargs)[: args.blocks]
    base = quality.perplexity(original, blocks, qargs)["perplexity"]
    rows = [["original", "-", f"{base:.2f}", "+0.0%", "1.00"]]

    def measure(label, model, forced=None, cost=None):
        started = time.perf_counter()
        ppl = quality.perplexity(model, blocks, qargs, forced=forced)["perplexity"]
        rows.append([label[0], label[1], f"{ppl:.2f}", f"{100 * (ppl / base - 1):+.1f}%", f"{cost:.2f}"])
        log(f"{label}: {ppl:.2f} ({time.perf_counter() - started:.0f} s)")

    for window, sinks in [(256, 0), (256, 4), (256, 64), (512, 4)]:
        model = ma_convert.convert(copy.deepcopy(original), window_size=window, sink_tokens=sinks)
        measure(("all local", f"W={window}, {sinks} sinks"), model, forced="local", cost=0.30)
    model = ma_convert.convert(copy.deepcopy(original), window_size=256)
    measure(("all linear", "untrained Hedgehog map"), model, forced="linear", cost=0.15)
    modules = meta_attention_modules(model)
    for keep in ([0, 1], [0, 1, 2, 3], list(range(0, len(modules), 4))):
        for i, module in enumerate(modules):
            module.forced_expert = 0 if i in keep else 2  # full in the kept layers, local elsewhere
        cost = (len(keep) + 0.30 * (len(modules) - len(keep))) / len(modules)
        measure(("full in layers " + ",".join(map(str, keep)), "local (W=256, 4 sinks) elsewhere"), model, cost=cost)
    env = environment(torch.device("cpu"), "benchmarks/forced_routing.py", sys.argv[1:] if argv is None else argv)
    lines = [
        "# Fixed routings on SmolLM2-135M-Instruct (no training)",
        "",
        f"Held-out WikiText-2 perplexity, {len(blocks)} blocks of 2048 tokens (the held-out quarter of "
        "benchmarks/quality.py), fp32. Cost: projected, 1.0 / 0.15 / 0.30 per token.",
        "",
        markdown_table(["routing", "setting", "perplexity", "vs original", "cost"], rows),
        "",
        environment_markdown(env),
        "",
    ]
    out = args.out_dir / f"forced_routing_{device_tag(torch.device('cpu'))}.md"
    out.write_text("\n".join(lines))
    log(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
