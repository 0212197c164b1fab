"""Triton kernels for the linear expert under hard routing.

out_i = phi(q_i) . S_i / phi(q_i) . z_i, S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j).

- `key_features_and_states`: one pass over the keys per kv head (no GQA repeats) computes phi(k)
  and each chunk's sum of phi(k) v^T in fp32; a running sum over chunks turns them into the state
  before every chunk (and after the last, for the cache).
- `routed_linear_prefill` serves only the tokens routed to the linear expert: a block of them
  (sorted by position) reads the state at the chunk of its first token, then walks the keys from
  that chunk to its last token quadratically. Its queries' feature map (ELU+1 or Hedgehog) runs
  inside the kernel, on the gathered queries only; outputs go straight to their rows of `out`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

CHUNK = 128  # keys per state chunk: a block of queries walks at most one chunk plus its own span


@triton.jit
def _phi(x, HEDGEHOG: tl.constexpr, NEGATIVE: tl.constexpr):
    """One half of the feature map on fp32 rows: softmax(+-x) (Hedgehog) or elu(x) + 1."""
    if HEDGEHOG:
        if NEGATIVE:
            x = -x
        e = tl.exp(x - tl.max(x, 1)[:, None])
        return e / tl.sum(e, 1)[:, None]
    else:
        return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def _head_map(w_ptr, h, offs_d, d_ok, HEAD_DIM: tl.constexpr, HEDGEHOG: tl.constexpr):
    """Head h's Hedgehog map W_h (d, d); ELU+1 has none (a placeholder)."""
    if HEDGEHOG:
        w = tl.load(w_ptr + h * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        w = tl.zeros([1], tl.float32)
    return w


@triton.jit
def _key_phi(k, w, half, d_ok, HEDGEHOG: tl.constexpr):
    """One half of phi(k) for a block of keys (rows): softmax(+-k W) in fp32 (the product in k's
    dtype), or elu(k) + 1."""
    if HEDGEHOG:
        x = tl.dot(k, w.to(k.dtype))
        x = tl.where(d_ok[None, :], x, tl.where(half == 0, float("-inf"), float("inf")))
        phi = tl.where(half == 0, _phi(x, True, False), _phi(x, True, True))
    else:
        phi = _phi(k.to(tl.float32), False, False)
    return phi


@triton.jit
def _key_features_and_chunk_states(
    k_ptr, v_ptr, w_ptr, phik_ptr, s_ptr, z_ptr,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    n_kv_heads, n_keys, n_chunks, first_key,
    HEDGEHOG: tl.constexpr, FEAT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """For one chunk of keys and one half of the features (Hedgehog has two: softmax of +-kW):
    phi(k) (stored in k's dtype) and the chunk's sums phi(k)^T v and phi(k), in fp32. Keys before
    `first_key` (the hybrid's sinks, which stay exact) get phi = 0."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    half = tl.program_id(2)
    b = pid_bh // n_kv_heads
    h = pid_bh % n_kv_heads
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    w = _head_map(w_ptr, h, offs_d, d_ok, HEAD_DIM, HEDGEHOG)
    acc = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(c * CHUNK_SIZE, (c + 1) * CHUNK_SIZE, BLOCK_T):
        t = t0 + offs_t
        ok = (t < n_keys)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + offs_d[None, :], mask=ok, other=0.0)
        phi = _key_phi(k, w, half, d_ok, HEDGEHOG)
        phi = tl.where(ok & (t >= first_key)[:, None], phi, 0.0).to(k.dtype)  # keys past the end add nothing
        tl.store(phik_ptr + ((pid_bh * n_keys + t[:, None]) * FEAT + half * HEAD_DIM + offs_d[None, :]), phi, mask=ok)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + offs_d[None, :], mask=ok, other=0.0)
        acc += tl.dot(tl.trans(phi), v.to(k.dtype))
        z += tl.sum(phi.to(tl.float32), 0)
    row = (pid_bh * (n_chunks + 1) + c + 1) * FEAT + half * HEAD_DIM + offs_d  # slot 0: the carried state
    tl.store(s_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=d_ok[:, None] & d_ok[None, :])
    tl.store(z_ptr + row, z, mask=d_ok)


def key_features_and_states(k_weight, k: torch.Tensor, v: torch.Tensor, state=None, first_key: int = 0,
                            keep_end: bool = True):
    """phi(k) (B, Hkv, Tk, F) in k's dtype; the fp32 states before every chunk, S (B, Hkv, nC + 1, F, d)
    and z (B, Hkv, nC + 1, F) (the last slot: after all keys); and the state after all keys.
    `k_weight` is the Hedgehog map's (Hkv, d, d), None for ELU+1; `state` = (S0, z0) summarises
    earlier keys; keys before `first_key` are left out (phi = 0). Without `keep_end` (the hybrid, which
    keeps no state from a prefill) the state after all keys is not returned (None)."""
    b, h, t, d = k.shape
    hedgehog = k_weight is not None
    feat = 2 * d if hedgehog else d
    n_chunks = triton.cdiv(t, CHUNK)
    block_d = max(16, triton.next_power_of_2(d))
    phi_k = torch.empty(b, h, t, feat, device=k.device, dtype=k.dtype)
    s = torch.empty(b, h, n_chunks + 1, feat, d, device=k.device, dtype=torch.float32)
    z = torch.empty(b, h, n_chunks + 1, feat, device=k.device, dtype=torch.float32)
    w = k_weight.contiguous() if hedgehog else k
    launch(_key_features_and_chunk_states, (b * h, n_chunks, 2 if hedgehog else 1),
        k, v, w, phi_k, s, z,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        h, t, n_chunks, first_key,
        HEDGEHOG=hedgehog, FEAT=feat, HEAD_DIM=d, BLOCK_D=block_d, CHUNK_SIZE=CHUNK, BLOCK_T=64,
        num_warps=4, num_stages=2,
    )
    # Slot 0 takes the carried state; a running sum over slots makes slot c the state before chunk c.
    s_end = torch.empty(b, h, feat, d, device=k.device, dtype=torch.float32) if keep_end else s
    z_end = torch.empty(b, h, feat, device=k.device, dtype=torch.float32) if keep_end else z
    s0, z0 = (s, z) if state is None else (state[0].contiguous(), state[1].contiguous())
    rows = 8  # feature rows per program: 8 x d contiguous cells
    launch(_chunk_prefix_sums, (b * h, triton.cdiv(feat, rows)),
        s, z, s0, z0, s_end, z_end, n_chunks + 1,
        FEAT=feat, HEAD_DIM=d, BLOCK_F=rows, BLOCK_C=triton.next_power_of_2(rows * d), BLOCK_S=16,
        HAS_STATE=state is not None, KEEP_END=keep_end, num_warps=4,
    )
    return phi_k, s, z, ((s_end, z_end) if keep_end else None)


@triton.jit
def _chunk_prefix_sums(
    s_ptr, z_ptr, s0_ptr, z0_ptr, s_end_ptr, z_end_ptr, n_slots,
    FEAT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_STATE: tl.constexpr, KEEP_END: tl.constexpr,
):
    """In place, for one kv head and a block of feature rows: slot 0 = the carried state (or zero),
    slot c += slot c - 1; with KEEP_END, the state after every key is also written apart. BLOCK_S
    slots at a time (a cumsum over the block plus the carry), so the dependent chain is
    n_slots / BLOCK_S steps long, not n_slots: a sequential walk was latency-bound."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit: a long prompt's chunk states can pass 2^31 elements
    first_row = tl.program_id(1) * BLOCK_F
    rows = first_row + tl.arange(0, BLOCK_F)
    row_ok = rows < FEAT
    offs_c = tl.arange(0, BLOCK_C)  # the block's rows x HEAD_DIM cells are contiguous
    cell = first_row * HEAD_DIM + offs_c
    ok = (offs_c < BLOCK_F * HEAD_DIM) & (cell < FEAT * HEAD_DIM)
    if HAS_STATE:
        carry_s = tl.load(s0_ptr + bh * FEAT * HEAD_DIM + cell, mask=ok, other=0.0)
        carry_z = tl.load(z0_ptr + bh * FEAT + rows, mask=row_ok, other=0.0)
    else:
        carry_s = tl.zeros([BLOCK_C], tl.float32)
        carry_z = tl.zeros([BLOCK_F], tl.float32)
    s_base = s_ptr + bh * n_slots * FEAT * HEAD_DIM
    z_base = z_ptr + bh * n_slots * FEAT
    tl.store(s_base + cell, carry_s, mask=ok)
    tl.store(z_base + rows, carry_z, mask=row_ok)
    offs_s = tl.arange(0, BLOCK_S)
    for first in range(1, n_slots, BLOCK_S):
        slots = (first + offs_s).to(tl.int64)
        s_at = s_base + slots[:, None] * (FEAT * HEAD_DIM) + cell[None, :]
        z_at = z_base + slots[:, None] * FEAT + rows[None, :]
        s_ok = (slots < n_slots)[:, None] & ok[None, :]
        z_ok = (slots < n_slots)[:, None] & row_ok[None, :]
        part_s = tl.load(s_at, mask=s_ok, other=0.0)
        part_z = tl.load(z_at, mask=z_ok, other=0.0)
        tl.store(s_at, tl.cumsum(part_s, 0) + carry_s[None, :], mask=s_ok)
        tl.store(z_at, tl.cumsum(part_z, 0) + carry_z[None, :], mask=z_ok)
        carry_s += tl.sum(part_s, 0)
        carry_z += tl.sum(part_z, 0)
    if KEEP_END:
        tl.store(s_end_ptr + bh * FEAT * HEAD_DIM + cell, carry_s, mask=ok)
        tl.store(z_end_ptr + bh * FEAT + rows, carry_z, mask=row_ok)


@triton.jit
def _intra_half(phi_lp, pk_base, kpos, k_ok, offs_f, stride_pt, F_OFFSET: tl.constexpr, HEAD_DIM: tl.constexpr):
    pk = tl.load(pk_base + kpos[None, :] * stride_pt + (F_OFFSET + offs_f[:, None]),
                 mask=k_ok[None, :] & (offs_f[:, None] < HEAD_DIM), other=0.0)
    return tl.dot(phi_lp, pk)


@triton.jit
def query_features(q, w_ptr, first_head, row_head, offs_d, d_ok,
                   HEAD_DIM: tl.constexpr, HEDGEHOG: tl.constexpr, PACK: tl.constexpr):
    """phi(q) of a block of query rows, as two fp32 halves (Hedgehog: softmax(+-q W_h); ELU+1: the
    same half twice). Row r is a query of head first_head + row_head[r], row_head in [0, PACK): the
    rows of a GQA-packed block carry different heads, each with its own map."""
    if HEDGEHOG:
        x = tl.dot(q, _head_map(w_ptr, first_head, offs_d, d_ok, HEAD_DIM, True).to(q.dtype))
        for i in tl.static_range(1, PACK):
            x_i = tl.dot(q, _head_map(w_ptr, first_head + i, offs_d, d_ok, HEAD_DIM, True).to(q.dtype))
            x = tl.where((row_head == i)[:, None], x_i, x)
        phi_a = _phi(tl.where(d_ok[None, :], x, float("-inf")), True, False)
        phi_b = _phi(tl.where(d_ok[None, :], x, float("inf")), True, True)
    else:
        phi_a = tl.where(d_ok[None, :], _phi(q.to(tl.float32), False, False), 0.0)
        phi_b = phi_a
    return phi_a, phi_b


@triton.jit
def kernel_sums(
    phi_a, phi_b, last_key, row_ok, s_ptr, z_ptr, first_slot, pk_base, stride_pt, v_base, stride_vt,
    offs_d, d_ok, offs_n,
    HEDGEHOG: tl.constexpr, FEAT: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Kernel attention of a block of query rows (one kv head) over keys 0 .. last_key[r] (none
    when negative): the numerator (rows, d) and denominator (rows,), unnormalised, in fp32. The
    state before the chunk of the block's smallest last_key comes from the chunk states (the kv
    head's slots start at `first_slot`); the keys from that chunk on are walked quadratically."""
    lo = tl.maximum(tl.min(tl.where(row_ok, last_key, 1 << 30), 0), 0)
    hi = tl.max(tl.where(row_ok, last_key, -1), 0)
    c0 = lo // CHUNK_SIZE
    slot = first_slot + c0
    s_base = s_ptr + slot * FEAT * HEAD_DIM
    cell = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    cell_ok = d_ok[:, None] & d_ok[None, :]
    num = tl.dot(phi_a, tl.load(s_base + cell, mask=cell_ok, other=0.0))
    den = tl.sum(phi_a * tl.load(z_ptr + slot * FEAT + offs_d, mask=d_ok, other=0.0)[None, :], 1)
    if HEDGEHOG:
        num += tl.dot(phi_b, tl.load(s_base + HEAD_DIM * HEAD_DIM + cell, mask=cell_ok, other=0.0))
        den += tl.sum(phi_b * tl.load(z_ptr + slot * FEAT + HEAD_DIM + offs_d, mask=d_ok, other=0.0)[None, :], 1)
    lp = v_base.dtype.element_ty
    phi_a_lp = phi_a.to(lp)
    phi_b_lp = phi_b.to(lp)
    for n0 in range(c0 * CHUNK_SIZE, hi + 1, BLOCK_N):
        kpos = n0 + offs_n
        k_ok = kpos <= hi
        s = _intra_half(phi_a_lp, pk_base, kpos, k_ok, offs_d, stride_pt, 0, HEAD_DIM)
        if HEDGEHOG:
            s += _intra_half(phi_b_lp, pk_base, kpos, k_ok, offs_d, stride_pt, HEAD_DIM, HEAD_DIM)
        s = tl.where(kpos[None, :] <= last_key[:, None], s, 0.0)
        vv = tl.load(v_base + kpos[:, None] * stride_vt + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                     other=0.0)
        num += tl.dot(s.to(lp), vv)
        den += tl.sum(s, 1)
    return num, den


@triton.jit
def _routed_linear_prefill(
    q_ptr, w_ptr, phik_ptr, v_ptr, s_ptr, z_ptr, out_ptr, perm_ptr, seg_start_ptr, seg_count_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_pb, stride_ph, stride_pt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_ot, stride_oh,
    stride_permb, stride_sb,
    n_q_heads, group, n_slots, key_offset, expert,
    HEDGEHOG: tl.constexpr, FEAT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hkv = h // group
    seg_start = tl.load(seg_start_ptr + b * stride_sb + expert)
    count = tl.load(seg_count_ptr + b * stride_sb + expert)
    if pid_blk * BLOCK_M >= count:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    rank = pid_blk * BLOCK_M + offs_m
    row_ok = rank < count
    token = tl.load(perm_ptr + b * stride_permb + seg_start + rank, mask=row_ok, other=0)
    q = tl.load(q_ptr + b * stride_qb + token[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    phi_a, phi_b = query_features(q, w_ptr, h, offs_m * 0, offs_d, d_ok, HEAD_DIM, HEDGEHOG, 1)
    num, den = kernel_sums(
        phi_a, phi_b, token + key_offset, row_ok, s_ptr, z_ptr, (b * (n_q_heads // group) + hkv) * n_slots,
        phik_ptr + b * stride_pb + hkv * stride_ph, stride_pt, v_ptr + b * stride_vb + hkv * stride_vh, stride_vt,
        offs_d, d_ok, offs_n, HEDGEHOG, FEAT, HEAD_DIM, CHUNK_SIZE, BLOCK_N,
    )
    out = num / tl.maximum(den, 1e-6)[:, None]
    tl.store(out_ptr + b * stride_ob + token[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def routed_linear_prefill(
    q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    states: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    perm: torch.Tensor,
    seg_start: torch.Tensor,
    seg_count: torch.Tensor,
    expert: int,
    *,
    q_map_weight,
) -> None:
    """Write the linear expert's outputs for its tokens into `out` (B, T, Hq, d), in place.

    q (B, Hq, T, d): all queries (only the expert's are read); phi_k (B, Hkv, Tk, F) and v: the
    keys this call attends over, the queries being their last T; states: `key_features_and_states`'
    S and z; q_map_weight (Hq, d, d) for Hedgehog, None for ELU+1.
    """
    b, hq, t, d = q.shape
    hkv, tk = phi_k.shape[1], phi_k.shape[2]
    # H200 sweep: 64 queries a block halve the state reads at d <= 64; at d=128 they spill.
    block_m = 64 if d <= 64 else 32
    hedgehog = q_map_weight is not None
    w = q_map_weight.contiguous() if hedgehog else q  # unused for ELU
    grid = (triton.cdiv(t, block_m), b * hq)
    launch(_routed_linear_prefill, grid,
        q, w, phi_k, v, states[0], states[1], out, perm, seg_start, seg_count,
        q.stride(0), q.stride(2), q.stride(1),
        phi_k.stride(0), phi_k.stride(1), phi_k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        perm.stride(0), seg_start.stride(0),
        hq, hq // hkv, states[0].shape[2], tk - t, expert,
        HEDGEHOG=hedgehog, FEAT=phi_k.shape[-1], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CHUNK_SIZE=CHUNK,
        BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=2,
    )
