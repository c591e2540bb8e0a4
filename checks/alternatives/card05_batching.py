"""A correct alternative to solutions/card05_batching/batching.py: the same katas, other designs.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card05 test to pass. Here the batch is found by counting bytes per sequence from the dtype's
bit width; the throughput ratio counts the weights Linear by Linear and times each model's step with
card02's roofline formula written out as a comparison; the scheduler recomputes the reservation as
it admits, finds the greedy token with torch.max, and retires with an explicit loop.
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card05_batching/batching.py"


def max_batch_from_memory(cfg: ModelConfig, free_bytes: int, seq_len: int, dtype: torch.dtype) -> int:
    element = (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8
    per_sequence = seq_len * cfg.n_layers * (cfg.n_kv_heads * cfg.head_dim * element) * 2  # K and V, every layer
    return int(free_bytes // per_sequence)


def _linear_weights(c: ModelConfig) -> int:
    d = c.d_model
    per_layer = [d * c.n_heads * c.head_dim, d * c.n_kv_heads * c.head_dim, d * c.n_kv_heads * c.head_dim,
                 c.n_heads * c.head_dim * d]  # q, k, v, o
    per_layer += [d * c.d_ff] * (3 if c.mlp == "swiglu" else 2)  # gate, up, down (or up, down)
    return sum(per_layer) * c.n_layers + d * c.vocab_size  # and lm_head


def layers_doubled_throughput_ratio(cfg: ModelConfig, hw: Hardware, free_bytes: int, seq_len: int,
                                    dtype: torch.dtype) -> float:
    rates = []
    for c in (cfg, cfg.with_(n_layers=cfg.n_layers * 2)):
        held = seq_len + 1  # the new position is cached too
        B = max_batch_from_memory(c, free_bytes, held, dtype)
        M = _linear_weights(c)
        compute = (2 * B * M + 4 * c.n_layers * B * c.n_heads * held * c.head_dim) / hw.peak_flops(dtype)
        memory = (M + B * held * 2 * c.n_layers * c.n_kv_heads * c.head_dim) * dtype.itemsize / hw.mem_bandwidth
        rates.append(B / (compute if compute > memory else memory))
    return rates[1] / rates[0]


def _worst_case(r) -> int:
    return len(r.prompt) + r.max_new_tokens - 1  # the last generated token is never fed back


def continuous_batching_step(forward, running: list, waiting: list, max_batch: int, kv_budget_tokens: int) -> list:
    while len(waiting) > 0 and len(running) < max_batch:
        if sum(map(_worst_case, running)) + _worst_case(waiting[0]) > kv_budget_tokens:
            break
        running.append(waiting.pop(0))
    if len(running) == 0:
        return []
    logits = forward(running)  # (len(running), V)
    for i, r in enumerate(running):
        r.output.append(torch.max(logits[i], dim=-1).indices.item())
    finished, staying = [], []
    for r in running:
        (finished if len(r.output) == r.max_new_tokens else staying).append(r)
    running.clear()
    running.extend(staying)
    return finished
