"""Feature maps of kernel (linear) attention, as plain tensor functions.

The core's feature-map modules call these; the Triton kernels compute the same maps inline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, parameter-free."""
    return F.elu(x) + 1.0


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] for x (B, H, T, d) and W (H, d, d) (Zhang et al., 2024)."""
    proj = torch.einsum("bhtd,hde->bhte", x, weight.to(x.dtype))
    both = torch.cat([proj, -proj], dim=-1)  # one copy; each half's softmax below, in one pass
    return both.view(*proj.shape[:-1], 2, proj.shape[-1]).softmax(-1).view(both.shape)
