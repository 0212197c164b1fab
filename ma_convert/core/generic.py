"""Generic patching: swap `nn.MultiheadAttention` modules for Meta-Attention, keeping their weights.

The replacement keeps the original parameters under their original names (`in_proj_weight`,
`in_proj_bias`, `out_proj`), so the full expert *is* the original attention: under
``force_expert(model, "full")`` outputs are those of the original module.
"""

from __future__ import annotations

import logging
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MetaAttnConfig
from .control import collect_aux_losses
from .masks import read_attention_mask, read_padding_mask
from .meta_attention import MetaAttention
from .policy import RoutingPolicy

logger = logging.getLogger(__name__)

__all__ = ["MetaMultiheadAttention", "patch_module", "collect_aux_losses"]


class MetaMultiheadAttention(nn.Module):
    """Meta-Attention with the call signature and the parameters of `nn.MultiheadAttention`.

    Self-attention calls (query, key and value the same tensor) are routed. Cross-attention calls
    run the original attention unchanged, since windows and causal states have no meaning across
    two sequences. ``need_weights`` is accepted but no attention weights are returned (None).
    """

    # torch's TransformerEncoder(Layer) fast path reads this flag and, when True, calls its fused
    # kernel with our projection weights directly, which would bypass routing. False keeps it off.
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, cfg: MetaAttnConfig, policy: Optional[RoutingPolicy] = None) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("patching nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.packed_qkv = mha._qkv_same_embed_dim
        if self.packed_qkv:
            self.in_proj_weight = mha.in_proj_weight
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = mha.q_proj_weight
            self.k_proj_weight = mha.k_proj_weight
            self.v_proj_weight = mha.v_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.meta = MetaAttention(cfg, policy=policy)

    def _projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed_qkv:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _original(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        wq, wk, wv = self._projection_weights()
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            None, None, False, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=not self.packed_qkv, q_proj_weight=wq,
            k_proj_weight=wk, v_proj_weight=wv, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if not (query is key and key is value) or query.dim() != 3:
            return self._original(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        b, t, _ = x.shape
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        wq, wk, wv = self._projection_weights()
        heads = [
            F.linear(x, w, bias).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for w, bias in ((wq, bq), (wk, bk), (wv, bv))
        ]
        key_mask, attn_bias, causal = None, None, is_causal
        if key_padding_mask is not None:
            key_mask = read_padding_mask(key_padding_mask, true_means_blocked=True)
        if attn_mask is not None:
            mask = attn_mask.view(b, self.num_heads, t, t) if attn_mask.dim() == 3 else attn_mask.view(1, 1, t, t)
            mask_is_causal, mask_keys, attn_bias = read_attention_mask(mask, true_means_blocked=True)
            causal = causal or mask_is_causal
            if mask_keys is not None:
                key_mask = mask_keys.expand(b, t) if key_mask is None else key_mask & mask_keys
        out, _ = self.meta(x, *heads, causal=causal, key_mask=key_mask, attn_bias=attn_bias, query_valid=key_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def patch_module(
    model: nn.Module,
    target: Type[nn.Module] = nn.MultiheadAttention,
    cfg: Optional[MetaAttnConfig] = None,
    verbose: bool = False,
    policy: Optional[RoutingPolicy] = None,
) -> list[str]:
    """Replace every `target` module inside `model` with Meta-Attention, in place.

    Only `nn.MultiheadAttention` (and subclasses) can be patched generically. The cross-attention
    of `nn.TransformerDecoderLayer` is left alone. Head counts and dropout come from each module;
    the rest of `cfg` (experts, router, window, ...) applies to all, and `policy` (default: soft
    routing) to each. Returns the names of the replaced modules.
    """
    if not (isinstance(target, type) and issubclass(target, nn.MultiheadAttention)):
        raise TypeError(f"patch_module can replace nn.MultiheadAttention modules only, not {target!r}")
    cfg = cfg or MetaAttnConfig()
    replaced = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, target) or isinstance(child, MetaMultiheadAttention):
                continue
            if isinstance(parent, nn.TransformerDecoderLayer) and child is parent.multihead_attn:
                continue  # cross-attention over the memory: nothing to route
            layer_cfg = cfg.replace(
                d_model=child.embed_dim, n_heads=child.num_heads, n_kv_heads=None, head_dim=None, dropout=child.dropout
            )
            if (cfg.d_model, cfg.n_heads) != (child.embed_dim, child.num_heads):
                logger.warning(
                    "%s: using the module's d_model=%d, n_heads=%d instead of the config's %d, %d",
                    name, child.embed_dim, child.num_heads, cfg.d_model, cfg.n_heads,
                )
            setattr(parent, child_name, MetaMultiheadAttention(child, layer_cfg, policy))
            full_name = f"{name}.{child_name}" if name else child_name
            replaced.append(full_name)
            if verbose:
                print(f"ma_convert: patched {full_name} ({child.embed_dim}-d, {child.num_heads} heads)")
    if not replaced:
        raise ValueError(f"no {target.__name__} module found in {type(model).__name__}")
    for module in model.modules():
        # In eval, TransformerEncoder packs padded batches into nested tensors for its fused path;
        # routing needs ordinary (B, T, D) batches.
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return replaced
