"""Triton kernels that route tokens at inference: the router in one launch, the grouping in another.

- `route_tokens`: the router MLP of every token (features [x, ||x||/sqrt(D), pos], LayerNorm,
  Linear, GELU, Linear, / temperature), its argmax, and the overrides of `auto` routing (uncertain
  tokens to the full expert) and `full_tail`, in one launch with no host sync. It replaces about
  twenty small torch launches per layer, which is what a routed layer of a small model waits on.
- `sort_by_expert`: token indices grouped by expert, each group in position order (a counting
  sort), with each group's size and start; one program per row.

The torch router (`core.controller`) is the reference. The kernel computes in float32 and feeds
the first Linear in the weights' dtype, as the torch path does; where two experts' scores tie
within that rounding, the two can pick different experts.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import launch
from .spec import RouterWeights


@triton.jit
def _extra_column(acc, value, mean, rstd, ln_w_ptr, ln_b_ptr, w1_ptr, col, n_feat, offs_h, h_ok, IEEE: tl.constexpr):
    """The first Linear's term of one of the two extra features (an outer product)."""
    normed = (value - mean) * rstd * tl.load(ln_w_ptr + col).to(tl.float32) + tl.load(ln_b_ptr + col).to(tl.float32)
    if not IEEE:  # the torch path feeds the Linear in the weights' dtype
        normed = normed.to(w1_ptr.dtype.element_ty).to(tl.float32)
    w1 = tl.load(w1_ptr + offs_h * n_feat + col, mask=h_ok, other=0.0).to(tl.float32)
    return acc + normed[:, None] * w1[None, :]


