"""Hard-routed attention on the GPU: every expert runs on its own tokens only.

`routed_heads` is what `MetaAttention` calls at inference when every token has exactly one expert
(hard top-1 routing, or forced routes) and the inputs allow it (CUDA, fp16/bf16, no padding mask or
additive bias, the three built-in experts). It takes tensors and a `RoutedSpec`, nothing else. No
prefill or decode step syncs with the host (grids are sized for every token, and programs past their
expert's share exit at once), so a decode step can be captured in a CUDA graph. docs/backends.md
("GPU fast path") lists the launches of a prefill and of a decode step.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import triton_decode, triton_linear, triton_routing, triton_softmax
from .spec import RoutedSpec

# Triton launch settings per softmax expert, for head sizes up to 64 and above (H200 sweeps at d=64,
# 2026-12-03, and H100/H200 sweeps at d=128; bf16): the full expert's blocks walk long key ranges, the
# windowed experts' a window; the hybrid's blocks also walk the rest of a state chunk with its
# kernel part. Below ONE_LAUNCH_BELOW every expert shares "local"'s.
PREFILL_CONFIGS = {
    "full": dict(block_m=64, block_n=128, num_warps=4, num_stages=3),
    "local": dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
    "kernel": dict(block_m=64, block_n=32, num_warps=4, num_stages=3),
}
WIDE_HEAD_CONFIGS = {
    "full": dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    "local": dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
    "kernel": dict(block_m=32, block_n=32, num_warps=4, num_stages=1),
}


def launch_settings(name: str, head_dim: int, with_hybrid: bool) -> dict:
    """The tiles of one softmax launch. Above 64 a launch serving the hybrid takes 32-query blocks and
    no pipelining: with 64-query blocks its d=80 GPU test failed on the H200 (Triton 3.6), and not for
    shared memory (offline sm_90 compiles need at most 98 KB); these tiles pass it."""
    settings = dict((PREFILL_CONFIGS if head_dim <= 64 else WIDE_HEAD_CONFIGS)[name])
    if with_hybrid and head_dim > 64:
        settings.update(block_m=32, num_stages=1)
    return settings


def unsupported_reason(spec: RoutedSpec, q: torch.Tensor, *, causal: bool, key_mask, attn_bias) -> Optional[str]:
    """Why the fast path cannot serve this call (None: it can)."""
    if spec.reason is not None:
        return spec.reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "the fast path runs in fp16/bf16"
    if not causal or key_mask is not None or attn_bias is not None:
        return "the fast path covers causal attention without padding masks or additive biases"
    return None


def routed_heads(
    spec: RoutedSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routes: torch.Tensor,
    *,
    scale: Optional[float],
    state: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Heads (B, Hq, T, d) of hard-routed attention, routes (B, T) int32 or int64: one expert per token.

    q (B, Hq, T, d) are the last T of the keys k, v (B, Hkv, Tk, d). `state` (S, z): for the
    linear expert the keys before this call's; for the hybrid, decoding, its keys left of the
    window. Returns the heads and, for the linear expert, the state after this call's keys.
    """
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if q.shape[2] == 1 and k.shape[2] > 1:
        return _decode(spec, q, k, v, routes, scale, state)
    return _prefill(spec, q, k, v, routes, scale, state)


# Below this many queries a prefill is bound by host work, not by the GPU: the softmax experts share
# one launch (with the windowed experts' tiles). From it, each runs with its own tuned tiles.
ONE_LAUNCH_BELOW = 16384


def _prefill(spec, q, k, v, routes, scale, state):
    b, hq, t, d = q.shape
    perm, counts, seg_start = triton_routing.sort_by_expert(routes, spec.n_experts)
    out = torch.empty(b, t, hq, d, device=q.device, dtype=q.dtype)
    hybrid, next_state = _kernel_expert(spec, q, k, v, perm, seg_start, counts, out, state)
    kernel = ("kernel",) if hybrid is not None else ()  # the hybrid's tokens: a softmax launch
    if t < ONE_LAUNCH_BELOW:
        names = ("softmax",)  # every softmax part in one launch, with the windowed experts' tiles
    else:
        names = ("full", "local") + kernel
    for name in names:
        merges = hybrid is not None and name in ("softmax", "kernel")
        triton_softmax.routed_softmax_prefill(
            q, k, v, out, perm, seg_start, counts, spec.table(name, q.device), scale=scale,
            hybrid=hybrid if merges else None, **launch_settings("local" if name == "softmax" else name, d, merges),
        )
    return out.transpose(1, 2), next_state


def _kernel_expert(spec, q, k, v, perm, seg_start, counts, out, state):
    """The kernel expert's tokens. Pure linear: their outputs, written into `out`, and the state after
    all keys. Hybrid: phi(k) and the chunk states, for the softmax launch that serves its tokens
    (window, sinks and kernel part in one program)."""
    if spec.hybrid:
        phi_k, s, z, _ = triton_linear.key_features_and_states(
            spec.k_map_weight, k, v, None, first_key=spec.kernel_sinks, keep_end=False)
        return dict(expert=spec.kernel, phi_k=phi_k, states=(s, z), q_map_weight=spec.q_map_weight,
                    log_weight=spec.log_weight), None
    t = q.shape[2]
    lk, lv = k[:, :, -t:], v[:, :, -t:]  # the keys before this call are in `state`
    phi_k, s, z, final = triton_linear.key_features_and_states(spec.k_map_weight, lk, lv, state)
    triton_linear.routed_linear_prefill(
        q, phi_k, lv, (s, z), out, perm, seg_start, counts, spec.kernel, q_map_weight=spec.q_map_weight,
    )
    return None, final


def _decode(spec, q, k, v, routes, scale, state):
    """Three launches: the linear expert's state takes in this token; the softmax experts' splits;
    their merge with the kernel part."""
    routes = routes[:, 0].to(torch.int32)
    if state is None:
        raise ValueError("decoding with the kernel expert needs its state (a cache)")
    next_state = None
    if not spec.hybrid:
        state = next_state = triton_decode.advance_state(spec.k_map_weight, k[:, :, -1:], v[:, :, -1:], state)
    part_out, part_lse = triton_softmax.softmax_decode_splits(
        q, k, v, routes, spec.table("window", q.device), spec.table("sinks", q.device), scale=scale,
    )
    return triton_decode.finish_decode(spec, q, part_out, part_lse, routes, state), next_state
