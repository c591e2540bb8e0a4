"""Spoiler: answers cards 01 and 02 (FLOPs of a forward pass, KV bytes, the decode roofline, recompute or read, what fits).

Read it after you pass those cards: the katas ask you to derive what is written here. The spec
types they use come from modules that hold no answers: `kvref.config` (ModelConfig, presets) and
`kvref.hardware` (Hardware, presets).

The roofline cost model: a step takes at least as long as its FLOPs at peak and at least as
long as its bytes at bandwidth.

    time = max(flops / hw.peak_flops(dtype), bytes / hw.mem_bandwidth)

That is the perfect-overlap lower bound: compute and memory traffic fully hidden behind each
other. The sum of the two (`Cost.time_no_overlap`) is the no-overlap time at peak: compute, then
memory traffic, each at its peak rate. It bounds a real step from above only if the step reaches
both peaks; launch overheads, cache misses and kernels below peak can put a real step above both
figures. The peak is that
of the dtype the matmuls compute in: fp32 matmuls get the fp32 peak (PyTorch does not use TF32
unless allowed), bf16 the bf16 one. A step whose arithmetic intensity (FLOPs per byte) is below
the ridge point (peak / bandwidth) is memory-bound.

What a step of kvref's decoder costs (B batch, S new tokens per sequence, T = cached + S
positions, L layers, H query heads, D head dim):

- FLOPs, exactly what FlopCounterMode counts on kvref's model (`kvref.measure`): 2 per weight
  per token for every nn.Linear a token goes through (lm_head included, on every position; for
  a mixture of experts, the router and the experts_per_token experts it picks), plus
  4·L·B·H·S·K·D for the attention matmuls, K the keys of the scored rectangle: T (kvref computes
  the whole `[S, T]` rectangle and masks the future afterwards), or with a sliding window W
  only the keys some new query can see, min(T, W + S - 1). Fused kernels skip masked scores
  (FlashAttention's causal and windowed modes): about half of a causal prefill's rectangle, and
  past a window about S·W of its S·T, so a long prefill's attention costs less on them than here;
- bytes: every weight matrix the step multiplies by, once per step (the embedding table is only
  indexed, the norm gains are vectors), plus the K/V it reads and writes. A mixture of experts
  reads only the experts its B·S tokens are routed to: with uniform, independent routing (an
  assumption: real routers are skewed), E·(1 - (1 - k/E)^(B·S)) distinct experts per layer in
  expectation, about k·B·S at batch 1 and nearly all E at large batch. A cached decode step
  reads the positions its new token attends to and writes its own: min(T, W) with a window
  (Mistral's rolling buffer keeps exactly those). Activations are left out.

Capacity: a model needs every parameter (`n_params`, a tied embedding once) plus its cache in
the device's memory (`memory_needed`, activations and the allocator's overheads ignored).
MLA models are sized by `kv_bytes_per_token` only: kvref.roofline does not count the FLOPs or
weights of their projections (the low-rank q and kv paths of kvref/mla.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware


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
        raise TypeError(f"hw must be a kvref.hardware.Hardware, got {type(hw).__name__}")


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")


def _check_config(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a kvref.config.ModelConfig, got {type(cfg).__name__}")


def _kv_element_bytes(dtype_bytes, kv_dtype_bytes) -> float:
    """The cache's element size: the weights' unless given apart (and then checked under its own name)."""
    if kv_dtype_bytes is None:
        return dtype_bytes
    _check_positive("kv_dtype_bytes", kv_dtype_bytes)
    return kv_dtype_bytes


def _check_costed(cfg) -> None:
    _check_config(cfg)
    if cfg.is_mla:
        raise ValueError("kvref.roofline does not cost MLA models: it counts the FLOPs and weights of GQA/MHA "
                         "attention only (kv_bytes_per_token handles MLA)")


# --- the roofline ---------------------------------------------------------------------------

def step_time(flops: float, bytes_: float, hw: Hardware, dtype: torch.dtype, allow_tf32: bool = False) -> float:
    """Seconds for `flops` FLOPs in `dtype` and `bytes_` bytes, perfectly overlapped: the slower of the two.

    A lower bound on the step's time (compare `step_time_no_overlap`, the no-overlap time at peak).
    """
    _check_nonnegative("flops", flops)
    _check_nonnegative("bytes_", bytes_)
    _check_hardware(hw)
    _check_dtype(dtype)
    return max(flops / hw.peak_flops(dtype, allow_tf32), bytes_ / hw.mem_bandwidth)


def step_time_no_overlap(flops: float, bytes_: float, hw: Hardware, dtype: torch.dtype,
                         allow_tf32: bool = False) -> float:
    """The same step with compute and memory traffic one after the other, each at peak.

    Not a bound on a real step's time: kernels below peak and launch overheads can exceed it."""
    _check_nonnegative("flops", flops)
    _check_nonnegative("bytes_", bytes_)
    _check_hardware(hw)
    _check_dtype(dtype)
    return flops / hw.peak_flops(dtype, allow_tf32) + bytes_ / hw.mem_bandwidth


