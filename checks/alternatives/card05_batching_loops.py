"""A correct alternative to solutions/card05_batching/batching.py: the batch by a floor of true divisions, the
ratio of seconds per token (the inverse ratio inverted), admission that recounts the reserved positions at
each candidate and deletes the head, tokens from one batched argmax and retirement by removal in a loop.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card05: the batch size collapse problem.

Decode is memory-bound: a step reads every weight once whatever the batch, so serving many
requests together is what makes a GPU pay. How many fit is set by the KV cache, and serving them
well needs a scheduler that lets requests join and leave at every step.

Iteration-level (continuous) batching: the scheduler decides between steps. A request that has
produced its last token leaves at once, freeing its slot; a waiting one joins the next step,
its whole prompt fed in that step (its prefill), while the others feed one token each. Each
request keeps its own cache and positions, so its tokens are exactly those it would produce
alone (request-level isolation).

The memory side, from first principles: each layer caches K and V, each `[B, Hkv, T, D]` (KV
heads, not query heads), in `dtype.itemsize` bytes an element. A decode step of a dense model,
timed by a roofline (card02):

    time = max(flops / hw.peak_flops(dtype), bytes / hw.mem_bandwidth)
    flops = 2 · B · M + 4 · L · B · H · (T + 1) · D     (T cached positions, the new one scored too)
    bytes = M · dtype.itemsize + B · (T + 1) · (bytes of one token's K and V, every layer)

where M is the number of weights of every nn.Linear: per layer q (d·H·D), k and v (d·Hkv·D
each), o (H·D·d) and the MLP (3·d·d_ff for SwiGLU, cfg.mlp == "swiglu"; 2·d·d_ff for GELU),
plus lm_head (d·V, counted even when tied to the embedding). The embedding table is only
indexed and the norm gains are vectors: neither counts. The models here are dense (no mixture
of experts) without a sliding window.

A kata may call another kata, of this card or an earlier one (card02's `roofline_step_time`
computes the step time above); its tests then depend on that kata too.

Shapes: B batch, T positions, L layers, H query heads, Hkv KV heads, D head dim, d = d_model,
V vocab.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig
from kvref.hardware import Hardware

REPLACES = "solutions/card05_batching/batching.py"


def max_batch_from_memory(cfg: ModelConfig, free_bytes: int, seq_len: int, dtype: torch.dtype) -> int:
    """The most sequences of `seq_len` positions whose KV cache fits in `free_bytes` bytes, elements of `dtype`.

    Every sequence gets a cache of `seq_len` positions in every layer (reserved up front, as a
    static cache does). What does one position cost, across all layers? A widely quoted answer
    is memory / (2 · L · d_model · bytes): does that count sequences or tokens, and which
    number does it use in the wrong place (Llama-3-8B: d_model 4096, but 8 KV heads of 128)?
    Return a Python int, 0 when not even one sequence fits.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V, every layer
    return math.floor(free_bytes / seq_len / per_token)


def layers_doubled_throughput_ratio(cfg: ModelConfig, hw: Hardware, free_bytes: int, seq_len: int,
                                    dtype: torch.dtype) -> float:
    """Decode throughput of the model with twice the layers over that of `cfg`, both on `hw` with `free_bytes` for the cache.

    Throughput is tokens per second in steady decode: B sequences each hold `seq_len` positions
    and a step adds one token to each (so each needs room for seq_len + 1 positions: B is the
    largest batch whose caches of seq_len + 1 positions fit in free_bytes), and a step takes the
    roofline time in the module docstring, weights and cache in `dtype`. The deeper model is
    `cfg.with_(n_layers=2 * cfg.n_layers)`: twice the cache per token, so about half the batch.
    Does its throughput halve? Its step reads twice the layers' weights for half as many
    sequences. Derive when the ratio is near 1/2 and when it falls towards 1/4. The deeper
    model fits at least one sequence in the tests.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
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
    """One iteration of continuous batching: admit, run one step for the whole batch, retire. Returns the finished requests.

    A request `r` has `r.prompt` (a list of token ids), `r.max_new_tokens` and `r.output` (the
    list of token ids it has generated so far). `running` and `waiting` are lists of requests,
    `waiting` in arrival order; change both in place.

    1. Admit, first come first served: while `waiting` is not empty and fewer than `max_batch`
       requests run, move the head of `waiting` to the end of `running` if the positions every
       running request's cache may ever hold, with the head's, stay within `kv_budget_tokens`.
       How many positions can a request's cache ever hold, given that the last token it
       generates is never fed back? If the head does not fit, stop: never let a later request
       overtake it.
    2. If nothing runs, return [].
    3. `logits = forward(running)`: one step for the whole batch, a `[len(running), V]` tensor
       whose row i is the next-token logits of `running[i]` (it feeds a newly admitted request
       its prompt, any other request its last output token, and keeps every request's cache).
    4. Append each request's greedy token (the index of its row's largest logit, a Python int)
       to its `output`.
    5. Retire: remove from `running` every request that now has `max_new_tokens` tokens, and
       return them in their running order.
    """
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
