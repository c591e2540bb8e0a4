"""Spoiler for card05: continuous (iteration-level) batching on kvref's model, admission and preemption.

Read it after you pass card05. **Iteration-level batching on kvref's model** (Orca, Yu et al.,
OSDI 2022, §3.1 "iteration-level scheduling" and §3.2 "selective batching"). A scheduler decides
*between* steps which requests run; requests join and leave at any step. One step runs every
running request in one forward pass: the tokens of all requests are concatenated, `[N, d_model]`,
and go through each nn.Linear, norm and MLP together; only attention is split per request, each
reading its own cache at its own positions (`batched_forward`). Each request's tokens therefore
equal what it produces alone (request-level isolation; tests check this in fp32, greedy).
A newly admitted request feeds its whole prompt (its prefill rides in the same step), a
running one its last token. Preemption frees a request's cache (`preempt`): by recompute
(drop it, 0 bytes moved, the context is fed again on resume: `tokens_to_recompute`), or by
swap (copy K/V out to host memory and back: `.nbytes` of the cache each way). vLLM (Kwon et
al., SOSP 2023, §4.5 "Scheduling and Preemption") does both, all-or-nothing per sequence.

The same scheduler as a discrete-event simulator, with memory held statically or in pages, is
kvref/serving_sim.py.

Positions held: after a request has been fed f tokens its cache holds f positions; a step that
generates its n-th output token has fed prompt + n - 1 tokens (the newest token is not fed yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvref.attention import attention
from kvref.model import Transformer
from kvref.rope import apply_rope, rope_cos_sin


# --- requests on the real model ------------------------------------------------------------

@dataclass(eq=False)
class Sequence:
    """One request being served: its prompt, its output so far, and its cache (per layer)."""
    rid: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    caches: list | None = None    # one GrowingKVCache per layer while resident; None when not
    swapped: list | None = None   # [(k, v)] per layer, copies in host memory, while swapped out

    def __post_init__(self) -> None:
        if not self.prompt or not all(isinstance(t, int) and t >= 0 for t in self.prompt):
            raise ValueError(f"request {self.rid}: prompt must be a non-empty list of token ids, got {self.prompt!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"request {self.rid}: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

    @property
    def cached_len(self) -> int:
        """Positions whose K/V the resident cache holds."""
        return self.caches[0].seq_len if self.caches else 0

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens

    @property
    def worst_case_tokens(self) -> int:
        """Positions the request may ever hold: its prompt and every output token but the last."""
        return len(self.prompt) + self.max_new_tokens - 1


def _feed(seq: Sequence) -> tuple[list[int], int]:
    """The tokens a step feeds this request, and the position of the first."""
    context = seq.prompt + seq.output
    if seq.cached_len == 0:
        return context, 0  # prefill, or recompute after a preemption: the whole context
    if seq.cached_len != len(context) - 1:
        raise ValueError(f"request {seq.rid}: cache holds {seq.cached_len} positions, context has {len(context)}")
    return context[-1:], seq.cached_len


@torch.no_grad()
def batched_forward(model: Transformer, seqs: list[Sequence]) -> torch.Tensor:
    """One iteration for every request in `seqs`, as one batch; returns next-token logits `[len(seqs), V]`.

    Selective batching (Orca §3.2): the N tokens of all requests (a prompt for a new one, one
    token for a running one) go through every nn.Linear, norm and MLP as one `[N, d_model]`
    matrix; attention runs per request over its own cache, at its own positions.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a kvref.model.Transformer, got {type(model).__name__}")
    if not seqs:
        raise ValueError("batched_forward needs at least one request")
    if model.cfg.sliding_window:
        raise ValueError("batched_forward has no sliding window")
    if any(s.swapped is not None for s in seqs):
        raise ValueError("a swapped-out request must be resumed (kvref.serving.resume) before it runs")
    cfg = model.cfg
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    feeds = [_feed(s) for s in seqs]
    for s in seqs:
        if s.caches is None:
            s.caches = model.new_caches()
    device = model.embed_tokens.weight.device
    ids = torch.tensor([t for toks, _ in feeds for t in toks], device=device)  # (N,)
    bounds = [0]
    for toks, _ in feeds:
        bounds.append(bounds[-1] + len(toks))
    x = model.embed_tokens(ids)  # (N, d_model)
    for li, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)  # (N, H*D), (N, Hkv*D), (N, Hkv*D)
        ys = []
        for i, (s, (toks, start)) in enumerate(zip(seqs, feeds)):
            a, b, S = bounds[i], bounds[i + 1], len(toks)
            qi = q[a:b].view(1, S, H, D).transpose(1, 2)  # (1, H, S, D)
            ki = k[a:b].view(1, S, Hkv, D).transpose(1, 2)  # (1, Hkv, S, D)
            vi = v[a:b].view(1, S, Hkv, D).transpose(1, 2)  # (1, Hkv, S, D)
            pos = torch.arange(start, start + S, device=device)
            cos, sin = rope_cos_sin(pos, D, cfg.rope_theta, dtype=x.dtype)  # (S, D)
            qi, ki = apply_rope(qi, cos, sin), apply_rope(ki, cos, sin)
            ki, vi = s.caches[li].update(pos, ki, vi)  # (1, Hkv, T, D)
            ys.append(attention(qi, ki, vi).transpose(1, 2).reshape(S, H * D))  # (S, H*D)
        x = x + attn.o_proj(torch.cat(ys))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = torch.tensor(bounds[1:], device=device) - 1
    return model.lm_head(model.norm(x[last]))  # (len(seqs), V)