def arithmetic_intensity(flops: float, bytes_: float) -> float:
    """FLOPs per byte moved."""
    _check_nonnegative("flops", flops)
    _check_positive("bytes_", bytes_)
    return flops / bytes_


def ridge_point(hw: Hardware, dtype: torch.dtype) -> float:
    """Peak FLOP/s in `dtype` over bandwidth: below this intensity a step is memory-bound."""
    _check_hardware(hw)
    _check_dtype(dtype)
    return hw.ridge_point(dtype)


@dataclass(frozen=True)
class Cost:
    """What one step does: FLOPs computed and bytes moved to or from memory."""
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return arithmetic_intensity(self.flops, self.bytes)

    def time(self, hw: Hardware, dtype: torch.dtype) -> float:
        """Perfect overlap: max of compute and memory time (a lower bound)."""
        return step_time(self.flops, self.bytes, hw, dtype)

    def time_no_overlap(self, hw: Hardware, dtype: torch.dtype) -> float:
        """No overlap: compute time plus memory time, each at peak."""
        return step_time_no_overlap(self.flops, self.bytes, hw, dtype)

    def memory_bound(self, hw: Hardware, dtype: torch.dtype) -> bool:
        return self.intensity < ridge_point(hw, dtype)


# --- what a model stores and multiplies by --------------------------------------------------------

def _attention_params(cfg: ModelConfig) -> int:
    d, H, Hkv, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return d * H * D + 2 * d * Hkv * D + H * D * d  # q, k + v, o


def _mlp_params(cfg: ModelConfig) -> int:
    """One MLP (one expert): gate, up, down for SwiGLU; up, down for GELU."""
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.d_ff


def _layer_params(cfg: ModelConfig, experts: float) -> float:
    """Matmul weights of one layer with `experts` MLPs (1 for a dense layer), the router included."""
    router = cfg.d_model * cfg.n_experts
    return _attention_params(cfg) + experts * _mlp_params(cfg) + router


def matmul_params(cfg: ModelConfig) -> int:
    """Every nn.Linear weight the model stores (every expert; lm_head once, tied or not)."""
    _check_costed(cfg)
    return cfg.n_layers * _layer_params(cfg, max(cfg.n_experts, 1)) + cfg.d_model * cfg.vocab_size


def active_matmul_params(cfg: ModelConfig) -> int:
    """M: the weights one token is multiplied by in a forward pass (MoE: the experts it is routed to)."""
    _check_costed(cfg)
    return cfg.n_layers * _layer_params(cfg, max(cfg.experts_per_token, 1)) + cfg.d_model * cfg.vocab_size


def n_params(cfg: ModelConfig) -> int:
    """Every parameter of kvref's model for `cfg`: matmul weights, embedding table, norm gains."""
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return matmul_params(cfg) + embedding + norms


def expected_experts(cfg: ModelConfig, tokens: int) -> float:
    """Distinct experts per layer that `tokens` tokens are routed to, in expectation (dense: 1).

    Assumes each token picks its k = experts_per_token experts uniformly and independently of
    the others: an expert is missed by one token with probability 1 - k/E, by all with
    (1 - k/E)^tokens. Real routers are skewed, so real steps touch somewhat fewer.
    """
    _check_config(cfg)
    _check_int("tokens", tokens, 1)
    if not cfg.is_moe:
        return 1
    E, k = cfg.n_experts, cfg.experts_per_token
    return E * (1 - (1 - k / E) ** tokens)


def weight_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: float) -> float:
    """Bytes of weight matrices a step of `tokens` tokens reads: each matrix it uses, once."""
    _check_costed(cfg)
    _check_positive("dtype_bytes", dtype_bytes)
    if not cfg.is_moe:
        return matmul_params(cfg) * dtype_bytes
    used = cfg.n_layers * _layer_params(cfg, expected_experts(cfg, tokens)) + cfg.d_model * cfg.vocab_size
    return used * dtype_bytes


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: float) -> float:
    """Cache bytes one token adds: K and V in every layer (MLA: one latent and a RoPE key)."""
    _check_config(cfg)
    _check_positive("dtype_bytes", dtype_bytes)
    if cfg.is_mla:
        return cfg.n_layers * (cfg.mla_latent_dim + cfg.mla_rope_dim) * dtype_bytes
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def attended_positions(cfg: ModelConfig, seq_len: int) -> int:
    """Positions a token at position seq_len - 1 attends to: seq_len, or the window W past it."""
    _check_config(cfg)
    _check_int("seq_len", seq_len, 1)
    return min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len


def memory_needed(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: float,
                  kv_dtype_bytes: float | None = None) -> float:
    """Bytes of every parameter plus a full cache of `seq_len` positions for `batch` sequences.

    Activations, workspace and the allocator's fragmentation are ignored. A sliding-window
    model with a rolling buffer would need only its window's positions; this counts all.
    """
    _check_int("batch", batch, 1)
    _check_int("seq_len", seq_len, 1)
    _check_positive("dtype_bytes", dtype_bytes)
    kv_dtype_bytes = _kv_element_bytes(dtype_bytes, kv_dtype_bytes)
    return n_params(cfg) * dtype_bytes + batch * seq_len * kv_bytes_per_token(cfg, kv_dtype_bytes)


