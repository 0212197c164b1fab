"""Router-finetune step time on a SmolLM2-135M-shaped model (random weights), and where it goes.

One update = the teacher pass (forced full, no grad) + the student's soft-routed forward and
backward, as `ma_convert.training.loop` runs it. Prints the median step time, tokens/s, and the
profiler's top operators, so a slow phase is visible before a long GPU run is spent on it.

    python benchmarks/bench_train_step.py [--seq-len 2048] [--batch-size 1] [--steps 8] [--gradient-checkpointing]

It also prints the peak memory: the GPU's peak allocation, or on the CPU the process's peak resident size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import log, pick_device, synchronize  # noqa: E402

import ma_convert  # noqa: E402
from ma_convert.core.control import collect_aux_losses, set_routing_mode  # noqa: E402
from ma_convert.training.loop import enable_gradient_checkpointing, train_routers_only  # noqa: E402
from ma_convert.training.objective import distillation_loss, teacher_logits  # noqa: E402
from ma_convert.training.params import freeze_all_but_routers_and_experts  # noqa: E402


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mode", choices=["soft", "hard"], default="soft")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="print the profiler's top operators of one step")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (recipe: training.gradient_checkpointing)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = ma_convert.convert(smollm2_shaped(args.layers), window_size=256).to(device)
    freeze_all_but_routers_and_experts(model)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    train_routers_only(model)
    model.train()
    set_routing_mode(model, args.mode)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    ids = torch.randint(0, 49152, (args.batch_size, args.seq_len), device=device)

    def step():
        teacher = teacher_logits(model, ids)
        logits = model(input_ids=ids).logits
        loss = distillation_loss(logits, teacher) + collect_aux_losses(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    times = []
    for i in range(args.steps + 2):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    peak = peak_memory_gib(device)
    log(f"{args.mode} step, {args.layers} layers, {args.batch_size}x{args.seq_len}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}: median {median * 1e3:.0f} ms "
        f"({tokens / median:,.0f} tokens/s), peak memory {peak:.2f} GiB on {device}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    return {"median_s": median, "tokens_per_s": tokens / median, "peak_memory_gib": peak}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    main()
