"""Triton kernels for the softmax experts (full and local) under hard routing.

Prefill: every query token has one expert. Tokens are sorted by (expert, position) once per layer
(`perm`), and each expert's tokens form one segment of it. A launch runs the softmax experts in
its `expert_meta` (all of them in one launch, or one launch each with its own tiles): a program
takes a block of its expert's tokens, reads their queries straight from q (the gather is
fused), walks only the keys those queries may see (causal, and the window for local), and writes
the outputs straight into their rows of `out` (the scatter is fused). Segment sizes stay on the
GPU: programs past the end of their segment exit, so no host sync is needed.

GQA: the `PACK` query heads of one kv head are packed into the rows of a block, so each key and
value tile loaded serves all of them.

Decode: one query per row, each row routed on its own. Flash-decoding style: the keys are split
into chunks that run in parallel; a row reads only the chunks its expert can see (all of them for
full, the window for local, none for linear), and the partial results are merged with their
log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .triton_linear import CHUNK, kernel_sums, query_features


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, qpos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, d_ok,
    start, end, window, sinks, sm_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax accumulation over keys [start, end) (exp2 domain). Unmasked calls get a
    block-aligned range every query may fully see, so their loads need no bounds either."""
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        k_ptrs = k_base + kpos[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + kpos[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k_ok = kpos < end
            k = tl.load(k_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        if MASKED:
            near = (qpos[:, None] - kpos[None, :] < window) | (kpos[None, :] < sinks)
            ok = (kpos[None, :] <= qpos[:, None]) & near & k_ok[None, :]
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _routed_softmax_prefill(
    q_ptr, k_ptr, v_ptr, out_ptr, perm_ptr, seg_start_ptr, seg_count_ptr, expert_ptr, window_ptr, sinks_ptr,
    phik_ptr, s_ptr, z_ptr, w_ptr, logw_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_ot, stride_oh,
    stride_fb, stride_fh, stride_ft,
    stride_pb, stride_sb,
    n_kv_heads, key_offset, sm_scale, merge_expert, n_slots,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr, HEDGEHOG: tl.constexpr,
    FEAT: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK  # tokens per block
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    slot = tl.program_id(2)  # which softmax expert of this launch
    subgroups: tl.constexpr = GROUP // PACK
    b = pid_bh // (n_kv_heads * subgroups)
    hkv = (pid_bh // subgroups) % n_kv_heads
    sub = pid_bh % subgroups

    expert = tl.load(expert_ptr + slot)
    window = tl.load(window_ptr + slot)
    sinks = tl.load(sinks_ptr + slot)
    seg_start = tl.load(seg_start_ptr + b * stride_sb + expert)
    count = tl.load(seg_count_ptr + b * stride_sb + expert)
    n_blocks = tl.cdiv(count, BLOCK_Q)
    if pid_blk >= n_blocks:
        return
    blk = n_blocks - 1 - pid_blk  # the last blocks see the most keys: start them first

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rank = blk * BLOCK_Q + offs_m // PACK
    row_ok = rank < count
    token = tl.load(perm_ptr + b * stride_pb + seg_start + rank, mask=row_ok, other=0)
    head = hkv * GROUP + sub * PACK + offs_m % PACK
    qpos = token + key_offset
    lo_pos = tl.min(tl.where(row_ok, qpos, 1 << 30), 0)
    hi_pos = tl.max(tl.where(row_ok, qpos, -1), 0)
    qpos = tl.where(row_ok, qpos, lo_pos)  # padding rows act as the block's first query

    q = tl.load(
        q_ptr + b * stride_qb + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    scale = sm_scale * 1.4426950408889634

    # Keys every query of the block may see need no mask: [max(lo, hi_pos - window + 1), lo_pos].
    lo = tl.maximum(lo_pos - window + 1, 0)
    clear_lo = tl.maximum(hi_pos - window + 1, lo)
    clear_lo = tl.cdiv(clear_lo, BLOCK_N) * BLOCK_N
    clear_hi = tl.maximum((lo_pos + 1) // BLOCK_N * BLOCK_N, clear_lo)
    if sinks > 0:  # sink keys below the window
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, qpos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d,
                                     d_ok, 0, tl.minimum(sinks, lo), window, sinks, scale, True, EVEN_D, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, qpos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d,
                                 d_ok, lo, tl.minimum(clear_lo, hi_pos + 1), window, sinks, scale, True, EVEN_D, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, qpos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d,
                                 d_ok, clear_lo, clear_hi, window, sinks, scale, False, EVEN_D, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, qpos, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d,
                                 d_ok, tl.maximum(clear_hi, lo), hi_pos + 1, window, sinks, scale, True, EVEN_D, BLOCK_N)
    if MERGE:  # the hybrid: its kernel part (keys left of the window) joins with weight exp(a_h)
        if expert == merge_expert:
            phi_a, phi_b = query_features(q, w_ptr, hkv * GROUP + sub * PACK, offs_m % PACK, offs_d, d_ok,
                                          HEAD_DIM, HEDGEHOG, PACK)
            num, den = kernel_sums(
                phi_a, phi_b, qpos - window, row_ok, s_ptr, z_ptr, (b * n_kv_heads + hkv) * n_slots,
                phik_ptr + b * stride_fb + hkv * stride_fh, stride_ft, v_base, stride_vn, offs_d, d_ok, offs_n,
                HEDGEHOG, FEAT, HEAD_DIM, CHUNK_SIZE, BLOCK_N,
            )
            far = tl.exp2(tl.load(logw_ptr + head) * 1.4426950408889634 - m_i)  # m_i: finite, the query sees itself
            acc += far[:, None] * num
            l_i += far * den
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )


def _pack(group: int, block_m: int) -> int:
    """Query heads packed per block: the largest power of two dividing the GQA group, <= 8."""
    pack = 1
    while pack < 8 and group % (pack * 2) == 0 and block_m // (pack * 2) >= 16:
        pack *= 2
    return pack


def routed_softmax_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    perm: torch.Tensor,
    seg_start: torch.Tensor,
    seg_count: torch.Tensor,
    expert_meta: torch.Tensor,
    *,
    scale: float,
    block_m: int = 128,
    block_n: int = 128,
    num_warps: int = 8,
    num_stages: int = 2,
    hybrid: dict | None = None,
) -> None:
    """Write the outputs of the softmax experts' tokens into `out`, in place.

    q (B, Hq, T, d) and k, v (B, Hkv, Tk, d), any strides with a unit last one; queries are the
    last T keys. out (B, T, Hq, d). perm (B, T) int32: token indices sorted by (expert, position);
    seg_start / seg_count (B, E) int32: where each expert's segment of `perm` starts and its size.
    expert_meta (3, S) int32 on the device: the expert index, window (NO_WINDOW: every earlier
    key) and sink tokens of each softmax expert to run (one launch serves them all). With `hybrid`
    (a dict: the hybrid's `expert` index, `phi_k` (B, Hkv, Tk, F) and the chunk `states` (S, z) of
    `triton_linear.key_features_and_states`, the `q_map_weight` (Hq, d, d) (None: ELU+1) and the
    `log_weight` (Hq,)), that expert is the hybrid: each of its queries' softmax over its window and
    sinks merges, under one running maximum and normaliser, with its kernel part over the keys left
    of its window, computed in the same program and weighted by exp(log_weight).
    """
    b, hq, t, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    pack = _pack(group, block_m)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(t, block_m // pack), b * hkv * (group // pack), expert_meta.shape[1])
    merge = hybrid is not None
    part = hybrid if merge else dict(expert=-1, phi_k=k, states=(k, k), q_map_weight=None, log_weight=k)  # unread
    phi_k, (s, z), w = part["phi_k"], part["states"], part["q_map_weight"]
    launch(_routed_softmax_prefill, grid,
        q, k, v, out, perm, seg_start, seg_count, expert_meta[0], expert_meta[1], expert_meta[2],
        phi_k, s, z, k if w is None else w, part["log_weight"],
        q.stride(0), q.stride(2), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        phi_k.stride(0), phi_k.stride(1), phi_k.stride(2),
        perm.stride(0), seg_start.stride(0),
        hkv, tk - t, scale, part["expert"], s.shape[2] if merge else 0,
        GROUP=group, PACK=pack, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MERGE=merge,
        HEDGEHOG=w is not None, FEAT=phi_k.shape[-1], CHUNK_SIZE=CHUNK,
        num_warps=num_warps, num_stages=num_stages,
    )


# --------------------------------------------------------------------------------------- decode
@triton.jit
def _routed_softmax_decode(
    q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, route_ptr, window_ptr, sinks_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_kv_heads, n_keys, n_splits, sm_scale,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hkv = pid_bh % n_kv_heads
    offs_m = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < GROUP
    head = hkv * GROUP + offs_m
    part = (b * n_kv_heads * GROUP + head) * n_splits + split

    # The window of the row's expert (0: not a softmax expert, the row reads nothing).
    route = tl.load(route_ptr + b)
    window = tl.load(window_ptr + route)
    sinks = tl.load(sinks_ptr + route)
    qpos = n_keys - 1
    lo = tl.maximum(qpos - window + 1, 0)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, n_keys)
    if (window > 0) & ((end > lo) | (start < sinks)):
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + hkv * stride_kh
        v_base = v_ptr + b * stride_vb + hkv * stride_vh
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        first = tl.where(start < sinks, start, tl.maximum(start, lo // BLOCK_N * BLOCK_N))
        qpos_rows = tl.zeros([ROWS], tl.int32) + qpos
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, qpos_rows, k_base, v_base, stride_kn, stride_vn, offs_n,
                                     offs_d, d_ok, first, end, window, sinks, sm_scale * 1.4426950408889634,
                                     True, EVEN_D, BLOCK_N)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
    else:
        tl.store(part_lse_ptr + part, tl.full([ROWS], float("-inf"), tl.float32), mask=row_ok)


def softmax_decode_splits(q, k, v, routes, window_by_expert, sinks_by_expert, *, scale: float, split: int = 512,
                          block_n: int = 64):
    """One decode step of the softmax experts: q (B, Hq, 1, d), k/v (B, Hkv, L, d) (the cache, this token
    included), routes (B,) int32 expert of each row; window_by_expert / sinks_by_expert (E,) int32 give
    each expert's window (spec.NO_WINDOW: every key, 0: not a softmax expert) and sinks. Per row, head
    and split of `split` keys: the normalised partial output (B, Hq, n_splits, d) float32 and its
    log2-sum-exp (B, Hq, n_splits), -inf where nothing was read (`triton_decode.finish_decode` merges them)."""
    b, hq, _, d = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    group = hq // hkv
    n_splits = triton.cdiv(n_keys, split)
    part_out = torch.empty(b, hq, n_splits, d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(b, hq, n_splits, device=q.device, dtype=torch.float32)
    launch(_routed_softmax_decode, (b * hkv, n_splits),
        q, k, v, part_out, part_lse, routes, window_by_expert, sinks_by_expert,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hkv, n_keys, n_splits, scale,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), SPLIT=split, BLOCK_N=block_n,
        num_warps=4, num_stages=2,
    )
    return part_out, part_lse