def fits(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype) -> bool:
    """Whether the weights and a full `dtype` cache fit in the device's reported memory."""
    _check_hardware(hw)
    _check_dtype(dtype)
    return memory_needed(cfg, batch, seq_len, dtype.itemsize) <= hw.memory_bytes


# --- what a model's steps cost --------------------------------------------------------------

def forward_flops(cfg: ModelConfig, batch: int, n_new: int, n_cached: int) -> int:
    """FLOPs of one forward pass of `n_new` tokens per sequence after `n_cached` cached ones."""
    _check_costed(cfg)
    _check_int("batch", batch, 1)
    _check_int("n_new", n_new, 1)
    _check_int("n_cached", n_cached, 0)
    T = n_cached + n_new  # positions up to the last new token
    keys = min(T, cfg.sliding_window + n_new - 1) if cfg.sliding_window else T  # the scored rectangle's width
    dense = 2 * batch * n_new * active_matmul_params(cfg)
    attention = 4 * cfg.n_layers * batch * cfg.n_heads * n_new * keys * cfg.head_dim
    return dense + attention


def prefill_cost(cfg: ModelConfig, batch: int, prompt_len: int, dtype_bytes: float,
                 kv_dtype_bytes: float | None = None) -> Cost:
    """A prompt of `prompt_len` tokens per sequence: weights read once, the prompt's K/V written."""
    kv_dtype_bytes = _kv_element_bytes(dtype_bytes, kv_dtype_bytes)
    flops = forward_flops(cfg, batch, prompt_len, 0)
    written = batch * prompt_len * kv_bytes_per_token(cfg, kv_dtype_bytes)
    return Cost(flops, weight_bytes(cfg, batch * prompt_len, dtype_bytes) + written)


def decode_cost(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: float, use_cache: bool = True,
                kv_dtype_bytes: float | None = None) -> Cost:
    """One new token per sequence after `seq_len` tokens (positions 0 .. seq_len - 1).

    Cached: one token's forward, attending seq_len + 1 positions (the window's W past it);
    reads their cached K/V and writes the new one. Uncached: a forward over all seq_len + 1
    tokens, every K/V recomputed; only the weights are read.
    """
    _check_int("seq_len", seq_len, 1)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
    kv_dtype_bytes = _kv_element_bytes(dtype_bytes, kv_dtype_bytes)
    if not use_cache:
        return Cost(forward_flops(cfg, batch, seq_len + 1, 0), weight_bytes(cfg, batch * (seq_len + 1), dtype_bytes))
    touched = attended_positions(cfg, seq_len + 1)  # read touched - 1, write 1
    kv = batch * touched * kv_bytes_per_token(cfg, kv_dtype_bytes)
    return Cost(forward_flops(cfg, batch, 1, seq_len), weight_bytes(cfg, batch, dtype_bytes) + kv)


def prefill_time(cfg: ModelConfig, hw: Hardware, batch: int, prompt_len: int, dtype: torch.dtype) -> float:
    """Roofline seconds (perfect overlap) of a prefill with weights, cache and matmuls in `dtype`."""
    _check_dtype(dtype)
    return prefill_cost(cfg, batch, prompt_len, dtype.itemsize).time(hw, dtype)


def decode_time(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                use_cache: bool = True) -> float:
    """Roofline seconds (perfect overlap) of a decode step with weights, cache and matmuls in `dtype`."""
    _check_dtype(dtype)
    return decode_cost(cfg, batch, seq_len, dtype.itemsize, use_cache).time(hw, dtype)


# --- recompute or read ------------------------------------------------------------------------

def kv_recompute_params(cfg: ModelConfig) -> int:
    """Weights one token goes through to rebuild its K and V in every layer.

    Layer l's K/V need layer l's input, which every layer below computes: all of layers
    0 .. L-2, then the last layer's K and V projections. Not its q/o or MLP, not lm_head.
    """
    _check_costed(cfg)
    return (cfg.n_layers - 1) * _layer_params(cfg, max(cfg.experts_per_token, 1)) \
        + 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim


def recompute_to_read_ratio(cfg: ModelConfig, hw: Hardware, dtype: torch.dtype) -> float:
    """Time to recompute one past token's K/V over the time to read them from the cache.

    Recomputing costs 2 FLOPs per weight of `kv_recompute_params` at the dtype's peak, not
    counting the recomputed layers' own attention scores, which only add to it. Reading costs
    kv_bytes_per_token at bandwidth. Both scale with the number of past tokens, so the ratio
    does not depend on sequence length. Below 1, recomputing would be faster.
    """
    _check_hardware(hw)
    _check_dtype(dtype)
    recompute = 2 * kv_recompute_params(cfg) / hw.peak_flops(dtype)
    read = kv_bytes_per_token(cfg, dtype.itemsize) / hw.mem_bandwidth
    return recompute / read


def caching_loses(cfg: ModelConfig, hw: Hardware, dtype: torch.dtype) -> bool:
    """True when recomputing a token's K/V beats reading them: only for toy models, never a real one."""
    return recompute_to_read_ratio(cfg, hw, dtype) < 1
