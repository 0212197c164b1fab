"""Is the router's uncertainty calibrated? Per token, the harm of its routing (its loss under hard
routing minus its loss with every layer forced full) against its router uncertainty (mean over layers).
Reports the AUROC of uncertainty for "harmed" tokens (harm above a margin), Spearman's rank correlation,
and a reliability plot: mean harm per uncertainty decile. Issue 17, part 2.

    python benchmarks/calibration.py MODEL_DIR --text held_out.txt --length 512 --blocks 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import RESULTS_DIR, environment, environment_markdown, markdown_table  # noqa: E402

from ma_convert import force_expert, set_routing_mode  # noqa: E402
from ma_convert.core.control import meta_attention_modules  # noqa: E402


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a positive outranks a negative (Mann-Whitney; ties count half)."""
    ranks = scores.argsort().argsort().double() + 1
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# Per-token scores read from each layer's router output, averaged over layers. "uncertainty" is the
# Dirichlet K / (K + sum of concentrations) that `auto` routing thresholds; the other two read only the
# posterior mean (what a prior-free router has too). A temperature on the concentrations is a monotone map
# of one layer's uncertainty, so it moves the threshold's meaning but not a single layer's AUROC.
SCORES = {
    "uncertainty": lambda r: r.uncertainty,
    "entropy of the mean": lambda r: -(r.mean * r.mean.clamp_min(1e-12).log()).sum(-1),
    "1 - top probability": lambda r: 1.0 - r.mean.max(-1).values,
}


@torch.no_grad()
def token_harm_and_scores(model, blocks, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    harms, scores = [], {name: [] for name in SCORES}
    set_routing_mode(model, "hard")
    for ids in blocks:
        ids = ids[None].to(device)
        routed = F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        outputs = [m.last_router_output for m in meta_attention_modules(model)]
        with force_expert(model, "full"):
            full = F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        harms.append((routed - full).cpu())
        for name, score in SCORES.items():
            scores[name].append(torch.stack([score(r)[0, :-1] for r in outputs]).float().mean(0).cpu())
    return torch.cat(harms), {name: torch.cat(parts) for name, parts in scores.items()}


def reliability_png(harm, uncertainty, path: Path, title: str) -> list[list[float]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = uncertainty.argsort()
    bins = [order[i * len(order) // 10: (i + 1) * len(order) // 10] for i in range(10)]
    table = [[float(uncertainty[b].mean()), float(harm[b].mean())] for b in bins if len(b)]
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([u for u, _ in table], [h for _, h in table], "o-")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("router uncertainty (decile mean, over layers)")
    ax.set_ylabel("harm: loss routed - loss full (nats)")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    return table


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from ma_convert.eval.lengths import blocks_of, read_documents
    from ma_convert.verify import load_converted

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--text", required=True)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--margin", type=float, default=0.1, help="a token is harmed when its loss rises by more (nats)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    model = load_converted(args.model).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    documents = read_documents(args.text, args.length * args.blocks * 16)
    blocks = blocks_of(documents, tokenizer, args.length, args.blocks)
    harm, scores = token_harm_and_scores(model, blocks, torch.device(args.device))
    uncertainty = scores["uncertainty"]
    harmed = harm > args.margin
    result = {"tokens": len(harm), "harmed_share": float(harmed.float().mean()), "mean_harm": float(harm.mean()),
              "auroc": auroc(uncertainty, harmed), "spearman": spearman(uncertainty, harm),
              "by_score": {name: {"auroc": auroc(s, harmed), "spearman": spearman(s, harm)}
                           for name, s in scores.items()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"calibration_{args.tag}.png"
    result["reliability"] = reliability_png(harm, uncertainty, png, f"{args.model.name}, T={args.length}")
    env = environment(torch.device(args.device), "benchmarks/calibration.py", sys.argv[1:] if argv is None else argv)
    rows = [[f"{u:.3f}", f"{h:+.4f}"] for u, h in result["reliability"]]
    text = (f"# Router uncertainty against the harm of routing\n\n{environment_markdown(env)}\n\n"
            f"{result['tokens']} tokens; harmed (loss up by more than {args.margin} nats): "
            f"{result['harmed_share']:.1%}; AUROC of uncertainty for harmed tokens **{result['auroc']:.3f}**; "
            f"Spearman(uncertainty, harm) {result['spearman']:.3f}.\n\n"
            f"{markdown_table(['uncertainty (decile mean)', 'mean harm (nats)'], rows)}\n\n"
            "Other per-token scores (mean over layers), same tokens:\n\n"
            + markdown_table(["score", "AUROC for harmed tokens", "Spearman with harm"],
                             [[name, f"{v['auroc']:.3f}", f"{v['spearman']:.3f}"]
                              for name, v in result["by_score"].items()])
            + "\n\n"
            f"![reliability]({png.name})\n")
    (args.out_dir / f"calibration_{args.tag}.md").write_text(text)
    (args.out_dir / f"calibration_{args.tag}.json").write_text(json.dumps({"environment": env, **result}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
