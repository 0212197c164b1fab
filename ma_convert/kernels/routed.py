"""Hard-routed attention on the GPU: every expert runs on its own tokens only.

`routed_heads` is what `MetaAttention` calls at inference when every token has exactly one expert
(hard top-1 routing, or forced routes) and the inputs allow it (CUDA, fp16/bf16, no padding mask or
additive bias, the three built-in experts). It takes tensors and a `RoutedSpec`, nothing else:

- prefill (T > 1): tokens are sorted by (expert, position) on the GPU, once; one Triton launch per
  softmax expert (full, local) runs it on its own tokens, reading their queries and writing their
  outputs in place. The kernel expert computes phi(k) and chunk states once per kv head; pure
  linear, it serves its tokens in one more launch; the hybrid serves the kernel part of its tokens
  (keys before the window) that way, into a float32 buffer the exact part's launch (window and
  sinks) merges with one normaliser. No host sync (the launches size their grids for every token
  and the programs past their expert's share exit at once), so a prefill can be captured too.
- decode (one new token per row): each row reads only what its expert needs: the whole cache
  (full), its window (local, hybrid) or the float32 state (linear, and the hybrid's part beyond its
  window). No host sync, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import triton_linear, triton_softmax
from .features import features
from .spec import RoutedSpec

# Triton launch settings per softmax expert (best of a sweep on an H100, d=128, bf16): the full
# expert's blocks walk long key ranges, the windowed experts' a window.
PREFILL_CONFIGS = {
    "full": dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    "local": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
    "kernel": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
}


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
    backend: str = "triton",
    state: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Heads (B, Hq, T, d) of hard-routed attention, routes (B, T) long: one expert per token.

    q (B, Hq, T, d) are the last T of the keys k, v (B, Hkv, Tk, d). `state` (S, z): for the
    linear expert the keys before this call's; for the hybrid, decoding, its keys left of the
    window. Returns the heads and, for the linear expert, the state after this call's keys.
    """
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if q.shape[2] == 1 and k.shape[2] > 1:
        return _decode(spec, q, k, v, routes, scale, state)
    return _prefill(spec, q, k, v, routes, scale, backend, state)


def _prefill(spec, q, k, v, routes, scale, backend, state):
    from .gather import sort_by_expert

    b, hq, t, d = q.shape
    perm, counts, seg_start = sort_by_expert(routes, spec.n_experts)
    out = torch.empty(b, t, hq, d, device=q.device, dtype=q.dtype)
    kernel_part, next_state = _kernel_expert(spec, q, k, v, perm, seg_start, counts, out, state)
    if backend == "flex":
        _flex_softmax(spec, q, k, v, routes, out, scale)
    for name in ("full", "local", "kernel"):
        if (name == "kernel" and kernel_part is None) or (backend == "flex" and name != "kernel"):
            continue
        merge = dict(linear=kernel_part, log_weight=spec.log_weight) if name == "kernel" else {}
        triton_softmax.routed_softmax_prefill(
            q, k, v, out, perm, seg_start, counts, spec.table(name, q.device), scale=scale,
            **PREFILL_CONFIGS[name], **merge,
        )
    return out.transpose(1, 2), next_state


def _kernel_expert(spec, q, k, v, perm, seg_start, counts, out, state):
    """The kernel expert's tokens. Pure linear: their outputs, written into `out`, and the state after
    all keys. Hybrid: the kernel part of each (keys before its window), a float32 (B, T, Hq, d + 1)
    numerator-and-denominator buffer for the exact part's launch to merge."""
    if spec.hybrid:
        phi_k, s, z, _ = triton_linear.key_features_and_states(spec.k_map_weight, k, v, None, first_key=spec.kernel_sinks)
        raw = torch.empty(*out.shape[:3], out.shape[3] + 1, device=q.device, dtype=torch.float32)
        triton_linear.routed_linear_prefill(
            q, phi_k, v, (s, z), raw, perm, seg_start, counts, spec.kernel, q_map_weight=spec.q_map_weight,
            shift=spec.kernel_window,
        )
        return raw, None
    t = q.shape[2]
    lk, lv = k[:, :, -t:], v[:, :, -t:]  # the keys before this call are in `state`
    phi_k, s, z, final = triton_linear.key_features_and_states(spec.k_map_weight, lk, lv, state)
    triton_linear.routed_linear_prefill(
        q, phi_k, lv, (s, z), out, perm, seg_start, counts, spec.kernel, q_map_weight=spec.q_map_weight,
    )
    return None, final


