"""A correct alternative to solutions/card09_io_awareness/flash.py: the intensity as 2·G / itemsize, the ridge
found by counting queries up, and flash-decoding's running merge split by split with logaddexp (guarded where
every split so far is empty).

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card09: IO-awareness, the reason decode attention is memory-bound and how Flash-Decoding splits it.

FlashAttention (Dao et al. 2022) is about bytes, not FLOPs: it tiles attention so that the T x T
score matrix never travels to GPU memory. A decode step has no score matrix to speak of (one
query row per head), but it has the same question in another form: how many FLOPs does it do
per byte it must read, and what does it do when one sequence cannot fill the GPU?

Decode attention here is one layer's attention for S new query tokens per sequence (S = 1 in
plain decoding) over T cached positions: scores q · kᵀ (`[B, H, S, T]`), a softmax, and the
weighted sum of the values (`[B, H, S, D]`). Count FLOPs as FlopCounterMode does: 2 per
multiply-add of the two matmuls, every query against every one of the T keys (a kernel computes
the whole rectangle; the mask and the softmax are not matmuls and do not count). Count the bytes
of K and V read from the cache, each element `dtype.itemsize` bytes, and nothing else (the
query and the output are S rows against T ≫ S: leave them out). Query head h reads KV head
h // G, with G = H / Hkv (grouped-query attention); a GQA kernel reads each KV head once for all
G of its query heads.

Flash-Decoding (Dao, Haziza, Massa, Sizov 2023) splits the T keys of each (sequence, KV head)
into N chunks, computes each chunk's attention separately, in parallel, and merges the partial
results. A split's partial is its softmax-normalised output and the log-sum-exp of its scores
(the scaled scores q · kᵀ / sqrt(D) of its keys): lse = log Σ_j exp(s_j).

Shapes: B batch, H query heads, Hkv KV heads, D head dim, T cached positions, N splits.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card09_io_awareness/flash.py"


def decode_attention_intensity(cfg: ModelConfig, dtype: torch.dtype) -> float:
    """FLOPs per byte of K and V read, of one plain decode step's attention (S = 1), as a Python float.

    For any batch, any context length T and any layer of `cfg` (`cfg.n_heads` query heads,
    `cfg.n_kv_heads` KV heads, `cfg.head_dim`), the cache held in `dtype`. Which of batch, T and
    head_dim survive in the ratio? Check: Llama-3-8B (32 query heads over 8 KV heads) in bf16.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    G = cfg.n_heads // cfg.n_kv_heads  # query heads per KV head
    # Per sequence and KV head: 2·G·T·D (q·kᵀ) + 2·G·T·D (p·v) FLOPs over 2·T·D elements of K and V.
    return 2.0 * G / dtype.itemsize


def queries_to_reach_ridge(cfg: ModelConfig, hw: Hardware, dtype: torch.dtype) -> int:
    """The fewest query tokens S per sequence per step that bring decode attention to `hw`'s ridge point.

    With S new tokens per sequence attending over the same T cached keys (speculative decoding
    verifying S - 1 drafted tokens, or a chunk of a prompt), the step reads K and V once and does
    S times the work. Return the smallest int S whose FLOPs per byte of K and V (counted as the
    module docstring says) are at least `hw.ridge_point(dtype)` (peak FLOP/s over bytes/s), the
    cache and the matmuls both in `dtype`. Check: Llama-2-70B (64 query heads over 8 KV heads) on
    an H100 in bf16.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    per_query = 2 * (cfg.n_heads // cfg.n_kv_heads) / dtype.itemsize  # FLOP/B that each query token adds
    n = 1
    while n * per_query < hw.ridge_point(dtype):
        n += 1
    return n


def merge_split_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N splits' partial attention results into the attention over all their keys. Returns (out, lse).

    outs `[N, B, H, D]`: split i's output for each (sequence, query head), normalised over split
    i's keys only (softmax over its own scores, times its values). lses `[N, B, H]` float32: split
    i's log-sum-exp, log Σ_j exp(s_j) over its scaled scores s_j; a split with no keys (a short
    sequence's last splits) has lse -inf and an output of zeros. At least one split of every
    (b, h) has keys. Scores can be large (hundreds): exp(100) overflows float16 and exp(89)
    float32.

    Return out `[B, H, D]` in outs' dtype, computed in float32, equal to softmax attention over
    the union of the splits' keys, and lse `[B, H]` float32, the log-sum-exp over that union (so
    that merged results can be merged again).
    """
    # Flash-decoding's running merge, one split at a time.
    out, lse = outs[0].float(), lses[0].float()
    for o_i, l_i in zip(outs[1:].float(), lses[1:].float()):
        new = torch.logaddexp(lse, l_i)  # (B, H)
        keep = torch.where(torch.isinf(new), 0.0, torch.exp(lse - new))  # both empty so far: nothing to weigh
        take = torch.where(torch.isinf(new), 0.0, torch.exp(l_i - new))
        out, lse = keep[..., None] * out + take[..., None] * o_i, new
    return out.to(outs.dtype), lse