@triton.jit
def _route_tokens(
    x_ptr, pos_ptr, ln_w_ptr, ln_b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, raw_ptr, route_ptr,
    n_tokens, seq_len, stride_x, stride_pos, d_model, hidden, ln_eps, inv_log_max, inv_temperature,
    full_tail, full_index, threshold, concentration_eps,
    N_EXPERTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    AUTO: tl.constexpr, IEEE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # 64-bit: B * T * D can pass 2^31
    ok = rows < n_tokens
    t = rows % seq_len
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden
    x_rows = x_ptr + rows[:, None] * stride_x

    # The two extra features: the token's RMS and its log-scaled position.
    sum_x = tl.zeros([BLOCK_T], tl.float32)
    sum_sq = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        cols = k0 + offs_k
        x = tl.load(x_rows + cols[None, :], mask=ok[:, None] & (cols < d_model)[None, :], other=0.0).to(tl.float32)
        sum_x += tl.sum(x, 1)
        sum_sq += tl.sum(x * x, 1)
    rms = tl.sqrt(sum_sq / d_model)
    pos = tl.load(pos_ptr + (rows // seq_len) * stride_pos + t, mask=ok, other=0).to(tl.float32)
    pos = tl.log(1.0 + tl.maximum(pos, 0.0)) * inv_log_max

    # LayerNorm over the D + 2 features (two passes: the variance from centred values).
    n_feat = d_model + 2
    mean = (sum_x + rms + pos) / n_feat
    var = (rms - mean) * (rms - mean) + (pos - mean) * (pos - mean)
    for k0 in range(0, d_model, BLOCK_K):
        cols = k0 + offs_k
        c_ok = ok[:, None] & (cols < d_model)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=c_ok, other=0.0).to(tl.float32)
        centred = tl.where(c_ok, x - mean[:, None], 0.0)
        var += tl.sum(centred * centred, 1)
    rstd = 1.0 / tl.sqrt(var / n_feat + ln_eps)

    # The first Linear: the D hidden-state columns by blocks, then the two extra ones.
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        cols = k0 + offs_k
        c_ok = cols < d_model
        x = tl.load(x_rows + cols[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(ln_w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        normed = tl.where(c_ok[None, :], (x - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :], 0.0)
        w1 = tl.load(w1_ptr + offs_h[None, :] * n_feat + cols[:, None], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(normed, w1.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(normed.to(w1.dtype), w1)
    acc = _extra_column(acc, rms, mean, rstd, ln_w_ptr, ln_b_ptr, w1_ptr, d_model, n_feat, offs_h, h_ok, IEEE)
    acc = _extra_column(acc, pos, mean, rstd, ln_w_ptr, ln_b_ptr, w1_ptr, d_model + 1, n_feat, offs_h, h_ok, IEEE)
    acc += tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact GELU
    if not IEEE:
        h = h.to(w1_ptr.dtype.element_ty).to(tl.float32)

    # The second Linear, expert by expert, and the argmax (the first of equal scores, as torch's).
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    route = tl.zeros([BLOCK_T], tl.int32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for e in tl.static_range(N_EXPERTS):
        w2 = tl.load(w2_ptr + e * hidden + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        score = (tl.sum(h * w2[None, :], 1) + tl.load(b2_ptr + e).to(tl.float32)) * inv_temperature
        tl.store(raw_ptr + rows * N_EXPERTS + e, score, mask=ok)
        better = score > best
        route = tl.where(better, e, route)
        best = tl.where(better, score, best)
        if AUTO:  # Dirichlet concentration softplus(score) + eps, as torch's softplus (linear above 20)
            soft = tl.where(score > 20.0, score, tl.log(1.0 + tl.exp(tl.minimum(score, 20.0))))
            total += soft + concentration_eps
    if AUTO:
        uncertain = N_EXPERTS / (N_EXPERTS + total) > threshold
        route = tl.where(uncertain, full_index, route)
    route = tl.where(t >= seq_len - full_tail, full_index, route)
    tl.store(route_ptr + rows, route, mask=ok)


def route_tokens(
    weights: RouterWeights,
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    temperature: float,
    full_index: int,
    full_tail: int = 0,
    uncertainty_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes (B, T) int32 and the router's raw output (B, T, K) float32 for hidden states x (B, T, D)
    (the router's output divided by `temperature`, which the caller reads from the module each call).

    positions (T,), (1, T) or (B, T): the tokens' positions. With `uncertainty_threshold` (Bayesian
    router, `auto` routing), tokens whose uncertainty K / (K + sum gamma) exceeds it go to the full
    expert; the last `full_tail` tokens of every row go there too.
    """
    b, t, d = x.shape
    x = x.reshape(b * t, d)
    if x.stride(1) != 1:
        x = x.contiguous()
    positions = positions.to(device=x.device).reshape(-1, t)
    if positions.stride(1) != 1:
        positions = positions.contiguous()
    n_experts, hidden = weights.fc2_weight.shape
    raw = torch.empty(b, t, n_experts, device=x.device, dtype=torch.float32)
    routes = torch.empty(b, t, device=x.device, dtype=torch.int32)
    auto = uncertainty_threshold is not None
    block_t = 32
    launch(_route_tokens, (triton.cdiv(b * t, block_t),),
        x, positions, weights.norm_weight, weights.norm_bias, weights.fc1_weight, weights.fc1_bias,
        weights.fc2_weight, weights.fc2_bias, raw, routes,
        b * t, t, x.stride(0), positions.stride(0) if positions.shape[0] > 1 else 0, d, hidden, weights.norm_eps,
        1.0 / math.log1p(weights.max_positions), 1.0 / temperature,
        full_tail, full_index, float(uncertainty_threshold or 0.0), weights.concentration_eps,
        N_EXPERTS=n_experts, BLOCK_T=block_t, BLOCK_K=64, BLOCK_H=max(16, triton.next_power_of_2(hidden)),
        AUTO=auto, IEEE=weights.fc1_weight.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    return routes, raw


@triton.jit
def _sort_by_expert(
    route_ptr, perm_ptr, count_ptr, start_ptr, seq_len,
    N_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    experts = tl.arange(0, E_PAD)
    routes = route_ptr + row * seq_len
    counts = tl.zeros([E_PAD], tl.int32)
    for t0 in range(0, seq_len, BLOCK):
        r = tl.load(routes + t0 + offs, mask=t0 + offs < seq_len, other=-1)
        counts += tl.sum((r[:, None] == experts[None, :]).to(tl.int32), 0)
    starts = tl.cumsum(counts, 0) - counts
    tl.store(count_ptr + row * N_EXPERTS + experts, counts, mask=experts < N_EXPERTS)
    tl.store(start_ptr + row * N_EXPERTS + experts, starts, mask=experts < N_EXPERTS)
    taken = starts  # per expert: where its next token goes
    for t0 in range(0, seq_len, BLOCK):
        tokens = t0 + offs
        r = tl.load(routes + tokens, mask=tokens < seq_len, other=-1)
        member = (r[:, None] == experts[None, :]).to(tl.int32)
        slot = tl.cumsum(member, 0) - 1 + taken[None, :]
        dest = tl.sum(member * slot, 1)
        tl.store(perm_ptr + row * seq_len + dest, tokens, mask=(tokens < seq_len) & (tl.sum(member, 1) > 0))
        taken += tl.sum(member, 0)


def sort_by_expert(routes: torch.Tensor, n_experts: int):
    """Token indices grouped by expert, each group in position order, for routes (B, T) int32:
    perm (B, T) int32, and per expert its token count and where its group starts (B, E) int32."""
    b, t = routes.shape
    routes = routes.to(torch.int32).contiguous()
    perm = torch.empty(b, t, device=routes.device, dtype=torch.int32)
    counts = torch.empty(b, n_experts, device=routes.device, dtype=torch.int32)
    starts = torch.empty_like(counts)
    launch(_sort_by_expert, (b,),
        routes, perm, counts, starts, t,
        N_EXPERTS=n_experts, E_PAD=max(2, triton.next_power_of_2(n_experts)), BLOCK=2048, num_warps=8,  # H200 sweep
    )
    return perm, counts, starts
