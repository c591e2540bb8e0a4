"""A correct alternative to solutions/card11_energy/energy.py: the same katas, written another way.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires every
card11 test to pass. Here the weights are a list of matrix shapes summed; the energies are counted per
step and divided at the end with the bytes-to-bits factor written as a unit conversion; the crossover
is found by counting up the batch (to a bound past which none can cross); the dollar cost calls the
learner's own card02 `roofline_step_time`, as its docstring allows (the worked card02 solution stands
in for it here); and the prefix decision compares the reuses with a break-even count.
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig
from kvref.hardware import EnergyCosts, Hardware
from solutions.card02_memory_vs_compute.costs import roofline_step_time

REPLACES = "solutions/card11_energy/energy.py"

BITS_PER_BYTE = 8
PICO = 1e-12


def matrix_params(cfg: ModelConfig) -> int:
    """Parameters of every nn.Linear a step reads: per layer q, k, v, o and the MLP, then lm_head."""
    d, D = cfg.d_model, cfg.head_dim
    mlp = [(d, cfg.d_ff), (d, cfg.d_ff), (cfg.d_ff, d)] if cfg.mlp == "swiglu" else [(d, cfg.d_ff), (cfg.d_ff, d)]
    layer = [(d, cfg.n_heads * D), (d, cfg.n_kv_heads * D), (d, cfg.n_kv_heads * D), (cfg.n_heads * D, d), *mlp]
    return cfg.n_layers * sum(a * b for a, b in layer) + d * cfg.vocab_size


def attended(cfg: ModelConfig, seq_len: int) -> int:
    """Positions the new token attends to: the cached ones and itself, or the last W."""
    return seq_len + 1 if not cfg.sliding_window else min(seq_len + 1, cfg.sliding_window)


def step_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    kv_per_sequence = attended(cfg, seq_len) * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim
    return (matrix_params(cfg) + batch * kv_per_sequence) * dtype.itemsize


def step_flops(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    per_sequence = 2 * matrix_params(cfg) + 2 * 2 * cfg.n_layers * cfg.n_heads * attended(cfg, seq_len) * cfg.head_dim
    return batch * per_sequence


def memory_energy_per_token(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                            costs: EnergyCosts) -> float:
    """Joules spent moving bytes to or from memory, per generated token, in a decode step of `batch` sequences."""
    joules_per_step = step_bytes(cfg, batch, seq_len, dtype) * BITS_PER_BYTE * (costs.pj_per_bit * PICO)
    return joules_per_step / batch


def compute_energy_per_token(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                             costs: EnergyCosts) -> float:
    """Joules spent on arithmetic per generated token, in a decode step of `batch` sequences."""
    multiply_adds = step_flops(cfg, batch, seq_len) // 2  # every FLOP counted comes in multiply-add pairs
    return multiply_adds * (costs.pj_per_fma * PICO) / batch


def energy_crossover_batch(cfg: ModelConfig, seq_len: int, dtype: torch.dtype, costs: EnergyCosts) -> int | None:
    """The smallest batch at which compute energy per token is at least memory energy per token; None if none."""
    compute = compute_energy_per_token(cfg, 1, seq_len, dtype, costs)
    kv_floor = (step_bytes(cfg, 2, seq_len, dtype) - step_bytes(cfg, 1, seq_len, dtype)) * BITS_PER_BYTE * costs.pj_per_bit * PICO
    if compute <= kv_floor:
        return None
    batch = 1
    while memory_energy_per_token(cfg, batch, seq_len, dtype, costs) > compute:
        batch += 1
    return batch


def dollars_per_million_tokens(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                               dollars_per_device_hour: float) -> float:
    """Dollars per million generated tokens when `hw` decodes `batch` sequences of `seq_len` tokens."""
    seconds_per_token = roofline_step_time(cfg, hw, batch, seq_len, dtype, use_cache=True) / batch
    dollars_per_second = hw.n_devices * dollars_per_device_hour / 3600
    return dollars_per_second * seconds_per_token * 1_000_000


def keep_prefix_cache(cfg: ModelConfig, hw: Hardware, prefix_len: int, dtype: torch.dtype, expected_reuses: float,
                      lifetime_s: float, dollars_per_device_hour: float, dollars_per_gb_hour: float) -> bool:
    """Whether to keep a cached prefix of `prefix_len` tokens (True) rather than drop it and recompute it on reuse."""
    P = prefix_len
    kv_bytes = P * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    flops = 2 * P * matrix_params(cfg) + 4 * cfg.n_layers * cfg.n_heads * P * P * cfg.head_dim
    seconds = max(flops / hw.peak_flops(dtype), (matrix_params(cfg) * dtype.itemsize + kv_bytes) / hw.mem_bandwidth)
    per_reuse = seconds / 3600 * dollars_per_device_hour * hw.n_devices
    storage = (kv_bytes / 1e9) * (lifetime_s / 3600) * dollars_per_gb_hour
    return expected_reuses * per_reuse - storage > 0