def _flex_softmax(spec, q, k, v, routes, out, scale) -> None:
    """FlexAttention for the full and local experts on their gathered queries (one host sync each)."""
    from .flex import flex_routed_softmax
    from .gather import gather_queries, group_tokens

    offset = k.shape[2] - q.shape[2]
    settings = {spec.full: (spec.full_window, 0), spec.local: (spec.local_window, spec.local_sinks)}
    for index in (spec.full, spec.local):
        tokens = group_tokens(routes == index)
        if tokens.shape[1] == 0:
            continue
        window, sinks = settings[index]
        part = flex_routed_softmax(gather_queries(q, tokens), k, v, tokens, offset, window=window, sinks=sinks, scale=scale)
        valid = tokens >= 0
        rows = tokens.clamp_min(0)
        dst = out.gather(1, rows[:, :, None, None].expand(-1, -1, *out.shape[2:]))
        src = torch.where(valid[:, :, None, None], part.transpose(1, 2).to(out.dtype), dst)
        out.scatter_(1, rows[:, :, None, None].expand_as(src), src)


def _decode(spec, q, k, v, routes, scale, state):
    routes = routes[:, 0]
    out, lse = triton_softmax.routed_softmax_decode(
        q, k, v, routes.to(torch.int32), spec.table("window", q.device), spec.table("sinks", q.device), scale=scale,
    )
    if state is None:
        raise ValueError("decoding with the kernel expert needs its state (a cache)")
    kernel_rows = (routes == spec.kernel)[:, None, None, None]
    if spec.hybrid:
        num, den = kernel_part(spec.q_map_weight, q, state)
        mixed = merge_exact_and_kernel(out, lse, num, den, spec.log_weight)
        return torch.where(kernel_rows, mixed, out).to(q.dtype), None
    lin, next_state = linear_decode_step(spec.q_map_weight, spec.k_map_weight, q, k[:, :, -1:], v[:, :, -1:], state)
    return torch.where(kernel_rows, lin, out).to(q.dtype), next_state


def kernel_part(q_weight, q, state):
    """phi(q) S and phi(q) z for one query per row: q (B, Hq, 1, d), S (B, Hkv, F, d), z (B, Hkv, F)."""
    b, hq, _, d = q.shape
    hkv, f = state[0].shape[1], state[0].shape[2]
    phi_q = features(q.float(), q_weight).reshape(b * hkv, hq // hkv, f)
    num = torch.bmm(phi_q, state[0].reshape(b * hkv, f, d))
    den = torch.bmm(phi_q, state[1].reshape(b * hkv, f, 1))
    return num.reshape(b, hq, 1, d), den.reshape(b, hq, 1)


def merge_exact_and_kernel(exact, lse2, num, den, log_weight):
    """The hybrid's output from its exact part (normalised, with its log2-sum-exp) and its kernel part
    (numerator and denominator), weighted by exp(log_weight[h]): (e^lse o + e^a N) / (e^lse + e^a D)."""
    a = log_weight.float().view(1, -1, 1)
    lse = torch.where(torch.isfinite(lse2), lse2 * math.log(2.0), -1e30)
    f = torch.exp((a - lse).clamp_max(80.0))  # e^(a - lse): the kernel part on the exact part's scale
    return (exact + f[..., None] * num) / (1.0 + f * den).clamp_min(1e-6)[..., None]


def linear_decode_step(q_weight, k_weight, q, k, v, state):
    """The linear expert for one new token per row: S += phi(k) v^T (one batched matmul), then
    phi(q) S / phi(q) z. q (B, Hq, 1, d); k, v (B, Hkv, 1, d); state (S, z) before this token.
    Returns the fp32 output and the state after it."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    phi_k = features(k.float(), k_weight)  # (B, Hkv, 1, F)
    f = phi_k.shape[-1]
    s0, z0 = state[0].reshape(b * hkv, f, d), state[1]
    s = torch.baddbmm(s0, phi_k.reshape(b * hkv, 1, f).transpose(1, 2), v.float().reshape(b * hkv, 1, d))
    z = z0 + phi_k[:, :, 0]
    num, den = kernel_part(q_weight, q, (s.view(b, hkv, f, d), z))
    return num / den.clamp_min(1e-6)[..., None], (s.view(b, hkv, f, d), z)
