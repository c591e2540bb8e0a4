"""A correct alternative to solutions/card05_batching/batching.py: the batch by a floor of true divisions, the
ratio of seconds per token (the inverse ratio inverted), admission that recounts the reserved positions at
each candidate and deletes the head, tokens from one batched argmax and retirement by removal in a loop.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card05_batching/batching.py"


def max_batch_from_memory(cfg: ModelConfig, free_bytes: int, seq_len: int, dtype: torch.dtype) -> int:
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V, every layer
    return math.floor(free_bytes / seq_len / per_token)


def layers_doubled_throughput_ratio(cfg: ModelConfig, hw: Hardware, free_bytes: int, seq_len: int,
                                    dtype: torch.dtype) -> float:
    def seconds_per_token(c: ModelConfig) -> float:
        batch = max_batch_from_memory(c, free_bytes, seq_len + 1, dtype)
        mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff
        attn = 2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim
        weights = c.n_layers * (attn + mlp) + c.d_model * c.vocab_size
        flops = 2 * batch * weights + 4 * c.n_layers * batch * c.n_heads * (seq_len + 1) * c.head_dim
        kv = batch * (seq_len + 1) * 2 * c.n_layers * c.n_kv_heads * c.head_dim * dtype.itemsize
        time = max(flops / hw.peak_flops(dtype), (weights * dtype.itemsize + kv) / hw.mem_bandwidth)
        return time / batch  # seconds a token

    return seconds_per_token(cfg) / seconds_per_token(cfg.with_(n_layers=2 * cfg.n_layers))


def continuous_batching_step(forward, running: list, waiting: list, max_batch: int, kv_budget_tokens: int) -> list:
    def most_positions(r):  # the prompt and every generated token but the last
        return len(r.prompt) + r.max_new_tokens - 1
    while waiting and len(running) < max_batch:
        if sum(map(most_positions, running)) + most_positions(waiting[0]) <= kv_budget_tokens:
            running.append(waiting[0])
            del waiting[0]
        else:
            break
    if not running:
        return []
    tokens = forward(running).argmax(dim=-1).tolist()  # (len(running),) Python ints
    finished = []
    for r, token in zip(list(running), tokens):
        r.output.append(token)
        if len(r.output) == r.max_new_tokens:
            running.remove(r)
            finished.append(r)
    return finished
