"""Triton kernels that finish a routed decode step: the kernel expert's state, and the merge.

- `advance_state`: the kernel expert's state (S, z) after more keys, S += phi(k)^T v, z += phi(k),
  one program per kv head and feature half. A decode step adds one key (the hybrid's state lags
  the cache by its window); the first step after a prefill catches up the prompt's keys.
- `finish_decode`: per row and query head, the softmax experts' splits merged by their
  log-sum-exp, and for rows on the kernel expert phi(q) S / phi(q) z (pure linear), or its merge
  with the exact window part under one normaliser (the hybrid). One launch, no host sync.

The torch reference is the core's linear and hybrid experts (tests/test_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .triton_linear import _head_map, _key_phi


@triton.jit
def _advance_state(
    k_ptr, v_ptr, w_ptr, s_ptr, z_ptr, s_out_ptr, z_out_ptr,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    n_kv_heads, n_keys,
    HEDGEHOG: tl.constexpr, FEAT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    half = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h = pid_bh % n_kv_heads
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    cell = (pid_bh * FEAT + half * HEAD_DIM + offs_d[:, None]) * HEAD_DIM + offs_d[None, :]
    rows = pid_bh * FEAT + half * HEAD_DIM + offs_d
    acc = tl.load(s_ptr + cell, mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    z = tl.load(z_ptr + rows, mask=d_ok, other=0.0)
    w = _head_map(w_ptr, h, offs_d, d_ok, HEAD_DIM, HEDGEHOG)
    for t0 in range(0, n_keys, BLOCK_T):
        t = t0 + offs_t
        ok = (t < n_keys)[:, None] & d_ok[None, :]
        k_rows = k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt
        v_rows = v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vt
        k = tl.load(k_rows + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(v_rows + offs_d[None, :], mask=ok, other=0.0)
        phi = tl.where(ok, _key_phi(k, w, half, d_ok, HEDGEHOG), 0.0).to(k.dtype)
        acc += tl.dot(tl.trans(phi), v.to(k.dtype))
        z += tl.sum(phi.to(tl.float32), 0)
    tl.store(s_out_ptr + cell, acc, mask=d_ok[:, None] & d_ok[None, :])
    tl.store(z_out_ptr + rows, z, mask=d_ok)


def advance_state(k_weight, k: torch.Tensor, v: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
    """The state (S, z) float32, (B, Hkv, F, d) and (B, Hkv, F), after also the keys k, v (B, Hkv, n, d)
    (any strides with a unit last one). `k_weight`: the Hedgehog map's (Hkv, d, d), None for ELU+1.
    Returns new tensors; `state` is left as it was."""
    b, h, n, d = k.shape
    hedgehog = k_weight is not None
    s0, z0 = state[0].contiguous(), state[1].contiguous()
    s1, z1 = torch.empty_like(s0), torch.empty_like(z0)
    launch(_advance_state, (b * h, 2 if hedgehog else 1),
        k, v, k_weight.contiguous() if hedgehog else k, s0, z0, s1, z1,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, n,
        HEDGEHOG=hedgehog, FEAT=s0.shape[2], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_T=16 if n <= 16 else 64, num_warps=4,
    )
    return s1, z1


@triton.jit
def _kernel_half(phi, s_ptr, z_ptr, base, offs_d, d_ok, HEAD_DIM: tl.constexpr):
    """phi . S and phi . z over one half of the feature rows starting at `base`."""
    cell = (base + offs_d[:, None]) * HEAD_DIM + offs_d[None, :]
    s = tl.load(s_ptr + cell, mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    z = tl.load(z_ptr + base + offs_d, mask=d_ok, other=0.0)
    return tl.sum(phi[:, None] * s, 0), tl.sum(phi * z, 0)


@triton.jit
def _finish_decode(
    part_out_ptr, part_lse_ptr, q_ptr, w_ptr, s_ptr, z_ptr, logw_ptr, route_ptr, out_ptr,
    stride_qb, stride_qh, n_q_heads, group, n_splits, kernel_expert,
    HEDGEHOG: tl.constexpr, HYBRID: tl.constexpr, FEAT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // n_q_heads
    h = pid % n_q_heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    d_ok = offs_d < HEAD_DIM
    s_ok = offs_s < n_splits

    # The softmax splits, weighted by 2^(lse_s - max); splits that read nothing weigh 0.
    lse = tl.load(part_lse_ptr + pid * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    served = top > float("-inf")
    w = tl.where(s_ok, tl.exp2(lse - tl.where(served, top, 0.0)), 0.0)  # exp2(-inf) = 0: splits that read nothing
    total = tl.maximum(tl.sum(w, 0), 1e-30)
    parts = tl.load(part_out_ptr + (pid * n_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / total

    if tl.load(route_ptr + b) == kernel_expert:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        state = (b * (n_q_heads // group) + h // group) * FEAT
        if HEDGEHOG:
            wq = tl.load(w_ptr + h * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :],
                         mask=d_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            x = tl.sum(q[:, None] * wq, 0)
            e = tl.exp(tl.where(d_ok, x, float("-inf")) - tl.max(tl.where(d_ok, x, float("-inf")), 0))
            num, den = _kernel_half(e / tl.sum(e, 0), s_ptr, z_ptr, state, offs_d, d_ok, HEAD_DIM)
            e = tl.exp(tl.where(d_ok, -x, float("-inf")) - tl.max(tl.where(d_ok, -x, float("-inf")), 0))
            num_b, den_b = _kernel_half(e / tl.sum(e, 0), s_ptr, z_ptr, state + HEAD_DIM, offs_d, d_ok, HEAD_DIM)
            num += num_b
            den += den_b
        else:
            phi = tl.where(d_ok, tl.where(q > 0, q + 1.0, tl.exp(q)), 0.0)
            num, den = _kernel_half(phi, s_ptr, z_ptr, state, offs_d, d_ok, HEAD_DIM)
        if HYBRID:  # (e^lse o + e^a N) / (e^lse + e^a D), on the exact part's scale
            lse_nat = tl.where(served, (top + tl.log2(total)) * 0.6931471805599453, -1e30)
            far = tl.exp(tl.minimum(tl.load(logw_ptr + h).to(tl.float32) - lse_nat, 80.0))
            out = (out + far * num) / tl.maximum(1.0 + far * den, 1e-6)
        else:
            out = num / tl.maximum(den, 1e-6)
    tl.store(out_ptr + pid * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def finish_decode(spec, q, part_out, part_lse, routes, state) -> torch.Tensor:
    """(B, Hq, 1, d) in q's dtype: the softmax splits of `softmax_decode_splits` merged, and rows
    routed to the kernel expert served from `state` (S, z) (for pure linear, the state after this
    token; for the hybrid, over the keys left of its window)."""
    b, hq, _, d = q.shape
    s, z = state[0].contiguous(), state[1].contiguous()
    out = torch.empty(b, hq, 1, d, device=q.device, dtype=q.dtype)
    n_splits = part_out.shape[2]
    hedgehog = spec.q_map_weight is not None
    launch(_finish_decode, (b * hq,),
        part_out, part_lse, q, spec.q_map_weight if hedgehog else q, s, z,
        spec.log_weight if spec.hybrid else q, routes, out,
        q.stride(0), q.stride(1), hq, hq // s.shape[1], n_splits, spec.kernel,
        HEDGEHOG=hedgehog, HYBRID=spec.hybrid, FEAT=s.shape[2], HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_S=max(2, triton.next_power_of_2(n_splits)), num_warps=2,
    )
    return out
