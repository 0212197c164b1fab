"""Quality and cost per prompt length: what `ma-convert eval` runs.

At each length, the text is packed into blocks of that many tokens (documents joined by EOS, as in
training) and the converted model reads them as routed: perplexity, per-layer routing statistics,
the projected cost (fixed per-expert costs) and the real attention cost (`core.cost`: the work
each expert did at that length over full attention's). The original, when given, reads the same
blocks in the same run. Passkey retrieval accuracy is optional.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..core.control import meta_attention_modules, routing_stats
from ..core.cost import routed_work
from ..core.stats import RoutingStats
from ..training.data import pack
from ..training.objective import lm_loss
from .lm_eval_client import routing_for_eval

ROUTINGS = ("saved", "full", "soft", "hard", "auto")


def read_documents(spec: str, max_chars: int, text_field: str = "text") -> list[str]:
    """The documents of `spec` (a .txt file, a local table, 'pydoc', or a Hub dataset
    ``name[:config][@split]`` where the Hub is reachable), read until `max_chars` characters."""
    from ..training.data import source_texts

    try:
        documents, chars = [], 0
        for text in source_texts(spec, text_field):
            documents.append(text)
            chars += len(text)
            if chars >= max_chars:
                break
    except ValueError as error:  # the recipe's reader names its own field; here it is --text
        raise type(error)(str(error).replace("DataConfig.source", "--text")) from None
    if not documents:
        raise ValueError(f"--text {spec} holds no text")
    return documents


def check_lengths(model, lengths: Sequence[int]) -> list[int]:
    """The lengths, validated against the positions of a converted model (or its config) before any work."""
    limit = getattr(model, "config", model).max_position_embeddings  # every adapter reads it
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"--lengths {lengths}: give one or more lengths of at least 2 tokens")
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"--lengths {too_long}: beyond the model's {limit} positions")
    return lengths


def blocks_of(documents: Sequence[str], tokenizer, length: int, max_blocks: int) -> list[torch.Tensor]:
    blocks = list(pack(documents, tokenizer, length, max_blocks * length))
    if not blocks:
        raise ValueError(f"the text holds fewer than {length} tokens: give a longer --text or shorter --lengths")
    return blocks


@torch.no_grad()
def read_blocks(model, blocks: Sequence[torch.Tensor], *, routed: bool, batch_size: int = 1, progress=None) -> dict:
    """Perplexity over `blocks` (equal lengths, `batch_size` at a time); for a routed model also the
    routing statistics and the real attention cost, per layer."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    layers: Optional[list[RoutingStats]] = None
    work: Optional[list[list[float]]] = None
    for i in range(0, len(blocks), batch_size):
        ids = torch.stack(list(blocks[i : i + batch_size])).to(device)
        logits = model(input_ids=ids).logits
        total += float(lm_loss(logits, ids)) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
        if routed:
            stats = routing_stats(model)
            layers = stats if layers is None else [a + b for a, b in zip(layers, stats)]
            done = [routed_work(m, m.last_experts_run, ids.shape[1]) for m in meta_attention_modules(model)]
            work = [list(w) for w in done] if work is None else [[a[0] + b[0], a[1] + b[1]] for a, b in zip(work, done)]
        if progress is not None:
            progress.update(ids.shape[0])
    out = {"perplexity": math.exp(total / count), "tokens": count}
    if layers is not None:
        overall = RoutingStats.aggregate(layers)
        out["routing"] = _stats_dict(overall)
        out["layers"] = [dict(_stats_dict(s), real_cost=w / f) for s, (w, f) in zip(layers, work)]
        out["projected_cost"] = overall.projected_cost
        out["real_cost"] = sum(w for w, _ in work) / sum(f for _, f in work)
    return out


def _stats_dict(stats: RoutingStats) -> dict:
    return {"expert_fractions": [round(f, 6) for f in stats.expert_fractions], "entropy": stats.entropy,
            "projected_cost": stats.projected_cost, "mean_uncertainty": stats.mean_uncertainty}


