"""Print the per-step training loss of a 1-GPU and a 2-GPU run side by side, and their largest gap."""

import json
import sys

one, two = (json.load(open(f"{run}/results.json"))["history"] for run in sys.argv[1:3])
print("| step | 1 GPU loss | 2 GPUs loss | diff |\n|---|---|---|---|")
for step, (a, b) in enumerate(zip(one, two), start=1):
    print(f"| {step} | {a['loss']:.5f} | {b['loss']:.5f} | {b['loss'] - a['loss']:+.2e} |")
gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
print(f"\nmax |diff| {max(gaps):.2e}, mean |diff| {sum(gaps) / len(gaps):.2e}, "
      f"final loss {one[-1]['loss']:.4f} vs {two[-1]['loss']:.4f}")
