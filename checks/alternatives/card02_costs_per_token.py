"""A correct alternative to solutions/card02_memory_vs_compute/costs.py: the cache as batch · seq_len · bytes per
token, a token's bytes from .nbytes of a meta [Hkv, D] tensor, the fit as headroom, the roofline as two named
terms compared by hand, the ratio per token (seq_len cancelled).

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card02_memory_vs_compute/costs.py"


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    return batch * seq_len * kv_bytes_per_token(cfg, dtype)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * torch.empty(cfg.n_kv_heads, cfg.head_dim, dtype=dtype, device='meta').nbytes  # is bytes, finfo().bits bits


def fits_in_memory(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype) -> bool:
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    experts = max(cfg.n_experts, 1)  # a mixture of experts stores every expert, whichever a token uses
    layer = 2 * d * H * D + 2 * d * Hkv * D + experts * mlp + d * cfg.n_experts + 2 * d  # + router, 2 norms
    embeddings = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d
    weights = (L * layer + embeddings + d) * dtype.itemsize  # + the final norm
    return hw.memory_bytes - weights >= kv_cache_bytes(cfg, batch, seq_len, dtype)  # weights once, not per sequence


def roofline_step_time(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                       use_cache: bool) -> float:
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + mlp) + d * cfg.vocab_size
    T = seq_len + 1  # positions up to the new token
    S = 1 if use_cache else T  # tokens fed
    keys = min(T, cfg.sliding_window) if (use_cache and cfg.sliding_window) else T  # the rectangle's width
    matmul_flops = 2 * weights * batch * S
    attention_flops = 2 * 2 * L * H * D * batch * S * keys  # q·kᵀ and p·v
    kv_read = kv_cache_bytes(cfg, batch, keys, dtype) if use_cache else 0
    compute_s = (matmul_flops + attention_flops) / hw.peak_flops(dtype)
    memory_s = (kv_read + weights * dtype.itemsize) / hw.mem_bandwidth
    return compute_s if compute_s > memory_s else memory_s


def recompute_to_read_ratio(cfg: ModelConfig, hw: Hardware, seq_len: int, dtype: torch.dtype) -> float:
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    layer = 2 * d * H * D + 2 * d * Hkv * D + mlp
    needed = (L - 1) * layer + 2 * d * Hkv * D  # every layer below the last, then its k and v projections
    return 2 * needed * hw.mem_bandwidth / (kv_bytes_per_token(cfg, dtype) * hw.peak_flops(dtype))  # seq_len cancels: 2·needed·bandwidth / (kv bytes per token·peak)
