"""A correct alternative to solutions/card07_distributed/sharding.py: one formula for a rank's KV heads (the head
of its first query head, then max(1, Hkv // tp) of them), the copies counted as the ranks that hold head 0, a
rank's bytes from the length of its head list, a stage's bytes as the whole cache over the stages, the bytes
sent as .nbytes of a meta hidden state, moves from the least-busy holder with ties to the highest GPU, the
busiest link from two Counters.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card07: distributed cache consistency.

A model too big for one device is split across several. Tensor parallelism (TP) splits every
layer: with tp ranks, rank r owns the contiguous query heads r·H/tp .. (r+1)·H/tp - 1, and it must
cache the K and V of every KV head those query heads read (query head h reads KV head h // G,
G = H / Hkv, as in card00), because attention needs them on the rank that computes it. Pipeline
parallelism (PP) splits the stack: stage s owns a contiguous L / stages of the layers, caches
their K/V only, and hands the next stage the hidden state of the tokens it just ran.

The tests run a real engine: one CPU process per rank, joined by torch.distributed's gloo
backend, decoding a prompt and a few tokens, and compare your answers with what each rank's
cache holds (which heads, how many bytes) and what the stages send each other.

Layouts are valid: tp divides H, and either tp divides Hkv or Hkv divides tp; stages divide L.
An element's size in bytes is `dtype.itemsize`. Shapes: B batch, T positions, L layers,
H query heads, Hkv KV heads, D head dim, d = d_model.
"""

from __future__ import annotations

import collections

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card07_distributed/sharding.py"


def kv_heads_of_rank(n_kv_heads: int, tp: int, rank: int) -> list[int]:
    """The KV heads whose K and V rank `rank` of `tp` caches, in increasing order.

    Rank r owns a contiguous block of the query heads; which KV heads do they read? With 8 KV
    heads on tp = 4, rank 1 holds two of them: which two? With 2 KV heads on tp = 4 there are
    more ranks than KV heads: which head does rank 3 hold, and which other rank holds it too?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    first = rank * n_kv_heads // tp  # the KV head of the rank's first query head
    return list(range(first, first + max(1, n_kv_heads // tp)))


def kv_replication(n_kv_heads: int, tp: int) -> int:
    """How many of the `tp` ranks cache each KV head (1 when every head lives on exactly one rank).

    Llama-2-70B has 8 KV heads: how many copies of each are there on tp = 8? On tp = 16? And on
    tp = 2, where each rank holds 4 of them?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return sum(1 for r in range(tp) if 0 in kv_heads_of_rank(n_kv_heads, tp, r))  # the ranks holding head 0


def kv_bytes_per_rank(cfg: ModelConfig, tp: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of K/V one TP rank caches for `batch` sequences of `seq_len` positions, every layer, in `dtype`.

    Every rank holds all L layers, but not all the heads: how many KV heads does one rank hold,
    and does that count ever fall below 1? (Llama-2-70B, tp = 8, bf16, one sequence of 4,096
    tokens: is it 1/8 of the whole cache? And on tp = 16?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    heads = len(kv_heads_of_rank(cfg.n_kv_heads, tp, 0))
    return 2 * cfg.n_layers * batch * seq_len * heads * cfg.head_dim * dtype.itemsize


def pipeline_kv_bytes_per_stage(cfg: ModelConfig, stages: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of K/V one pipeline stage caches, `stages` stages, `batch` sequences of `seq_len` positions, in `dtype`.

    A stage runs only its own layers for every token. Does it ever need another stage's K or V?
    Is a request's cache stored once per stage, or split between them?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    whole = 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    return whole // stages


def pipeline_bytes_sent_per_step(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    """Bytes one decode step (one new token per sequence) sends from one stage to the next, in `dtype`.

    What does the next stage need to run its layers on the new token: the cache of the layers
    before it, or something else? Does the answer grow with the sequence's length?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return torch.empty(batch, 1, cfg.d_model, dtype=dtype, device="meta").nbytes  # the hidden state of the new tokens


def reshard_plan(n_kv_heads: int, tp_from: int, tp_to: int) -> list[tuple[int, int, int]]:
    """The moves that take a paused request's cache from tp = `tp_from` to tp = `tp_to`: `(head, source, destination)`.

    GPU g is rank g in both layouts: scaling up adds GPUs tp_from .. tp_to-1 (empty), scaling
    down drops the highest GPUs (their cache must go somewhere first). Each GPU must end up with
    the K and V of exactly the KV heads its rank caches on tp_to (kv_heads_of_rank). A head a GPU
    already holds stays put; every other head it needs arrives in one move, from a GPU that held
    it on tp_from. When several GPUs hold a head (replicated), spread that head's moves over them
    so that their counts of moves differ by at most 1 (one way: each destination in increasing
    order, from the holder that has sent the fewest so far; any balanced choice is as good, and
    the tests accept any). Any order of the list.
    8 KV heads from tp = 2 to tp = 4: which GPU sends what to whom, and how many heads move?
    1 KV head from tp = 2 to tp = 4? 8 KV heads from tp = 4 to tp = 1?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    holders = {h: [g for g in range(tp_from) if h in kv_heads_of_rank(n_kv_heads, tp_from, g)] for h in range(n_kv_heads)}
    sends = [0] * tp_from
    plan = []
    for dst in range(tp_to):
        held = kv_heads_of_rank(n_kv_heads, tp_from, dst) if dst < tp_from else []
        for h in kv_heads_of_rank(n_kv_heads, tp_to, dst):
            if h not in held:
                src = min(holders[h], key=lambda g: (sends[g], -g))
                sends[src] += 1
                plan.append((h, src, dst))
    return plan


def reshard_seconds(cfg: ModelConfig, tp_from: int, tp_to: int, batch: int, seq_len: int, dtype: torch.dtype,
                    alpha: float, beta: float) -> float:
    """Seconds to carry out reshard_plan in the α-β model, for `batch` sequences of `seq_len` cached positions.

    A move sends one head's K and V for every layer, one message per layer for K and one for V,
    each `[batch, seq_len, head_dim]` in `dtype`. A message of n bytes costs `alpha + n / beta`
    seconds (alpha in s, beta in bytes/s). Each GPU has its own link, full duplex: its sends go
    one after another, so do its receives, but sending and receiving overlap, and every GPU
    works at the same time. The reshard ends when the busiest direction of the busiest GPU does.
    (Llama-2-70B, 4,096 bf16 tokens, tp = 2 to tp = 4: who is busiest, and for how long?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    message = batch * seq_len * cfg.head_dim * dtype.itemsize
    plan = reshard_plan(cfg.n_kv_heads, tp_from, tp_to)
    sent = collections.Counter(src for _, src, _ in plan)
    received = collections.Counter(dst for _, _, dst in plan)
    busiest = max([*sent.values(), *received.values(), 0])
    per_move = 2 * cfg.n_layers * alpha + 2 * cfg.n_layers * message / beta  # K and V of every layer
    return busiest * per_move
