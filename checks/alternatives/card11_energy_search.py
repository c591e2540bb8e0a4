"""A correct alternative to solutions/card11_energy/energy.py: memory energy as the weights' bits over the batch
plus each sequence's K/V bits, compute energy priced per FLOP at half a multiply-add, the crossover found by
doubling then bisecting on the two energies, the dollars from bytes and FLOPs counted directly, the prefix
decision as a margin.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The step is card02's cached decode step: it reads every weight matrix once (every nn.Linear,
lm_head included; not the embedding table or the norm gains), reads the K/V of the positions each
new token attends to and writes its own (T + 1 positions, or the last W with a sliding window W),
and computes 2 FLOPs per weight per sequence plus 4·L·H·K·D FLOPs of attention per sequence, K the
positions attended. Weights, cache and matmuls share `dtype`; `cfg` is dense (no experts), with a
SwiGLU (3 matrices) or GELU (2) MLP. Activations are left out. "Per token" means per generated
token: a step of batch B generates B tokens.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig
from kvref.hardware import EnergyCosts, Hardware

REPLACES = "solutions/card11_energy/energy.py"


def memory_energy_per_token(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                            costs: EnergyCosts) -> float:
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + mlp) + d * cfg.vocab_size  # every nn.Linear, lm_head too
    K = min(seq_len + 1, cfg.sliding_window) if cfg.sliding_window else seq_len + 1  # positions attended
    joules_per_bit = costs.pj_per_bit / 1e12
    weight_bits = 8 * weights * dtype.itemsize  # read once a step, shared by the batch
    kv_bits = 8 * K * 2 * L * Hkv * D * dtype.itemsize  # each sequence's own
    return (weight_bits / batch + kv_bits) * joules_per_bit


def compute_energy_per_token(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                             costs: EnergyCosts) -> float:
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + mlp) + d * cfg.vocab_size  # every nn.Linear, lm_head too
    K = min(seq_len + 1, cfg.sliding_window) if cfg.sliding_window else seq_len + 1  # positions attended
    flops = 2 * batch * weights + 4 * L * batch * H * K * D
    return flops / batch * (costs.pj_per_fma / 2) / 1e12


def energy_crossover_batch(cfg: ModelConfig, seq_len: int, dtype: torch.dtype, costs: EnergyCosts) -> int | None:
    # Memory energy per token falls with the batch, compute's does not: double until it crosses, then bisect.
    def crosses(b):
        return compute_energy_per_token(cfg, b, seq_len, dtype, costs) >= memory_energy_per_token(cfg, b, seq_len, dtype, costs)
    hi = 1
    while not crosses(hi):
        hi *= 2
        if hi > 2**62:
            return None
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if crosses(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi

def dollars_per_million_tokens(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                               dollars_per_device_hour: float) -> float:
    # At 1 pJ per bit and per multiply-add, the energy katas return a step's bits and multiply-adds.
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + mlp) + d * cfg.vocab_size
    K = min(seq_len + 1, cfg.sliding_window) if cfg.sliding_window else seq_len + 1
    bytes_ = (weights + batch * K * 2 * L * Hkv * D) * dtype.itemsize
    flops = 2 * batch * weights + 4 * L * batch * H * K * D
    step = max(flops / hw.peak_flops(dtype), bytes_ / hw.mem_bandwidth)  # roofline, perfect overlap
    return dollars_per_device_hour * hw.n_devices / 3600 * step / batch * 1e6


def keep_prefix_cache(cfg: ModelConfig, hw: Hardware, prefix_len: int, dtype: torch.dtype, expected_reuses: float,
                      lifetime_s: float, dollars_per_device_hour: float, dollars_per_gb_hour: float) -> bool:
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + mlp) + d * cfg.vocab_size  # every nn.Linear, lm_head too
    P = prefix_len
    flops = 2 * P * weights + 4 * L * H * P * P * D  # the whole [P, P] square of scores
    kv_bytes = P * 2 * L * Hkv * D * dtype.itemsize
    prefill = max(flops / hw.peak_flops(dtype), (weights * dtype.itemsize + kv_bytes) / hw.mem_bandwidth)
    recompute = prefill * hw.n_devices * dollars_per_device_hour / 3600
    storage = kv_bytes / 1e9 * dollars_per_gb_hour * lifetime_s / 3600
    return expected_reuses * recompute - storage > 0
