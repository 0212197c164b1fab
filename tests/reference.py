"""Naive O(T^2) references the experts are checked against: explicit masks, explicit sums."""

import torch


def repeat_kv(x, n_q_heads):
    return x.repeat_interleave(n_q_heads // x.shape[1], dim=1)


def allowed_mask(q_pos, t_keys, causal=True, window=None, sinks=0, key_mask=None):
    """(B, 1, N, Tk) bool built with plain comparisons."""
    j = torch.arange(t_keys)[None, None, None, :]
    i = q_pos[:, None, :, None]
    ok = torch.ones(q_pos.shape[0], 1, q_pos.shape[1], t_keys, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        band = (i - j).abs() < window if not causal else (i - j) < window
        if sinks:
            band |= j < sinks
        ok &= band
    if key_mask is not None:
        ok &= key_mask[:, None, None, :]
    return ok


def naive_softmax(q, k, v, allowed, scale=None, bias=None):
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return probs @ v


def naive_linear(phi_q, phi_k, v, q_pos, causal=True, key_mask=None):
    """Explicit cumulative sums: S_t = sum_{j<=t} phi(k_j) v_j^T, z_t = sum_{j<=t} phi(k_j).

    phi_q (B, Hq, N, F); phi_k (B, Hkv, Tk, F); v (B, Hkv, Tk, d).
    """
    phi_k, v = repeat_kv(phi_k, phi_q.shape[1]), repeat_kv(v, phi_q.shape[1])
    if key_mask is not None:
        phi_k = phi_k * key_mask[:, None, :, None]
    outer = phi_k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, Tk, F, d)
    if causal:
        states, norms = outer.cumsum(2), phi_k.cumsum(2)
    else:
        states = outer.sum(2, keepdim=True).expand_as(outer)
        norms = phi_k.sum(2, keepdim=True).expand_as(phi_k)
    b, h, n, _ = phi_q.shape
    out = torch.zeros(b, h, n, v.shape[-1])
    for bi in range(b):
        for qi in range(n):
            p = q_pos[bi, qi]
            s, z = states[bi, :, p], norms[bi, :, p]
            num = torch.einsum("hf,hfd->hd", phi_q[bi, :, qi], s)
            den = torch.einsum("hf,hf->h", phi_q[bi, :, qi], z)
            out[bi, :, qi] = num / den.clamp_min(1e-6).unsqueeze(-1)
    return out


def naive_hybrid(q, k, v, phi_q, phi_k, log_weight, q_pos, window, sinks, scale=None, key_mask=None):
    """The hybrid linear expert written out: weights exp(q.k * scale) on the last `window` keys and
    the first `sinks`, exp(log_weight_h) phi(q).phi(k) on the other earlier keys, one normalisation."""
    k, v, phi_k = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), repeat_kv(phi_k, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    j = torch.arange(k.shape[2])[None, None, None, :]
    i = q_pos[:, None, :, None]
    visible = (j <= i) & (i >= 0)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    exact = visible & ((i - j < window) | (j < sinks))
    far = visible & ~exact
    out = torch.zeros(q.shape)
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            for n in range(q.shape[2]):
                e, f = exact[bi, 0, n], far[bi, 0, n]
                if not (e.any() or f.any()):
                    continue
                scores = (k[bi, h] @ q[bi, h, n]) * scale
                top = scores[e].max() if e.any() else torch.tensor(0.0)
                weights = torch.where(e, torch.exp(scores - top), 0.0)
                weights = weights + torch.where(f, torch.exp(log_weight[h] - top) * (phi_k[bi, h] @ phi_q[bi, h, n]), 0.0)
                out[bi, h, n] = weights @ v[bi, h] / weights.sum().clamp_min(1e-6)
    return out
