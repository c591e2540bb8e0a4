"""card11: power and cost modeling.

What does one generated token cost, in joules and in dollars? A decode step (one new token for each
of B sequences that hold T tokens) moves bytes and does arithmetic, and both cost energy:

    joules = bits moved · pJ per bit + multiply-adds · pJ per multiply-add      (· 1e-12)

`costs` is a `kvref.hardware.EnergyCosts`: `costs.pj_per_bit` per bit (not byte) moved between
memory and the chip, `costs.pj_per_fma` per fused multiply-add, which is 2 FLOPs. Two sets ship:
`SOURCE_CARD_ENERGY` (0.5 pJ/bit, 5 pJ per FP16 FMA: the premise of a widely shared question, with
no source) and `PUBLISHED_ENERGY` (about 4 pJ/bit for HBM2, O'Connor et al. MICRO 2017; an FP16
multiply 1.1 pJ plus an add 0.4 pJ at 45 nm, Horowitz ISSCC 2014). Read their `source` fields.

The step is card02's cached decode step: it reads every weight matrix once (every nn.Linear,
lm_head included; not the embedding table or the norm gains), reads the K/V of the positions each
new token attends to and writes its own (T + 1 positions in all: T read, 1 written; with a sliding
window W, at most W: W - 1 read, 1 written),
and computes 2 FLOPs per weight per sequence plus 4·L·H·K·D FLOPs of attention per sequence, K the
positions attended. Weights, cache and matmuls share `dtype`; `cfg` is dense (no experts), with a
SwiGLU (3 matrices) or GELU (2) MLP. Activations are left out. "Per token" means per generated
token: a step of batch B generates B tokens.

Money: `hw` is a `kvref.hardware.Hardware` (`hw.n_devices` devices, each billed per hour), a step
takes its roofline time, max(FLOPs / hw.peak_flops(dtype), bytes / hw.mem_bandwidth): the cached
step of your own card02 kata `roofline_step_time`. A kata here may call it (`from
katas.card02_memory_vs_compute.costs import roofline_step_time`; kvref.roofline is a spoiler and
is refused); its tests then depend on that kata too. GB means 10^9 bytes.

Shapes: B batch, T tokens already in each sequence, L layers, H query heads, Hkv KV heads,
D head dim, d = d_model, V vocab, W = cfg.sliding_window (0: none).
"""

from __future__ import annotations

import math  # noqa: F401 (for your answers)

import torch

from kvref.config import ModelConfig
from kvref.hardware import EnergyCosts, Hardware


def memory_energy_per_token(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                            costs: EnergyCosts) -> float:
    """Joules spent moving bytes to or from memory, per generated token, in a decode step of `batch` sequences.

    Each sequence holds `seq_len` tokens and gets one more. What does the step read and write, which
    of it is shared by the whole batch, and how many bits is a byte? (Llama-2-70B, bf16, 4,095 tokens,
    batch 1, published constants: a few joules. Is that per step or per token, and does it fall
    with the batch?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    raise NotImplementedError("memory_energy_per_token: the step's bytes, in bits, times pJ per bit, in joules, per generated token (about 5 lines)")


def compute_energy_per_token(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                             costs: EnergyCosts) -> float:
    """Joules spent on arithmetic per generated token, in a decode step of `batch` sequences.

    Count the step's FLOPs as card01/card02 do, then ask how many FLOPs one multiply-add is,
    since `costs.pj_per_fma` is per multiply-add. Does the answer depend on the batch, or on
    `dtype` (beyond the constants, which are for 16-bit floats)?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    raise NotImplementedError("compute_energy_per_token: the step's FLOPs as multiply-adds, times pJ per multiply-add, in joules, per generated token (about 5 lines)")


def energy_crossover_batch(cfg: ModelConfig, seq_len: int, dtype: torch.dtype, costs: EnergyCosts) -> int | None:
    """The smallest batch at which compute energy per token is at least memory energy per token; None if none.

    From the two energies above, as functions of the batch at this `seq_len`: which one falls as
    the batch grows, towards what floor? If that floor already exceeds the compute energy, no
    batch crosses (return None). Whether that batch fits in memory is another question, not asked.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    raise NotImplementedError("energy_crossover_batch: the batch where the falling memory energy per token meets the flat compute energy (about 8 lines)")


def dollars_per_million_tokens(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                               dollars_per_device_hour: float) -> float:
    """Dollars per million generated tokens when `hw` decodes `batch` sequences of `seq_len` tokens.

    Every one of `hw.n_devices` devices is rented at `dollars_per_device_hour` for the roofline
    time of each step (your card02 `roofline_step_time`, cached), and a step generates `batch`
    tokens. Llama-2-70B needs two H100s: who pays for the second?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    raise NotImplementedError("dollars_per_million_tokens: the roofline step time, every device's price, tokens per step (about 7 lines)")


def keep_prefix_cache(cfg: ModelConfig, hw: Hardware, prefix_len: int, dtype: torch.dtype, expected_reuses: float,
                      lifetime_s: float, dollars_per_device_hour: float, dollars_per_gb_hour: float) -> bool:
    """Whether to keep a cached prefix of `prefix_len` tokens (True) rather than drop it and recompute it on reuse.

    Keeping costs its K/V bytes stored for `lifetime_s` seconds at `dollars_per_gb_hour` per GB
    (10^9 bytes). Dropping costs, at each of `expected_reuses` reuses, a prefill of the prefix (one
    sequence of prefix_len tokens from an empty cache): its roofline time, with every weight matrix
    read once, the prefix's K/V written, and FLOPs as card01 counts them (all prefix_len tokens
    through every nn.Linear, and 4·L·H·prefix_len²·D of attention: the whole square is computed),
    on all `hw.n_devices` devices at `dollars_per_device_hour` each. Keep when reuse is worth more
    than storage (strictly).

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    raise NotImplementedError("keep_prefix_cache: reuses x the dollars of one prefill of the prefix against the dollars of storing its K/V (about 9 lines)")
