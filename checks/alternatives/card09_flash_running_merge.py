"""A correct alternative to solutions/card09_io_awareness/flash.py: the intensity as 2·G / itemsize, the ridge
found by counting queries up, and flash-decoding's running merge split by split with logaddexp (guarded where
every split so far is empty).

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card09_io_awareness/flash.py"


def decode_attention_intensity(cfg: ModelConfig, dtype: torch.dtype) -> float:
    G = cfg.n_heads // cfg.n_kv_heads  # query heads per KV head
    # Per sequence and KV head: 2·G·T·D (q·kᵀ) + 2·G·T·D (p·v) FLOPs over 2·T·D elements of K and V.
    return 2.0 * G / dtype.itemsize


def queries_to_reach_ridge(cfg: ModelConfig, hw: Hardware, dtype: torch.dtype) -> int:
    per_query = 2 * (cfg.n_heads // cfg.n_kv_heads) / dtype.itemsize  # FLOP/B that each query token adds
    n = 1
    while n * per_query < hw.ridge_point(dtype):
        n += 1
    return n


def merge_split_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Flash-decoding's running merge, one split at a time.
    out, lse = outs[0].float(), lses[0].float()
    for o_i, l_i in zip(outs[1:].float(), lses[1:].float()):
        new = torch.logaddexp(lse, l_i)  # (B, H)
        keep = torch.where(torch.isinf(new), 0.0, torch.exp(lse - new))  # both empty so far: nothing to weigh
        take = torch.where(torch.isinf(new), 0.0, torch.exp(l_i - new))
        out, lse = keep[..., None] * out + take[..., None] * o_i, new
    return out.to(outs.dtype), lse
