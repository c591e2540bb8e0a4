"""A correct alternative to solutions/card02_memory_vs_compute/costs.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card02 test to pass. Here an element's size comes from torch.finfo / torch.iinfo bits
(over 8), the cache is the per-token bytes times the positions held, the parameters are listed
module by module in a dict, the roofline is written branch by branch (cached or not) and
returns the slower of compute and memory with an `if`, and the recompute-to-read ratio is
worked out for one token (the sequence length cancels, so it never enters).
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card02_memory_vs_compute/costs.py"


def _element_bytes(dtype: torch.dtype) -> int:
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.bits // 8


def _linear_weights(cfg: ModelConfig) -> dict[str, int]:
    """Weights of the nn.Linear matrices one token goes through in one layer (a dense model)."""
    d, H, Hkv, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    mlp = {"gate": d * cfg.d_ff, "up": d * cfg.d_ff, "down": cfg.d_ff * d} if cfg.mlp == "swiglu" else \
        {"up": d * cfg.d_ff, "down": cfg.d_ff * d}
    return {"q": d * H * D, "k": d * Hkv * D, "v": d * Hkv * D, "o": H * D * d, **mlp}


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one more token adds to one sequence's cache, with elements of `dtype`."""
    k_bytes = cfg.n_kv_heads * cfg.head_dim * _element_bytes(dtype)  # one layer's K row
    return cfg.n_layers * (k_bytes + k_bytes)  # and as many for V


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of a K/V cache holding `seq_len` positions of `batch` sequences, elements of `dtype`."""
    return batch * seq_len * kv_bytes_per_token(cfg, dtype)


def fits_in_memory(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype) -> bool:
    """Whether the model's weights and a cache of `seq_len` positions for `batch` sequences fit in `hw`."""
    d = cfg.d_model
    per_layer = _linear_weights(cfg)
    attention = sum(per_layer[name] for name in ("q", "k", "v", "o"))
    mlp = sum(w for name, w in per_layer.items() if name not in ("q", "k", "v", "o"))
    params = {
        "attention": cfg.n_layers * attention,
        "mlp": cfg.n_layers * mlp * (cfg.n_experts if cfg.n_experts else 1),
        "router": cfg.n_layers * d * cfg.n_experts,
        "norms": cfg.n_layers * 2 * d + d,
        "embedding": cfg.vocab_size * d,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    need = sum(params.values()) * _element_bytes(dtype) + kv_cache_bytes(cfg, batch, seq_len, dtype)
    return not need > hw.memory_bytes


def roofline_step_time(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                       use_cache: bool) -> float:
    """Roofline seconds (perfect overlap) of one decode step: one new token per sequence after `seq_len` tokens."""
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.head_dim
    weights = L * sum(_linear_weights(cfg).values()) + cfg.d_model * cfg.vocab_size  # + lm_head
    size = _element_bytes(dtype)
    if use_cache:
        keys = seq_len + 1
        if cfg.sliding_window:
            keys = min(keys, cfg.sliding_window)
        flops = 2 * batch * weights + 4 * L * H * D * batch * keys
        moved = weights * size + batch * keys * kv_bytes_per_token(cfg, dtype)  # read keys - 1, write 1
    else:
        tokens = seq_len + 1
        flops = 2 * batch * tokens * weights + 4 * L * H * D * batch * tokens * tokens
        moved = weights * size
    compute, memory = flops / hw.peak_flops(dtype), moved / hw.mem_bandwidth
    return compute if compute > memory else memory


def recompute_to_read_ratio(cfg: ModelConfig, hw: Hardware, seq_len: int, dtype: torch.dtype) -> float:
    """Time to recompute the K/V of `seq_len` past tokens over the time to read them from the cache."""
    per_layer = _linear_weights(cfg)
    below = (cfg.n_layers - 1) * sum(per_layer.values())  # every layer under the last, in full
    last = per_layer["k"] + per_layer["v"]  # and the last one's k and v projections
    seconds_to_recompute_one = 2 * (below + last) / hw.peak_flops(dtype)
    seconds_to_read_one = kv_bytes_per_token(cfg, dtype) / hw.mem_bandwidth
    return seconds_to_recompute_one / seconds_to_read_one
