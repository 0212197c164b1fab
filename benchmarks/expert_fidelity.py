"""How closely can each cheap expert reproduce SmolLM2's full attention, layer by layer?

Relative MSE to the full expert's output (MSE over the output's mean square) on held-out WikiText
blocks, with Q/K/V captured from a forced-full pass of SmolLM2-135M-Instruct:
- the local expert at several windows (4 sink tokens; no parameters, nothing to train);
- the linear expert (Hedgehog maps) after layer-wise attention transfer, as the recipe's
  `expert_pretrain_steps` trains it;
- the hybrid linear expert (`MetaAttnConfig.linear_window=W`): exact softmax over the last W keys and
  the sinks, Hedgehog linear attention over the older keys, one shared normalisation (LoLCATs' sliding
  window + linear form), trained the same way. It asks whether a linear expert with a short exact
  window is good enough to pay for full-attention tokens at cost 0.15.

No forward through the model after the capture, so it is quick on a GPU:

    python benchmarks/expert_fidelity.py                       # GPU: T=2048, every layer
    python benchmarks/expert_fidelity.py --device cpu --seq-len 1024 --layers 2 9 16 23 29 --steps 120
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import quality  # noqa: E402
from _common import device_tag, environment, environment_markdown, log, markdown_table, write_results  # noqa: E402

import ma_convert  # noqa: E402
from ma_convert import build_expert  # noqa: E402
from ma_convert.core.control import meta_attention_modules  # noqa: E402
from ma_convert.training.objective import set_transfer_capture, teacher_logits  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--train-blocks", type=int, default=16, help="WikiText training blocks whose heads the experts fit")
    p.add_argument("--eval-blocks", type=int, default=4, help="held-out blocks the error is measured on")
    p.add_argument("--layers", type=int, nargs="*", help="layer indices (default: all)")
    p.add_argument("--local-windows", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--hybrid-windows", type=int, nargs="+", default=[64, 128])
    p.add_argument("--steps", type=int, default=240, help="attention-transfer steps per layer and expert (one block each)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", type=Path, default=quality.RESULTS_DIR)
    args, rest = p.parse_known_args(argv)
    qargs = quality.parse_args(["--device", args.device, "--seq-len", str(args.seq_len), "--retrieval-docs", "0",
                                "--work-dir", "outputs/expert_fidelity", *rest])
    return args, qargs


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> float:
    return (F.mse_loss(out.float(), target) / target.pow(2).mean()).item()


def fit(expert_fn, params, heads, args) -> None:
    """Attention transfer for one layer: Adam on relative MSE, one training block per step."""
    optimizer = torch.optim.Adam(params, lr=args.lr)
    for step in range(args.steps):
        q, k, v, scale, target = heads[step % args.train_blocks]
        loss = F.mse_loss(expert_fn(q, k, v, scale).float(), target) / target.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main(argv=None) -> dict:
    args, qargs = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = quality.prepare_data(qargs)
    original, tokenizer = quality.load_original(qargs)
    train_blocks = quality.eval_blocks(data["train"], tokenizer, qargs)[: args.train_blocks]
    held_out = quality.eval_blocks(data["wikitext"], tokenizer, qargs)[: args.eval_blocks]
    if len(train_blocks) < args.train_blocks or len(held_out) < args.eval_blocks:
        raise ValueError(f"not enough text for {args.train_blocks} + {args.eval_blocks} blocks of {args.seq_len}")
    model = ma_convert.convert(original, window_size=max(args.local_windows), max_positions=8192).eval()
    modules = meta_attention_modules(model)
    layers = args.layers if args.layers else list(range(len(modules)))
    heads = {layer: [] for layer in layers}  # per layer: (q, k, v, scale, full output) per block
    with torch.no_grad():
        for ids in train_blocks + held_out:
            set_transfer_capture(model, True, heads=True)
            teacher_logits(model, ids[None].to(device), logits_to_keep=1)
            for layer in layers:
                m = modules[layer]
                h = m.last_heads
                heads[layer].append((h["q"], h["k"], h["v"], h["scale"], m.last_expert_outputs[m.full_index].float()))
    set_transfer_capture(model, False)
    log(f"captured {len(layers)} layers x {len(train_blocks)} + {len(held_out)} blocks of {args.seq_len}")

    rows = []
    for layer in layers:
        started = time.perf_counter()
        module, blocks = modules[layer], heads[layer]
        evaluation = blocks[args.train_blocks:]
        row = {"layer": layer}
        with torch.no_grad():
            for window in args.local_windows:
                local = copy.deepcopy(module.experts[module.expert_index("local")])
                local.window = window
                row[f"local W={window}"] = sum(
                    relative_mse(local.attend(q, k, v, None, scale=s), target) for q, k, v, s, target in evaluation
                ) / len(evaluation)
        linear = copy.deepcopy(module.experts[module.expert_index("linear")]).float()
        with torch.enable_grad():
            fit(lambda q, k, v, s: linear.attend(q, k, v, None, scale=s), list(linear.parameters()), blocks, args)
        with torch.no_grad():
            row["linear"] = sum(relative_mse(linear.attend(q, k, v, None, scale=s), t) for q, k, v, s, t in evaluation) / len(evaluation)
        for window in args.hybrid_windows:
            hybrid = build_expert("hybrid", module.cfg.replace(linear_window=window)).to(device)
            with torch.enable_grad():
                fit(lambda q, k, v, s: hybrid.attend(q, k, v, None, scale=s), list(hybrid.parameters()), blocks, args)
            with torch.no_grad():
                row[f"hybrid W={window}"] = sum(relative_mse(hybrid.attend(q, k, v, None, scale=s), t)
                                                for q, k, v, s, t in evaluation) / len(evaluation)
        rows.append(row)
        log(f"layer {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "layer")
            + f" ({time.perf_counter() - started:.0f} s)")
        del heads[layer]

    columns = [k for k in rows[0] if k != "layer"]
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in columns}
    env = environment(device, "benchmarks/expert_fidelity.py", sys.argv[1:] if argv is None else argv)
    table = [[r["layer"]] + [f"{r[c]:.3f}" for c in columns] for r in rows]
    table.append(["**mean**"] + [f"**{mean[c]:.3f}**" for c in columns])
    markdown = "\n".join([
        "# Cheap experts against full attention, per layer (SmolLM2-135M-Instruct)",
        "",
        f"Relative MSE to the full expert's output (0 = exact) on {args.eval_blocks} held-out WikiText blocks of "
        f"{args.seq_len} tokens. Local: 4 sink tokens, no parameters. Linear and hybrid: {args.steps} attention-"
        f"transfer steps (Adam, lr {args.lr:g}) on {args.train_blocks} training blocks. Hybrid: the linear expert with "
        "`linear_window=W` (exact window + sinks, linear attention beyond, shared normalisation).",
        "",
        markdown_table(["layer"] + columns, table),
        "",
        environment_markdown(env),
    ])
    payload = {"environment": env, "args": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
               "rows": rows, "mean": mean}
    write_results(args.out_dir, f"expert_fidelity_{device_tag(device)}", markdown, payload)
    return payload


if __name__ == "__main__":
    main()
