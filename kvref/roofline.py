"""The roofline cost model: a step takes as long as its FLOPs at peak or its bytes at bandwidth.

    time = max(flops / peak_flops, bytes / mem_bandwidth)

A step whose arithmetic intensity (FLOPs per byte moved) is below the hardware's ridge point
(peak / bandwidth) is memory-bound. The model ignores overlap losses, kernel launches and
caches, so it is a lower bound on a step's time and a guide to which resource limits it.

What a step of kvref's decoder costs (shapes: B batch, S new tokens per sequence, T keys each
new token's row of scores spans, L layers, H query heads, D head dim, M matmul weights):

- FLOPs, exactly what FlopCounterMode counts on kvref's model (`kvref.measure`): 2 per weight
  per token for every nn.Linear (lm_head included, on every position), plus 4·L·B·H·S·T·D for
  the attention matmuls (q @ kᵀ and softmax @ v over the whole `[S, T]` rectangle: kvref
  masks the future scores after computing them);
- bytes: every weight matrix once per step (the embedding table is only indexed, the norm
  gains are vectors), plus the K/V the step reads from and writes to the cache. Activations
  are left out.

Mixture-of-experts is not modelled (ModelConfig has one MLP per layer), nor MLA's weights:
the dense functions raise for MLA configs, whose cache size alone `kv_bytes_per_token` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from kvref.config import ModelConfig


# --- argument checks ------------------------------------------------------------------------

def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_positive(name: str, x) -> None:
    if not _is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x!r}")


def _check_nonnegative(name: str, x) -> None:
    if not _is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {x!r}")


def _check_int(name: str, x, minimum: int) -> None:
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def _check_hardware(hw) -> None:
    if not isinstance(hw, Hardware):
        raise TypeError(f"hw must be a kvref.roofline.Hardware, got {type(hw).__name__}")


def _check_config(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a kvref.config.ModelConfig, got {type(cfg).__name__}")


def _check_dense(cfg) -> None:
    _check_config(cfg)
    if cfg.is_mla:
        raise ValueError("MLA weight shapes are not in ModelConfig: kvref.roofline counts FLOPs and "
                         "weights of GQA/MHA models only (kv_bytes_per_token handles MLA)")


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float     # FLOP/s: dense (no sparsity) bf16 tensor-core peak
    mem_bandwidth: float  # bytes/s: HBM bandwidth
    memory_bytes: int     # HBM capacity in bytes, as the datasheet names it (decimal GB)
    source: str           # where the numbers come from

    def __post_init__(self) -> None:
        for field_name in ("name", "source"):
            value = getattr(self, field_name)
            if not isinstance(value, str):
                raise TypeError(f"Hardware.{field_name} must be a str, got {type(value).__name__}")
            if not value:
                raise ValueError(f"Hardware.{field_name} must not be empty")
        for field_name in ("peak_flops", "mem_bandwidth", "memory_bytes"):
            _check_positive(f"Hardware.{field_name}", getattr(self, field_name))

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte at which compute and memory take equally long."""
        return self.peak_flops / self.mem_bandwidth


# Vendor datasheets. Peaks are the dense figures; NVIDIA's headline bf16 numbers for H100 and
# H200 (1,979 TFLOP/s) and A100 (624) assume 2:4 structured sparsity and are twice these.
A100_40GB = Hardware(
    "A100-40GB", 312e12, 1555e9, 40 * 10**9,
    # NVIDIA A100 Tensor Core GPU datasheet: 40GB HBM2, 1,555 GB/s; BF16 tensor core 312 TFLOPS.
    "NVIDIA A100 datasheet: 1,555 GB/s HBM2, 312 TFLOP/s dense bf16",
)
A100_80GB_SXM = Hardware(
    "A100-80GB-SXM", 312e12, 2039e9, 80 * 10**9,
    # NVIDIA A100 Tensor Core GPU datasheet: A100 80GB SXM, HBM2e 2,039 GB/s; same tensor cores.
    "NVIDIA A100 datasheet: 80GB SXM, 2,039 GB/s HBM2e, 312 TFLOP/s dense bf16",
)
H100_SXM = Hardware(
    "H100-SXM", 989e12, 3.35e12, 80 * 10**9,
    # NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 80GB HBM3, 3.35 TB/s; BF16 1,979 TFLOPS
    # with sparsity, so 989 dense.
    "NVIDIA H100 datasheet: SXM, 3.35 TB/s HBM3, 989 TFLOP/s dense bf16",
)
H200 = Hardware(
    "H200", 989e12, 4.8e12, 141 * 10**9,
    # NVIDIA H200 Tensor Core GPU datasheet: 141GB HBM3e, 4.8 TB/s; the H100's compute.
    "NVIDIA H200 datasheet: 141GB HBM3e, 4.8 TB/s, 989 TFLOP/s dense bf16",
)
HARDWARE: dict[str, Hardware] = {hw.name: hw for hw in (A100_40GB, A100_80GB_SXM, H100_SXM, H200)}


def hardware(name: str) -> Hardware:
    """Look up a hardware preset by name."""
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}") from None


# --- the roofline ---------------------------------------------------------------------------

def step_time(flops: float, bytes_: float, hw: Hardware) -> float:
    """Seconds for a step of `flops` FLOPs moving `bytes_` bytes: the slower of the two."""
    _check_nonnegative("flops", flops)
    _check_nonnegative("bytes_", bytes_)
    _check_hardware(hw)
    return max(flops / hw.peak_flops, bytes_ / hw.mem_bandwidth)


