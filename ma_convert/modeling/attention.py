"""Routed attention inside a Hugging Face attention module.

An architecture's converted attention computes Q/K/V (and its positional encoding) exactly as the
original, updates the KV cache, and hands the heads to `RoutedAttentionMixin.routed_attention`. The
full expert then reproduces the original attention; the linear expert keeps an fp32 state per
layer on the cache, advanced with every token; the local expert reads its window of the KV cache.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core.masks import BLOCKED_AT
from ..core.meta_attention import CacheInputs, MetaAttention

STATE_ATTRIBUTE = "ma_linear_state"

# The keyword under which a decoder layer hands its KV cache to attention: `cache` from transformers
# 5.24 (where `past_key_values` is deprecated until 5.40), `past_key_values` before, `layer_past` in
# Falcon. Code that reads only one of them silently decodes without a cache on the other versions.
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")


def cache_argument(call_kwargs: dict) -> Optional[Cache]:
    """The KV cache among a layer call's keyword arguments, under whichever name transformers used.

    A cache under a name not in `CACHE_KEYWORDS` (a future rename) is an error, not a silent
    uncached forward.
    """
    cache = next((call_kwargs[name] for name in CACHE_KEYWORDS if call_kwargs.get(name) is not None), None)
    if cache is None:
        stray = next((name for name, value in call_kwargs.items() if isinstance(value, Cache)), None)
        if stray is not None:
            raise TypeError(
                f"transformers passed the KV cache to attention as {stray!r}, a name this ma_convert does not read "
                f"(it reads {', '.join(CACHE_KEYWORDS)}); this transformers release is not supported yet"
            )
    if isinstance(cache, EncoderDecoderCache):  # a model with cross-attention: ours is the self-attention half
        cache = cache.self_attention_cache
    return cache


def key_mask_from_hf(attention_mask, n_queries: int, n_keys: int, window: Optional[int]) -> Optional[torch.Tensor]:
    """(B, Tk) bool mask of real keys from a Hugging Face attention mask, None if all are real.

    HF hands attention a (B, 1, T, Tk) mask (bool for SDPA, additive for eager) or a (B, Tk) one
    (flash-style). The experts apply causality and the base model's window themselves, so only the
    padding is read from it; a mask with any other structure (packed sequences, custom 4-D masks)
    would be silently dropped, so it is refused. Every layer gets the same mask object, so the
    answer is kept on it.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"Meta-Attention reads attention masks as tensors, not {type(attention_mask).__name__}; "
            f"use attn_implementation='sdpa' or 'eager'"
        )
    cached = getattr(attention_mask, "_ma_key_mask", False)
    if cached is not False:
        return cached
    if attention_mask.dim() == 2:
        real = attention_mask.bool()[:, -n_keys:]
    else:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask > BLOCKED_AT
        visible = visible.any(dim=1)[:, -n_queries:, -n_keys:]  # (B, T, Tk)
        real = visible.any(dim=-2)
        q_pos = torch.arange(n_keys - n_queries, n_keys, device=visible.device)
        k_pos = torch.arange(n_keys, device=visible.device)
        expected = (k_pos[None, :] <= q_pos[:, None]) & real[:, None, :]
        if window is not None:
            expected &= q_pos[:, None] - k_pos[None, :] < window
        rows = real[:, -n_queries:]  # rows of padding queries are whatever the mask maker chose
        if not torch.equal(visible[rows], expected[rows]):
            raise NotImplementedError(
                "this attention mask has structure beyond causality and padding (packed sequences, or a custom "
                "4-D mask), which Meta-Attention does not support yet"
            )
    result = None if bool(real.all()) else real
    attention_mask._ma_key_mask = result
    return result


class CacheLayerState:
    """The kernel expert's state (S, z, keys seen) kept on one cache layer. Beam search reorders it
    with the cache; cropping the cache below what it has seen drops it (it is rebuilt from the
    cache's keys when next needed)."""

    def __init__(self, layer) -> None:
        self.layer = layer
        if getattr(layer, "_ma_state_hooks", False):
            return
        reorder, crop = layer.reorder_cache, getattr(layer, "crop", None)

        def reorder_with_state(beam_idx):
            reorder(beam_idx)
            held = self.get()
            if held is not None:
                idx = beam_idx.to(held[0].device)
                self.set(held[0].index_select(0, idx), held[1].index_select(0, idx), held[2])

        def crop_with_state(max_length):
            crop(max_length)
            held = self.get()
            if held is not None and held[2] > layer.get_seq_length():
                delattr(layer, STATE_ATTRIBUTE)

        layer.reorder_cache = reorder_with_state
        if crop is not None:
            layer.crop = crop_with_state
        layer._ma_state_hooks = True

    def get(self):
        return getattr(self.layer, STATE_ATTRIBUTE, None)

    def set(self, s, z, seen: int) -> None:
        setattr(self.layer, STATE_ATTRIBUTE, (s, z, seen))


def _cache_layer(cache, layer_idx: int):
    layers = getattr(cache, "layers", None) or []
    return layers[layer_idx] if layer_idx < len(layers) else None


# Caches with at least this many elements per layer grow in place (below it, torch.cat's copy costs less
# than the bookkeeping): a batch-8 32k cache of a 1.1B model, not SmolLM2's 8k one.
GROW_IN_PLACE_FROM = 1 << 22


