"""The paper's Phase 1 (arXiv 2605.28384): a tiny decoder LM built from `MetaAttentionLayer`, trained
from scratch, with the Bayesian router against the prior-free softmax router at the same settings.

Byte-level (256 symbols, no tokenizer to carry), trained on three quarters of the WikiText-2 validation
articles and measured on the held-out quarter (every fourth article). Per router and seed: held-out
bits per byte and perplexity per byte, projected hard-routing cost (costs 1.0 / 0.15 / 0.30), mean
normalised routing entropy per token, and per-expert fractions, beside the paper's figures.

    python benchmarks/paper_phase1.py                    # CPU, a few minutes
    python benchmarks/paper_phase1.py --steps 2000 --d-model 256 --layers 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import RESULTS_DIR, environment, environment_markdown, log, markdown_table  # noqa: E402

from ma_convert import MetaAttentionLayer, MetaAttnConfig, RoutingStats, set_objective_weights, set_routing_mode  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPER = {"bayesian": {"projected_cost": 0.251, "entropy": 0.433},
         "softmax": {"projected_cost": 0.593, "entropy": 0.558}}


class Block(nn.Module):
    def __init__(self, cfg: MetaAttnConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = MetaAttentionLayer(cfg)
        hidden = 4 * cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))

    def forward(self, x):
        out, aux, stats = self.attn(self.norm1(x))
        x = x + out
        return x + self.mlp(self.norm2(x)), aux, stats


class TinyLM(nn.Module):
    def __init__(self, cfg: MetaAttnConfig, layers: int, seq_len: int) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, cfg.d_model), nn.Embedding(seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, 256)

    def forward(self, ids):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        aux, stats = 0.0, []
        for block in self.blocks:
            x, layer_aux, layer_stats = block(x)
            aux, stats = aux + layer_aux, stats + [layer_stats]
        return self.head(self.norm(x)), aux, RoutingStats.aggregate(stats)


def byte_splits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors: WikiText-2 articles, every fourth held out."""
    articles, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            articles.append("\n".join(current))
            current = []
        current.append(line)
    articles.append("\n".join(current))
    as_bytes = lambda docs: torch.tensor(list("\n\n".join(docs).encode("utf-8")), dtype=torch.long)  # noqa: E731
    return as_bytes([a for i, a in enumerate(articles) if i % 4 != 3]), as_bytes(articles[3::4])


def run(router: str, seed: int, data, args) -> dict:
    train, held = data
    torch.manual_seed(seed)
    cfg = MetaAttnConfig(d_model=args.d_model, n_heads=args.heads, window_size=args.window, router=router,
                         max_positions=args.seq_len)
    model = TinyLM(cfg, args.layers, args.seq_len).to(args.device)
    kl_weight = args.kl_weight if router == "bayesian" else 0.0
    set_objective_weights(model, kl_weight=kl_weight, cost_lambda=args.cost_lambda, prior=args.prior,
                          beta0=args.beta0, start_at_prior=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=g)
        ids = torch.stack([train[s: s + args.seq_len + 1] for s in starts]).to(args.device)
        logits, aux, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux / args.layers
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:  # linear warm-up, then cosine to 10%
            frac = step / args.steps
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        optimizer.step()
    seconds = time.perf_counter() - started
    return {"router": router, "seed": seed, "train_seconds": seconds, **evaluate(model, held, args)}


@torch.no_grad()
def evaluate(model, held, args) -> dict:
    """Held-out loss under hard (top-1) routing, and its routing statistics."""
    model.eval()
    for block in model.blocks:
        set_routing_mode(block.attn, "hard")
    n = min(len(held) // args.seq_len, args.eval_blocks)
    blocks = held[: n * args.seq_len].view(n, args.seq_len).to(args.device)
    total, stats = 0.0, []
    for i in range(0, n, args.batch):
        ids = blocks[i: i + args.batch]
        logits, _, s = model(ids)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        stats.append(s)
    nll = total / (n * (args.seq_len - 1))
    overall = RoutingStats.aggregate(stats)
    return {"bits_per_byte": nll / math.log(2), "ppl_per_byte": math.exp(nll),
            "projected_cost": overall.projected_cost, "entropy": overall.entropy,
            "expert_fractions": overall.expert_fractions}


def markdown(rows: list[dict], args, env: dict) -> str:
    table = []
    for router in args.routers:
        mine = [r for r in rows if r["router"] == router]
        mean = lambda key: statistics.mean(r[key] for r in mine)  # noqa: E731
        sd = lambda key: statistics.stdev(r[key] for r in mine) if len(mine) > 1 else 0.0  # noqa: E731
        fractions = " / ".join(f"{statistics.mean(r['expert_fractions'][i] for r in mine):.2f}" for i in range(3))
        table.append([router, len(mine), f"{mean('projected_cost'):.3f} ± {sd('projected_cost'):.3f}",
                      f"{PAPER[router]['projected_cost']:.3f}", f"{mean('entropy'):.3f} ± {sd('entropy'):.3f}",
                      f"{PAPER[router]['entropy']:.3f}", f"{mean('bits_per_byte'):.3f} ± {sd('bits_per_byte'):.3f}",
                      fractions])
    headers = ["router", "seeds", "projected cost", "paper", "entropy", "paper", "held-out bits/byte",
               "full / linear / local"]
    settings = ", ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("out_dir", "device", "data"))
    return (f"# The paper's Phase 1 on a tiny byte-level LM\n\n{environment_markdown(env)}\n\n{settings}\n\n"
            f"{markdown_table(headers, table)}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "wikitext2-valid.txt")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=0.01)
    p.add_argument("--cost-lambda", type=float, default=0.01)
    p.add_argument("--beta0", type=float, default=3.0)
    p.add_argument("--prior", choices=["compute", "uniform"], default="compute",
                   help="the Bayesian router's Dirichlet prior: pi proportional to 1 / cost, or flat")
    p.add_argument("--routers", nargs="+", choices=["bayesian", "softmax"], default=["bayesian", "softmax"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-blocks", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    data = byte_splits(args.data)
    rows = []
    for seed in range(args.seeds):
        for router in args.routers:
            rows.append(run(router, seed, data, args))
            shown = {k: v for k, v in rows[-1].items() if k not in ("router", "seed")}
            log(f"{router} seed {seed}: {json.dumps(shown)}")
    env = environment(torch.device(args.device), "benchmarks/paper_phase1.py", sys.argv[1:] if argv is None else argv)
    text = markdown(rows, args, env)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"paper_phase1_{args.tag}.md").write_text(text)
    record = {"environment": env, "rows": rows}
    (args.out_dir / f"paper_phase1_{args.tag}.json").write_text(json.dumps(record, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
