"""Plot bench_attention results: time (ms, log scale) against T (log2 scale), SDPA and each routed backend.

    python benchmarks/plot_attention.py benchmarks/results/attention_<device>.json [--out file.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot_results(data: dict, path: Path) -> Path | None:
    """Write the PNG; returns its path, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None

    rows = data["results"]
    series = {"SDPA (causal)": [(r["T"], r["sdpa"].get("median_ms")) for r in rows]}
    for name in data["config"]["backends"]:
        series[f"routed, backend={name}"] = [(r["T"], r["backends"][name].get("median_ms")) for r in rows]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points = [(t, ms) for t, ms in points if ms is not None]  # unavailable or failed: no point
        if points:
            style = dict(color="black", linestyle="--") if label.startswith("SDPA") else {}
            ax.plot(*zip(*points), marker="o", label=label, **style)
    ax.set_xscale("log", base=2)
    lengths = [r["T"] for r in rows]
    ax.set_xticks(lengths, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in lengths])
    ax.minorticks_off()  # log-scale minor ticks would clutter the few T values
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("time (ms, median)")
    cfg = data["config"]
    ax.set_title(f"{data['environment']['device']}\n{cfg['heads']}/{cfg['kv_heads']} heads, d={cfg['head_dim']}, "
                 f"W={cfg['window']}, {cfg['dtype'].replace('torch.', '')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_file", type=Path)
    p.add_argument("--out", type=Path, help="default: the JSON file's name with .png")
    args = p.parse_args(argv)
    plot_results(json.loads(args.json_file.read_text()), args.out or args.json_file.with_suffix(".png"))


if __name__ == "__main__":
    main()