def append_to_cache(cache, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
    """`cache.update`, but a large dynamic layer grows in place: keys and values live in a buffer
    with spare room, so a decode step writes one token instead of copying the whole cache
    (`torch.cat` in `DynamicLayer.update` costs O(cached tokens) per step).

    The layer's `keys`/`values` stay views of the tokens seen so far, so everything else that
    reads them is unchanged; if anything replaced them (beam reordering, cropping, offloading), the
    buffer is rebuilt from them on the next step.
    """
    layer = _cache_layer(cache, layer_idx)
    if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.numel() < GROW_IN_PLACE_FROM:
        return cache.update(key, value, layer_idx)
    old, new = layer.keys.shape[-2], key.shape[-2]
    grow = getattr(layer, "_ma_grow", None)  # (key buffer, value buffer, the views handed out)
    if grow is None or layer.keys is not grow[2] or layer.values is not grow[3] or old + new > grow[0].shape[2]:
        capacity = old + new + max(256, (old + new) // 4)  # amortised growth, 25% spare
        grow = [x.new_empty(*x.shape[:2], capacity, x.shape[3]) for x in (layer.keys, layer.values)]
        grow[0][:, :, :old].copy_(layer.keys)
        grow[1][:, :, :old].copy_(layer.values)
    grow[0][:, :, old : old + new].copy_(key)
    grow[1][:, :, old : old + new].copy_(value)
    layer.keys, layer.values = grow[0][:, :, : old + new], grow[1][:, :, : old + new]
    layer._ma_grow = (grow[0], grow[1], layer.keys, layer.values)
    return layer.keys, layer.values


class RoutedAttentionMixin:
    """Adds Meta-Attention routing to a Hugging Face attention module (which owns `self.meta`)."""

    meta: MetaAttention
    layer_idx: int

    def split_heads(self, *projections: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, H * head_dim) projections as (B, H, T, head_dim) heads, as the original attention views them."""
        return [x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2) for x in projections]

    def routed_attention(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        call_kwargs: dict,
        *,
        scaling: Optional[float] = None,
        attn_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Update the KV cache with this step's key/value (B, Hkv, T, d), route and attend with
        query (B, Hq, T, d) over every key so far. Returns (B, T, Hq * d), before the output projection.

        `call_kwargs` are the keyword arguments the decoder layer passed to attention: the cache (under
        any of `CACHE_KEYWORDS`) and `position_ids` are read from them."""
        meta, window = self.meta, self.meta.cfg.full_window
        cache = cache_argument(call_kwargs)
        layer = None if cache is None else _cache_layer(cache, self.layer_idx)
        cache_inputs = None
        if getattr(layer, "is_compileable", False):
            # A static cache (`cache_implementation="static"`, what torch.compile needs): its layer returns
            # every slot, up to max_cache_len, and the mask says which hold keys. A call that runs all-full
            # (forced, the full tail, or below dense_below for the whole cache) is the original's attention
            # call on those slots, with no host sync, so it compiles whole; a routed call reads the number
            # of keys from the cache (one sync) and routes over them as with a dynamic cache.
            if attn_bias is not None or window is not None:
                raise NotImplementedError("Meta-Attention supports static caches for models without ALiBi or a "
                                          "sliding window; use the default dynamic cache")
            key, value = cache.update(key, value, self.layer_idx)
            if meta.runs_all_full(query, layer.max_cache_len):
                meta.note_all_full(hidden_states.shape[:2])
                return self._original_attention(query, key, value, attention_mask, scaling)
            n_keys = int(layer.get_seq_length())  # the one sync of a routed step
            key, value = key[:, :, :n_keys], value[:, :, :n_keys]
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = attention_mask[..., :n_keys]
            if meta.kernel_index is not None:
                cache_inputs = CacheInputs(CacheLayerState(layer))
        elif cache is not None:
            key, value = append_to_cache(cache, self.layer_idx, key, value)
            if meta.kernel_index is not None:
                layer = cache.layers[self.layer_idx]
                # A sliding-window cache drops old keys: the state must take in every key as it comes.
                cache_inputs = CacheInputs(CacheLayerState(layer), offset=layer.get_seq_length() - key.shape[2],
                                           eager=window is not None)
        b, _, t, _ = query.shape
        key_mask = key_mask_from_hf(attention_mask, t, key.shape[2], window)
        heads, _ = meta(
            hidden_states,
            query,
            key,
            value,
            positions=call_kwargs.get("position_ids"),  # None: the last t of the keys, right without padding
            scale=scaling,
            key_mask=key_mask,
            attn_bias=attn_bias,
            query_valid=None if key_mask is None else key_mask[:, -t:],
            cache=cache_inputs,
        )
        return heads.transpose(1, 2).reshape(b, t, -1)

    def _original_attention(self, query, key, value, attention_mask, scaling):
        """The model's own attention function (its `attn_implementation`) over the cache's slots: (B, T, Hq * d)."""
        # "eager" is each model's own function, not a shared one: SDPA computes the same.
        attend = ALL_ATTENTION_FUNCTIONS.get(getattr(self.config, "_attn_implementation", None), sdpa_attention_forward)
        out, _ = attend(self, query, key, value, attention_mask, dropout=0.0, scaling=scaling)
        return out.reshape(*out.shape[:2], -1)
