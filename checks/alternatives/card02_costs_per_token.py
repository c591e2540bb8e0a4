"""A correct alternative to solutions/card02_memory_vs_compute/costs.py: the cache as batch · seq_len · bytes per
token, a token's bytes from .nbytes of a meta [Hkv, D] tensor, the fit as headroom, the roofline as two named
terms compared by hand, the ratio per token (seq_len cancelled).

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card02: memory versus compute.

The cache trades compute for memory: it stores K and V of every past token in every layer so
that a decode step reads them instead of recomputing them. How many bytes is that, does it fit,
and when is reading cheaper than recomputing? A roofline answers the last question:

    time = max(flops / hw.peak_flops(dtype), bytes / hw.mem_bandwidth)

`hw` is a `kvref.hardware.Hardware`: `hw.peak_flops(dtype)` is the dense peak FLOP/s of matmuls
computing in `dtype` (it depends on the dtype: an H100 does 989 TFLOP/s in bf16, 67 in fp32),
`hw.mem_bandwidth` is in bytes/s and `hw.memory_bytes` is the memory the device reports. The
max() assumes compute and memory traffic overlap perfectly, so it is a lower bound on a step's
time; their sum is the no-overlap time at peak (not an upper bound: a real kernel below its peaks,
or launch overheads, can take longer than both).

FLOPs are counted as in card01 (what FlopCounterMode counts on kvref's model: 2 per weight of
every nn.Linear per token, lm_head included, plus 4·L·H·K·D per token for q @ kᵀ and
softmax @ v over the K keys of the scored rectangle). Bytes are the weight matrices, read once
per step (the embedding table is only indexed, the norm gains are vectors: neither counts),
plus the K/V the step reads from and writes to the cache. Weights, cache and matmuls share one
dtype. The models are dense, with a SwiGLU (gate, up, down: cfg.mlp == "swiglu") or GELU
(up, down: "gelu") MLP; a mixture of experts reads only the experts its tokens are routed to,
which these katas do not ask about (kvref.roofline, a spoiler, does it).

An element's size in bytes is `dtype.itemsize`, for every dtype: integer ones too (INT8 caches
are common). A kata here may call another kata, of this card or another (say card01's
`from katas.card01_redundancy.redundancy import forward_flops`); its tests then depend on that
kata too. The worked solutions do not.

Shapes: B batch, T positions, L layers, H query heads, Hkv KV heads, D head dim, d = d_model,
V vocab, W = cfg.sliding_window (0: none).
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card02_memory_vs_compute/costs.py"


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of a K/V cache holding `seq_len` positions of `batch` sequences, elements of `dtype`.

    Each layer keeps K and V, each `[B, Hkv, T, D]`. Which heads count, the H query heads or the
    Hkv KV heads? Check yourself on a widely shared answer: 40 layers, 32 heads (MHA), head dim
    128, fp16, 4000 tokens: is one user's cache 1.3 GB?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return batch * seq_len * kv_bytes_per_token(cfg, dtype)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one more token adds to one sequence's cache, with elements of `dtype`.

    How many bytes is one element of `dtype` (a torch.dtype: torch.bfloat16, torch.int8, ...)?
    Then: what does one token store, in every layer? (Llama-2-70B in bf16: are 1,000 tokens
    1.2 GB?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return 2 * cfg.n_layers * torch.empty(cfg.n_kv_heads, cfg.head_dim, dtype=dtype, device='meta').nbytes  # is bytes, finfo().bits bits


def fits_in_memory(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype) -> bool:
    """Whether the model's weights and a cache of `seq_len` positions for `batch` sequences fit in `hw`.

    Weights are every parameter, stored once in `dtype`: the q/k/v/o projections, the MLP (a
    mixture of experts stores all cfg.n_experts of them, and a router of d × n_experts weights,
    in every layer), the embedding table, lm_head (unless cfg.tie_embeddings: then it is the
    embedding table), the norm gains. The cache keeps all `seq_len` positions in `dtype` (a sliding-window model with
    a rolling buffer could keep fewer: not asked here). Activations, workspace and the
    allocator's overheads are ignored, so a True here can still run out of memory. Fit means
    at most `hw.memory_bytes`.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    experts = max(cfg.n_experts, 1)  # a mixture of experts stores every expert, whichever a token uses
    layer = 2 * d * H * D + 2 * d * Hkv * D + experts * mlp + d * cfg.n_experts + 2 * d  # + router, 2 norms
    embeddings = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d
    weights = (L * layer + embeddings + d) * dtype.itemsize  # + the final norm
    return hw.memory_bytes - weights >= kv_cache_bytes(cfg, batch, seq_len, dtype)  # weights once, not per sequence


def roofline_step_time(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype: torch.dtype,
                       use_cache: bool) -> float:
    """Roofline seconds (perfect overlap) of one decode step: one new token per sequence after `seq_len` tokens.

    The sequence holds positions 0 .. seq_len - 1; the step feeds the token at position seq_len.
    Cached: a one-token forward whose scores span the seq_len + 1 positions it attends to; it
    reads the weights, reads their cached K/V and writes its own. With a sliding window W, a
    token attends to the last W positions only (itself included): past W, the step reads W - 1
    cached positions and writes one. Uncached: a forward over all seq_len + 1 tokens, scoring a
    [seq_len + 1, seq_len + 1] rectangle (kvref computes all of it and masks afterwards); it
    reads the weights only (activations are not counted). `cfg` is dense (no experts). Which of
    the two is memory-bound at batch 1?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
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
    """Time to recompute the K/V of `seq_len` past tokens over the time to read them from the cache.

    Recomputing token j's K and V in layer l needs its hidden state at layer l: which layers
    must it go through, and which of their weights? Count that work as 2 FLOPs per weight of
    the nn.Linear layers it needs, per token, at the peak of `dtype`, and leave the attention
    scores of those layers aside (they only add to it). Reading costs the tokens' cache bytes
    at bandwidth. Does the ratio depend on `seq_len`? Below 1, recomputing would win: which
    models could that be? `cfg` is dense.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    layer = 2 * d * H * D + 2 * d * Hkv * D + mlp
    needed = (L - 1) * layer + 2 * d * Hkv * D  # every layer below the last, then its k and v projections
    return 2 * needed * hw.mem_bandwidth / (kv_bytes_per_token(cfg, dtype) * hw.peak_flops(dtype))  # seq_len cancels: 2·needed·bandwidth / (kv bytes per token·peak)