def evaluate_lengths(
    model,
    tokenizer,
    documents: Sequence[str],
    lengths: Sequence[int],
    *,
    routing: str = "saved",
    uncertainty_threshold: Optional[float] = None,
    base=None,
    max_blocks: int = 8,
    passkey: bool = False,
    passkey_keys: int = 2,
    progress: bool = True,
) -> dict:
    """Per length: the converted model's perplexity, routing and costs (and the original's perplexity,
    with `base`), and passkey accuracy when asked. Returns a JSON-ready dict keyed by length."""
    from tqdm.auto import tqdm

    if routing not in ROUTINGS:
        raise ValueError(f"routing={routing!r} is invalid: must be one of {ROUTINGS}")
    lengths = check_lengths(model, lengths)
    if max_blocks < 1:
        raise ValueError(f"max_blocks={max_blocks}: must be >= 1")
    block_sets = {n: blocks_of(documents, tokenizer, n, max_blocks) for n in lengths}
    readers = 2 if base is not None else 1
    steps = sum(len(b) for b in block_sets.values()) * readers
    if passkey:
        from .passkey import DEPTHS

        steps += len(lengths) * len(DEPTHS) * passkey_keys * readers  # one step per prompt answered
    results = {}
    with tqdm(total=steps, desc="eval", unit="block", disable=not progress) as bar, \
            routing_for_eval(model, None if routing == "saved" else routing, uncertainty_threshold=uncertainty_threshold):
        for n, blocks in block_sets.items():
            bar.set_postfix(length=n)
            row = read_blocks(model, blocks, routed=routing != "full", progress=bar)
            if base is not None:
                row["original_perplexity"] = read_blocks(base, blocks, routed=False, progress=bar)["perplexity"]
                row["perplexity_change"] = row["perplexity"] / row["original_perplexity"] - 1.0
            if passkey:
                row["passkey"] = _passkey(model, tokenizer, n, passkey_keys, bar)
                if base is not None:  # a key the original cannot find either is no fault of the routing
                    row["original_passkey"] = _passkey(base, tokenizer, n, passkey_keys, bar)
            results[str(n)] = row
    return results


PASSKEY_NEW_TOKENS = 8  # the answer's greedy tokens


def _passkey(model, tokenizer, length: int, n_keys: int, progress=None) -> dict:
    """Passkey accuracy with prompts of `length` tokens, or fewer at the model's last positions, so
    that the answer fits too (`prompt_tokens` says how many)."""
    from .passkey import make_passkey_prompts, passkey_accuracy

    prompt = min(length, model.config.max_position_embeddings - PASSKEY_NEW_TOKENS)
    prompts = make_passkey_prompts(tokenizer, prompt, n_keys=n_keys)
    result = passkey_accuracy(model, tokenizer, prompts, max_new_tokens=PASSKEY_NEW_TOKENS, progress=progress)
    answers = [{k: o[k] for k in ("key", "depth", "output")} for o in result["outputs"]]
    return {"accuracy": result["accuracy"], "n": result["n"], "by_depth": result["by_depth"], "prompt_tokens": prompt,
            "answers": answers}


