"""A correct alternative to solutions/card14_storing_less/storing.py: MLA told apart by its latent dim, absorbed
scores as one matmul of concatenated [q_latent ; q_rope] and [latent ; k_rope], the error by math.hypot, the
rebuild bill as whole layers minus the cached layers' K/V projections.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import math
from collections.abc import Set

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card14_storing_less/storing.py"


def mla_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    size = dtype.itemsize
    per_layer = cfg.mla_latent_dim + cfg.mla_rope_dim if cfg.mla_latent_dim > 0 else 2 * cfg.n_kv_heads * cfg.head_dim
    return per_layer * cfg.n_layers * size


def mla_absorbed_scores(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                        w_uk: torch.Tensor) -> torch.Tensor:
    scale = 1 / math.sqrt(q_nope.shape[-1] + q_rope.shape[-1])
    q_latent = q_nope @ w_uk  # (B, H, S, D) @ (H, D, C) -> (B, H, S, C)
    q_cat = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, S, C + Dr)
    k_cat = torch.cat([latent, k_rope], dim=-1)[:, None]  # (B, 1, T, C + Dr): one "key" for every head
    return q_cat @ k_cat.transpose(-2, -1) / math.sqrt(q_nope.shape[-1] + q_rope.shape[-1])


def low_rank_key_error(singular_values: list[float], rank: int) -> float:
    """The Frobenius error ‖K - K_r‖_F of the best rank-`rank` approximation of a key matrix K.

    `singular_values` are K's singular values in descending order, as Python floats (what
    torch.linalg.svdvals returns); K_r keeps the `rank` largest singular triplets and drops the
    rest (rank 0 keeps nothing; a rank at or past the count keeps everything). Which singular
    values does the error come from, those kept or those dropped? Is ‖·‖_F a sum of them, of
    their squares, or the root of that? (Keys with singular values 4 and 3: the rank-0 error is?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return math.hypot(*singular_values[rank:])


def selective_cache_recompute_flops(cfg: ModelConfig, cached_layers: Set[int], n_past: int) -> int:
    uncached = [layer for layer in range(cfg.n_layers) if layer not in cached_layers]
    if not uncached:
        return 0
    d, H, Hkv, D, T = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, n_past
    kv = 2 * d * Hkv * D  # K and V projection weights of one layer
    qo = 2 * d * H * D  # q and o projection weights
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    attention = 4 * H * T * T * D  # q·kᵀ and p·v over the whole T x T rectangle
    top = max(uncached)
    cached_below = sum(1 for layer in cached_layers if layer < top)
    full_layer = 2 * T * (qo + kv + mlp) + attention
    return top * full_layer - cached_below * 2 * T * kv + 2 * T * kv