def arithmetic_intensity(flops: float, bytes_: float) -> float:
    """FLOPs per byte moved."""
    _check_nonnegative("flops", flops)
    _check_positive("bytes_", bytes_)
    return flops / bytes_


def ridge_point(hw: Hardware) -> float:
    """Peak FLOP/s over bandwidth: below this intensity a step is memory-bound."""
    _check_hardware(hw)
    return hw.ridge_point


@dataclass(frozen=True)
class Cost:
    """What one step does: FLOPs computed and bytes moved to or from memory."""
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return arithmetic_intensity(self.flops, self.bytes)

    def time(self, hw: Hardware) -> float:
        return step_time(self.flops, self.bytes, hw)

    def memory_bound(self, hw: Hardware) -> bool:
        return self.intensity < ridge_point(hw)


# --- what a model's steps cost --------------------------------------------------------------

def matmul_params(cfg: ModelConfig) -> int:
    """M: weights a token is multiplied by in one forward pass (every nn.Linear, lm_head too)."""
    _check_dense(cfg)
    d, H, Hkv, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * cfg.d_ff  # q, k+v, o; gate, up, down
    return cfg.n_layers * per_layer + d * cfg.vocab_size  # + lm_head


def n_params(cfg: ModelConfig) -> int:
    """Every parameter of kvref's model for `cfg`: matmul weights, embedding table, norm gains."""
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    return matmul_params(cfg) + cfg.vocab_size * cfg.d_model + norms


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: float) -> float:
    """Cache bytes one token adds: K and V in every layer (MLA: one latent and a RoPE key)."""
    _check_config(cfg)
    _check_positive("dtype_bytes", dtype_bytes)
    if cfg.is_mla:
        return cfg.n_layers * (cfg.mla_latent_dim + cfg.mla_rope_dim) * dtype_bytes
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def forward_flops(cfg: ModelConfig, batch: int, n_new: int, n_cached: int) -> int:
    """FLOPs of one forward pass of `n_new` tokens per sequence after `n_cached` cached ones."""
    _check_dense(cfg)
    _check_int("batch", batch, 1)
    _check_int("n_new", n_new, 1)
    _check_int("n_cached", n_cached, 0)
    T = n_cached + n_new  # keys in every new token's row of scores
    dense = 2 * batch * n_new * matmul_params(cfg)
    attention = 4 * cfg.n_layers * batch * cfg.n_heads * n_new * T * cfg.head_dim
    return dense + attention


def prefill_cost(cfg: ModelConfig, batch: int, prompt_len: int, dtype_bytes: float,
                 kv_dtype_bytes: float | None = None) -> Cost:
    """A prompt of `prompt_len` tokens per sequence: weights read once, the prompt's K/V written."""
    kv_dtype_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    flops = forward_flops(cfg, batch, prompt_len, 0)
    written = batch * prompt_len * kv_bytes_per_token(cfg, kv_dtype_bytes)
    return Cost(flops, _weight_bytes(cfg, dtype_bytes) + written)


def decode_cost(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: float, use_cache: bool = True,
                kv_dtype_bytes: float | None = None) -> Cost:
    """One new token per sequence after `seq_len` tokens (positions 0 .. seq_len - 1).

    Cached: one token's forward, attending seq_len + 1 keys; reads the seq_len cached K/V and
    writes the new one. Uncached: a forward over all seq_len + 1 tokens, every K/V recomputed;
    only the weights are read.
    """
    _check_int("seq_len", seq_len, 1)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
    kv_dtype_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    weights = _weight_bytes(cfg, dtype_bytes)
    if not use_cache:
        return Cost(forward_flops(cfg, batch, seq_len + 1, 0), weights)
    kv = batch * (seq_len + 1) * kv_bytes_per_token(cfg, kv_dtype_bytes)  # read seq_len, write 1
    return Cost(forward_flops(cfg, batch, 1, seq_len), weights + kv)


def prefill_time(cfg: ModelConfig, hw: Hardware, batch: int, prompt_len: int, dtype_bytes: float) -> float:
    return prefill_cost(cfg, batch, prompt_len, dtype_bytes).time(hw)


def decode_time(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype_bytes: float,
                use_cache: bool = True) -> float:
    return decode_cost(cfg, batch, seq_len, dtype_bytes, use_cache).time(hw)


def recompute_to_read_ratio(cfg: ModelConfig, hw: Hardware, dtype_bytes: float) -> float:
    """Time to recompute one past token's K/V over the time to read them from the cache.

    Recomputing needs the token's whole forward pass (layer l's input depends on every layer
    below): about 2·M FLOPs at peak, not counting its attention scores, which only add to it.
    Reading costs kv_bytes_per_token at bandwidth. Both scale with the number of past tokens,
    so the ratio does not depend on sequence length. Below 1, recomputing would be faster.
    """
    _check_hardware(hw)
    recompute = 2 * matmul_params(cfg) / hw.peak_flops
    read = kv_bytes_per_token(cfg, dtype_bytes) / hw.mem_bandwidth
    return recompute / read


def caching_loses(cfg: ModelConfig, hw: Hardware, dtype_bytes: float) -> bool:
    """True when 2·M < kv_bytes_per_token · ridge point: only for toy models, never a real one."""
    return recompute_to_read_ratio(cfg, hw, dtype_bytes) < 1


def _weight_bytes(cfg: ModelConfig, dtype_bytes: float) -> float:
    _check_positive("dtype_bytes", dtype_bytes)
    return matmul_params(cfg) * dtype_bytes