def markdown_report(results: dict, *, title: str) -> str:
    """The per-length table, then each length's per-layer real cost."""
    lines = [f"# {title}\n", "| length | perplexity | original | change | full / kernel / local | projected cost | "
             "real cost | passkey (original) |", "|---|---|---|---|---|---|---|---|"]
    for n, row in results.items():
        fractions = " / ".join(f"{f:.2f}" for f in row.get("routing", {}).get("expert_fractions", [])) or "-"
        original = row.get("original_perplexity")
        change = f"{row['perplexity_change']:+.1%}" if original else "-"
        passkey = _num(row.get("passkey", {}).get("accuracy"), 2)
        if "original_passkey" in row:
            passkey += f" ({row['original_passkey']['accuracy']:.2f})"
        lines.append(
            f"| {n} | {row['perplexity']:.3f} | {_num(original)} | {change} | {fractions} | "
            f"{_num(row.get('projected_cost'))} | {_num(row.get('real_cost'))} | {passkey} |"
        )
    for n, row in results.items():
        if row.get("layers"):
            costs = ", ".join(f"{layer['real_cost']:.2f}" for layer in row["layers"])
            lines.append(f"\nReal cost per layer at {n}: {costs}")
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def threshold_frontier(model, tokenizer, documents: Sequence[str], lengths: Sequence[int],
                       thresholds: Sequence[float], *, base=None, max_blocks: int = 8,
                       progress: bool = True) -> list[dict]:
    """Perplexity against real attention cost with no retraining: `auto` routing at each uncertainty
    threshold (a token more uncertain than it goes full), plus every token forced onto each cheap
    expert, at each length. The original's perplexity is measured once per length."""
    from tqdm.auto import tqdm

    from ..core.control import force_expert

    thresholds = sorted(float(t) for t in thresholds)
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"--sweep-threshold {thresholds}: give thresholds in (0, 1]")
    lengths = check_lengths(model, lengths)
    module = meta_attention_modules(model)[0]
    cheap = [name for name in module.expert_names if name != module.expert_names[module.full_index]]
    points = []
    for n in lengths:
        blocks = blocks_of(documents, tokenizer, n, max_blocks)
        original = read_blocks(base, blocks, routed=False)["perplexity"] if base is not None else None
        runs = [(f"auto {t:g}", t, routing_for_eval(model, "auto", uncertainty_threshold=t)) for t in thresholds]
        runs += [(f"all {name}", None, force_expert(model, name)) for name in cheap]
        for label, threshold, routing in tqdm(runs, desc=f"frontier at {n}", disable=not progress):
            with routing:
                row = read_blocks(model, blocks, routed=True)
            points.append({"length": n, "point": label, "threshold": threshold,
                           "perplexity": row["perplexity"], "original_perplexity": original,
                           "real_cost": row["real_cost"], "projected_cost": row["projected_cost"],
                           "expert_fractions": row["routing"]["expert_fractions"]})
    return points


def frontier_markdown(points: Sequence[dict]) -> str:
    lines = ["| length | point | perplexity | vs original | real cost | full / kernel / local |",
             "|---|---|---|---|---|---|"]
    for p in points:
        change = "-" if p["original_perplexity"] is None else f"{p['perplexity'] / p['original_perplexity'] - 1:+.1%}"
        fractions = " / ".join(f"{f:.2f}" for f in p["expert_fractions"])
        lines.append(f"| {p['length']} | {p['point']} | {p['perplexity']:.3f} | {change} | {p['real_cost']:.3f} "
                     f"| {fractions} |")
    return "\n".join(lines) + "\n"


def frontier_png(points: Sequence[dict], title: str) -> bytes:
    """The curve per length (auto thresholds), the forced cheap experts as marked points."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for n in sorted({p["length"] for p in points}):
        curve = [p for p in points if p["length"] == n and p["threshold"] is not None]
        line, = ax.plot([p["real_cost"] for p in curve], [p["perplexity"] for p in curve], "o-", label=f"auto, T={n}")
        for p in points:
            if p["length"] == n and p["threshold"] is None:
                ax.plot(p["real_cost"], p["perplexity"], "s", color=line.get_color())
                ax.annotate(p["point"], (p["real_cost"], p["perplexity"]), fontsize=7)
        if curve and curve[0]["original_perplexity"] is not None:
            ax.axhline(curve[0]["original_perplexity"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("real attention cost (of full causal attention)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")  # a forced cheap expert can be orders of magnitude off
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Description": "ma-convert report"})
    return buffer.getvalue()
