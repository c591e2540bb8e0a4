"""card02: memory versus compute.

The cache trades compute for memory: it stores K and V of every past token in every layer so
that a decode step reads them instead of recomputing them. How many bytes is that, and when is
reading cheaper than recomputing? A roofline answers the second question:

    time = max(flops / hw.peak_flops, bytes / hw.mem_bandwidth)

`hw` is a `kvref.roofline.Hardware` (`peak_flops` in FLOP/s, `mem_bandwidth` in bytes/s).
FLOPs are counted as in card01 (what FlopCounterMode counts on kvref's model: 2 per weight of
every nn.Linear per token, lm_head included, plus 4·L·H·T·D per token for q @ kᵀ and
softmax @ v over T keys). Bytes are the weight matrices, read once per step (the embedding
table is only indexed, the norm gains are vectors: neither counts), plus the K/V the step reads
from and writes to the cache. Weights and cache share one element size, `dtype_bytes`.

Shapes: B batch, T tokens cached, L layers, H query heads, Hkv KV heads, D head dim,
d = d_model, V vocab.
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig
from kvref.roofline import Hardware


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Bytes of the K/V cache holding `seq_len` positions of `batch` sequences, elements of `dtype_bytes` bytes.

    Each layer keeps K and V, each `[B, Hkv, T, D]`. Which heads count, the H query heads or the
    Hkv KV heads? Check yourself on the seed's question: 40 layers, 32 heads (MHA), head dim 128,
    fp16, 4000 tokens: is one user's cache 1.3 GB?
    """
    return 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype_bytes  # K and V


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one more token adds to one sequence's cache, with elements of `dtype`.

    How many bytes is one element of `dtype` (a torch.dtype, e.g. torch.bfloat16)? Then: what
    does one token store, in every layer? (Llama-2-70B in bf16: is 1,000 tokens 1.2 GB?)
    """
    return kv_cache_bytes(cfg, 1, 1, dtype.itemsize)  # itemsize is bytes; finfo(dtype).bits is bits


def decode_step_time(cfg: ModelConfig, hw: Hardware, batch: int, seq_len: int, dtype_bytes: int,
                     use_cache: bool) -> float:
    """Roofline seconds for one decode step: one new token per sequence after `seq_len` tokens.

    The sequence holds positions 0 .. seq_len - 1; the step feeds the token at position seq_len.
    Cached: a one-token forward whose scores span seq_len + 1 keys; it reads the weights, reads
    the seq_len cached K/V and writes the new one. Uncached: a forward over all seq_len + 1
    tokens, each scoring seq_len + 1 keys (kvref computes the whole rectangle); it reads the
    weights only (activations are not counted). Which of the two is memory-bound at batch 1?
    """
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + 3 * d * cfg.d_ff) + d * cfg.vocab_size
    T = seq_len + 1  # keys every new token scores
    S = 1 if use_cache else T  # tokens fed
    flops = 2 * batch * S * weights + 4 * L * batch * H * S * T * D
    bytes_ = weights * dtype_bytes
    if use_cache:
        bytes_ += kv_cache_bytes(cfg, batch, T, dtype_bytes)  # read seq_len entries, write one
    return max(flops / hw.peak_flops, bytes_ / hw.mem_bandwidth)


def recompute_to_read_ratio(cfg: ModelConfig, hw: Hardware, seq_len: int, dtype_bytes: int) -> float:
    """Time to recompute the K/V of `seq_len` past tokens over the time to read them from the cache.

    Recomputing token j's K and V in layer l needs its hidden state at layer l: which layers
    must it go through? Count that work as 2 FLOPs per weight of every nn.Linear (lm_head too)
    per token, at peak, and leave the attention scores aside (they only add to it). Reading
    costs the tokens' cache bytes at bandwidth. Does the ratio depend on `seq_len`? Below 1,
    recomputing would win: which models could that be?
    """
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + 3 * d * cfg.d_ff) + d * cfg.vocab_size
    recompute = seq_len * 2 * weights / hw.peak_flops  # every past token's whole forward pass
    read = kv_cache_bytes(cfg, 1, seq_len, dtype_bytes) / hw.mem_bandwidth
    return recompute / read  # seq_len cancels: 2·weights·bandwidth / (kv bytes per token·peak)
