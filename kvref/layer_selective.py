"""Spoiler for card14: layer-selective caching, and the rebuild of uncached layers' K/V (read it after you pass).

Cache K/V of some layers only. Layer l's K/V depend on layer l's
input, which mixes every earlier token through every layer below l (only layer 0's K/V depend on
the token alone): so to rebuild the uncached layers' K/V for T past tokens, the past tokens run
through every layer below the highest uncached one, m (cached layers among them read their K/V
from the cache instead of projecting them), then through layer m's K/V projections.
`rebuild_uncached_kv` does exactly that; `selective_decode_step` decodes with it.

Shapes: B batch, S new tokens, T past tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvref.attention import attention
from kvref.cache import GrowingKVCache
from kvref.config import ModelConfig
from kvref.measure import flops_of, meta_model
from kvref.model import Transformer
from kvref.rope import apply_rope, rope_cos_sin

# --- layer-selective caching ----------------------------------------------------------------


def _check_layers(cfg: ModelConfig, cached_layers: Iterable[int]) -> frozenset[int]:
    try:
        layers = frozenset(cached_layers)
    except TypeError:
        raise TypeError(f"cached_layers must be an iterable of layer indices, got {cached_layers!r:.60}") from None
    bad = [l for l in layers if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"cached_layers must be layer indices in [0, {cfg.n_layers}), got {sorted(map(repr, bad))}")
    return layers


def _project_kv(attn, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, _ = h.shape
    Hkv, D = attn.cfg.n_kv_heads, attn.cfg.head_dim
    k = attn.k_proj(h).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(h).view(B, T, Hkv, D).transpose(1, 2)
    cos, sin = rope_cos_sin(pos, D, attn.cfg.rope_theta, dtype=h.dtype)
    return apply_rope(k, cos, sin), v


def rebuild_uncached_kv(model: Transformer, past_ids: torch.Tensor,
                        cached_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K/V [B, Hkv, T, D] of every layer not in `cached_kv`, for the T past tokens, from their ids.

    The past tokens run through layers 0 .. m-1 (m the highest uncached layer): a cached layer
    reads its K/V from `cached_kv`, an uncached one projects them; then layer m projects its K/V.
    Nothing above m runs, and no lm_head. Returns {} when every layer is cached.
    """
    cfg = model.cfg
    uncached = [l for l in range(cfg.n_layers) if l not in cached_kv]
    if not uncached:
        return {}
    B, T = past_ids.shape
    pos = torch.arange(T, device=past_ids.device)
    rebuilt = {}
    x = model.embed_tokens(past_ids)  # (B, T, d_model)
    for l in range(max(uncached) + 1):
        layer = model.layers[l]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if l in cached_kv:
            k, v = cached_kv[l]
        else:
            k, v = rebuilt[l] = _project_kv(attn, h, pos)
        if l == max(uncached):
            break
        H, D = cfg.n_heads, cfg.head_dim
        q = attn.q_proj(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        cos, sin = rope_cos_sin(pos, D, cfg.rope_theta, dtype=h.dtype)
        y = attention(apply_rope(q, cos, sin), k, v)  # (B, H, T, D)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return rebuilt


def new_selective_caches(model: Transformer, cached_layers: Iterable[int]) -> list[GrowingKVCache | None]:
    """A growing cache for each layer in `cached_layers`, None for the others."""
    layers = _check_layers(model.cfg, cached_layers)
    return [GrowingKVCache() if l in layers else None for l in range(model.cfg.n_layers)]


def _filled(k: torch.Tensor, v: torch.Tensor) -> GrowingKVCache:
    cache = GrowingKVCache()
    cache.update(torch.arange(k.shape[2], device=k.device), k, v)
    return cache


@torch.no_grad()
def selective_decode_step(model: Transformer, ids: torch.Tensor, caches: list[GrowingKVCache | None]) -> torch.Tensor:
    """Logits [B, V] of the last token of `ids` [B, T + 1]; the cached layers' caches hold positions 0 .. T-1.

    The uncached layers' K/V for the T past tokens are rebuilt (`rebuild_uncached_kv`), used for
    this step and dropped; the cached layers' caches grow by one position. With T = 0 (the first
    token) there is nothing to rebuild. To fill the caches from a prompt, call this once per token.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"ids must be a tensor of token ids [B, T + 1], got {ids!r:.60}")
    if len(caches) != model.cfg.n_layers:
        raise ValueError(f"caches must hold one entry per layer ({model.cfg.n_layers}), got {len(caches)}: "
                         "use new_selective_caches")
    T = ids.shape[1] - 1
    cached = {l: (c.k, c.v) for l, c in enumerate(caches) if c is not None and c.k is not None}
    if any(c is not None and c.seq_len != T for c in caches):
        raise ValueError(f"every cached layer must hold the {T} past positions")
    rebuilt = rebuild_uncached_kv(model, ids[:, :-1], cached) if T else {}
    step = [c if c is not None else (_filled(*rebuilt[l]) if T else GrowingKVCache()) for l, c in enumerate(caches)]
    return model(ids[:, -1:], torch.tensor([T], device=ids.device), step)[:, -1]


def selective_recompute_flops_measured(cfg: ModelConfig, cached_layers: Iterable[int], n_past: int) -> int:
    """FLOPs (FlopCounterMode) of `rebuild_uncached_kv` for one sequence of `n_past` tokens, on the meta device."""
    layers = _check_layers(cfg, cached_layers)
    if not isinstance(n_past, int) or isinstance(n_past, bool) or n_past < 1:
        raise ValueError(f"n_past must be an int >= 1, got {n_past!r}")
    model = meta_model(cfg)
    ids = torch.zeros(1, n_past, dtype=torch.long, device="meta")
    kv = torch.empty(1, cfg.n_kv_heads, n_past, cfg.head_dim, dtype=torch.bfloat16, device="meta")  # (1, Hkv, T, D)
    return flops_of(rebuild_uncached_kv, model, ids, {l: (kv, kv) for l in layers}).total
