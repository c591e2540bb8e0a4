"""A correct alternative to solutions/card14_storing_less/storing.py: the error as a float64 vector norm, and the
rebuild bill layer by layer in a loop.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

from collections.abc import Set

import torch

from kvref.config import ModelConfig

EXTENDS = "solutions/card14_storing_less/storing.py"


def low_rank_key_error(singular_values: list[float], rank: int) -> float:
    """The Frobenius error ‖K - K_r‖_F of the best rank-`rank` approximation of a key matrix K.

    `singular_values` are K's singular values in descending order, as Python floats (what
    torch.linalg.svdvals returns); K_r keeps the `rank` largest singular triplets and drops the
    rest (rank 0 keeps nothing; a rank at or past the count keeps everything). Which singular
    values does the error come from, those kept or those dropped? Is ‖·‖_F a sum of them, of
    their squares, or the root of that? (Keys with singular values 4 and 3: the rank-0 error is?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return float(torch.linalg.vector_norm(torch.tensor(singular_values[rank:], dtype=torch.float64)))


def selective_cache_recompute_flops(cfg: ModelConfig, cached_layers: Set[int], n_past: int) -> int:
    uncached = [layer for layer in range(cfg.n_layers) if layer not in cached_layers]
    if not uncached:
        return 0
    d, H, Hkv, D, T = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, n_past
    kv = 2 * d * Hkv * D  # K and V projection weights of one layer
    qo = 2 * d * H * D  # q and o projection weights
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    attention = 4 * H * T * T * D  # q·kᵀ and p·v over the whole T x T rectangle
    flops = 0
    for layer in range(max(uncached) + 1):
        if layer not in cached_layers:
            flops += 2 * T * kv  # this layer's K and V for the past tokens
        if layer < max(uncached):  # the past tokens go on through this layer to reach the next
            flops += 2 * T * (qo + mlp) + attention
    return flops