def cache_nbytes_of(seq: Sequence) -> int:
    """`.nbytes` of the K and V a request's resident cache holds, every layer."""
    if not seq.caches:
        return 0
    return sum(c.k.nbytes + c.v.nbytes for c in seq.caches if c.k is not None)


@dataclass(frozen=True)
class Preemption:
    """What preempting a request moved: bytes each way over the host link, and tokens it must recompute."""
    mode: str
    bytes_out: int
    bytes_in: int
    tokens_to_recompute: int


def preempt(seq: Sequence, mode: str) -> Preemption:
    """Free a request's cache. "recompute": drop it; "swap": copy it to host memory first."""
    if mode not in ("recompute", "swap"):
        raise ValueError(f"preemption mode must be 'recompute' or 'swap', got {mode!r}")
    if not seq.caches:
        raise ValueError(f"request {seq.rid} holds no cache to preempt")
    nbytes, held = cache_nbytes_of(seq), seq.cached_len
    if mode == "swap":
        seq.swapped = [(c.k.to("cpu", copy=True), c.v.to("cpu", copy=True)) for c in seq.caches]
    seq.caches = None
    if mode == "swap":
        return Preemption(mode, nbytes, nbytes, 0)
    return Preemption(mode, 0, 0, held)


def resume(seq: Sequence, model: Transformer) -> int:
    """Bring a swapped-out request's cache back; returns the bytes copied in (0 after recompute)."""
    if seq.swapped is None:
        return 0
    device = model.embed_tokens.weight.device
    seq.caches = model.new_caches()
    for c, (k, v) in zip(seq.caches, seq.swapped):
        c.k, c.v = k.to(device), v.to(device)
    seq.swapped = None
    return cache_nbytes_of(seq)


def admit_fcfs(running: list[Sequence], waiting: list[Sequence], max_batch: int, kv_budget_tokens: int) -> None:
    """Move requests from the head of `waiting` to `running` while the batch and the worst-case K/V fit."""
    reserved = sum(s.worst_case_tokens for s in running)
    while waiting and len(running) < max_batch and reserved + waiting[0].worst_case_tokens <= kv_budget_tokens:
        reserved += waiting[0].worst_case_tokens
        running.append(waiting.pop(0))


def serve(model: Transformer, requests: list[Sequence], arrival_steps: list[int], max_batch: int,
          kv_budget_tokens: int) -> dict[int, list[int]]:
    """Serve requests that arrive at given iterations; returns each request's output tokens by rid."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1 (requests per step), got {max_batch!r}")
    if len(arrival_steps) != len(requests):
        raise ValueError(f"one arrival step per request: {len(arrival_steps)} for {len(requests)} requests")
    pending = sorted(zip(arrival_steps, range(len(requests))))
    running, waiting, done, step = [], [], {}, 0
    while pending or running or waiting:
        while pending and pending[0][0] <= step:
            waiting.append(requests[pending.pop(0)[1]])
        admit_fcfs(running, waiting, max_batch, kv_budget_tokens)
        if running:
            logits = batched_forward(model, running)
            for s, row in zip(running, logits):
                s.output.append(int(row.argmax()))
            for s in [s for s in running if s.done]:
                running.remove(s)
                s.caches = None
                done[s.rid] = s.output
        elif waiting:
            raise ValueError(f"request {waiting[0].rid} needs {waiting[0].worst_case_tokens} K/V slots; "
                             f"the budget is {kv_budget_tokens}")
        step += 1
    return done
