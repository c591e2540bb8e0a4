"""A correct alternative to solutions/card14_storing_less/storing.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card14 test to pass. Here the bytes per token count the elements of one layer's cache
first; the absorbed scores concatenate [W_ukᵀ q ; q_rope] and [c ; k_r] and take one product
(the way DeepSeek's inference code runs MLA), scaling the queries first; the rank-r error is
math.hypot of the dropped values; the recompute bill walks the layers one by one and prices
each matrix of each layer as FlopCounterMode would.
"""

from __future__ import annotations

import math
from collections.abc import Set

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card14_storing_less/storing.py"


def mla_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one more token adds to the cache of a whole model, in `dtype`, for an MLA or a GQA config."""
    if cfg.mla_latent_dim:  # MLA: one latent and one RoPE key a layer, for all heads together
        per_layer = cfg.mla_latent_dim + cfg.mla_rope_dim
    else:  # K and V of every KV head
        per_layer = cfg.n_kv_heads * cfg.head_dim + cfg.n_kv_heads * cfg.head_dim
    return per_layer * dtype.itemsize * cfg.n_layers


def mla_absorbed_scores(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                        w_uk: torch.Tensor) -> torch.Tensor:
    """MLA attention scores [B, H, S, T], computed from the cached latents without expanding any key."""
    D, Dr = q_nope.shape[-1], q_rope.shape[-1]
    q_latent = (q_nope.unsqueeze(-2) @ w_uk[None, :, None]).squeeze(-2)  # (B, H, S, C): q_hᵀ W_uk[h]
    q_cat = torch.cat([q_latent, q_rope], dim=-1) / math.sqrt(D + Dr)  # (B, H, S, C + Dr)
    k_cat = torch.cat([latent, k_rope], dim=-1)  # (B, T, C + Dr): one key for every head
    return q_cat @ k_cat.unsqueeze(1).transpose(-2, -1)  # (B, H, S, T)


def low_rank_key_error(singular_values: list[float], rank: int) -> float:
    """The Frobenius error ‖K - K_r‖_F of the best rank-`rank` approximation of a key matrix K."""
    return math.hypot(*singular_values[rank:])  # Eckart–Young: the dropped values, squared, summed, rooted


def selective_cache_recompute_flops(cfg: ModelConfig, cached_layers: Set[int], n_past: int) -> int:
    """FLOPs one decode step spends rebuilding the K/V of the layers that are not cached, for `n_past` tokens."""
    def linear(n_in: int, n_out: int) -> int:  # nn.Linear on the n_past tokens
        return 2 * n_past * n_in * n_out

    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    top = max((layer for layer in range(cfg.n_layers) if layer not in cached_layers), default=-1)
    flops = 0
    for layer in range(top + 1):
        if layer not in cached_layers:
            flops += linear(d, kv_width) + linear(d, kv_width)  # its K and V, the point of the rebuild
        if layer == top:
            break  # nothing of the top uncached layer beyond its K/V is needed
        flops += linear(d, q_width) + linear(q_width, d)  # q and o
        flops += 2 * (2 * cfg.n_heads * n_past * n_past * cfg.head_dim)  # q·kᵀ, then p·v
        matrices = [(d, cfg.d_ff), (d, cfg.d_ff), (cfg.d_ff, d)] if cfg.mlp == "swiglu" else [(d, cfg.d_ff), (cfg.d_ff, d)]
        flops += sum(linear(n_in, n_out) for n_in, n_out in matrices)
    return flops
