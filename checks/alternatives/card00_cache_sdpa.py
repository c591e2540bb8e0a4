"""A correct alternative to solutions/card00_cache_contract/cache.py: repeat_kv by index_select, attend through
PyTorch's SDPA with a boolean mask from the positions, a growing cache that counts its positions, a static
cache that writes with index_put_ and keeps its length as a 0-d tensor from the start, decode_step's position
from the last layer's cache.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card00: the cache contract.

Autoregressive decoding computes, at every step, attention of the newest token over all
tokens so far. The keys and values of past tokens do not change once computed (each depends
only on its own token and the tokens before it), so a layer can keep them: `prefill` writes
K/V for the whole prompt, each `decode_step` appends exactly one K/V per layer per sequence,
and the new query reads everything cached. Queries are never stored: each is used once.

Shapes: B batch, H query heads, Hkv KV heads, G = H // Hkv, S new tokens, T cached length,
D head dim. The cache layout is `[B, Hkv, T, D]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REPLACES = "solutions/card00_cache_contract/cache.py"


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Expand KV heads `[B, Hkv, T, D]` to one per query head, `[B, H, T, D]`.

    In grouped-query attention, G = H // Hkv consecutive query heads share one KV head.
    Which KV head does query head h read? Return the tensor whose head h is that KV head.
    (MHA is Hkv = H; MQA is Hkv = 1.)
    """
    G = n_heads // x.shape[1]
    return torch.index_select(x, 1, torch.arange(n_heads, device=x.device) // G)  # (B, H, T, D): heads hG .. hG+G-1 <- KV head h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of S new queries `[B, H, S, D]` over T key slots `[B, Hkv, T, D]`.

    Slot j holds position j. Without `input_pos`, the queries are the last S of the T
    positions: query i sits at position T - S + i. With `input_pos` `[S]`, query i sits at
    position input_pos[i] (in any order), and k, v may be a static cache's whole buffers
    (T = max_seq_len) whose slots past the queries hold zeros never written or stale keys.
    Either way query i may read slots 0 .. its own position, never a later one: build the mask
    from the positions. Scale scores by 1 / sqrt(D) and softmax over the keys. Returns
    `[B, H, S, D]`. (S = T is a prompt; S = 1 is a decode step.)
    """
    S, T = q.shape[2], k.shape[2]
    if input_pos is None:
        input_pos = torch.arange(T - S, T, device=q.device)  # the last S of the T positions
    q_pos = input_pos[:, None]  # (S, 1): where each query sits
    k_pos = torch.arange(T, device=q.device)[None, :]  # (1, T): slot j holds position j
    # PyTorch's fused attention with a boolean mask (True = may read); enable_gqa shares each KV head.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=True)  # (B, H, S, D)


class GrowingKVCache:
    """One layer's cache that grows by concatenation: `k`, `v` are `[B, Hkv, T, D]` (None when empty).

    `update(input_pos, k_new, v_new)` receives the S new keys and values `[B, Hkv, S, D]` for
    absolute positions `input_pos` `[S]` (always the next S positions), stores them after the
    cached ones, and returns all keys and values so far, `[B, Hkv, T + S, D]`, in the dtype they came
    in (they may be the cache's own `k` and `v`, not copies: a caller reads them, never writes).
    `seq_len` is T, the number of cached positions.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0

    @property
    def seq_len(self) -> int:
        return self.n

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            self.k = torch.cat([self.k, k_new], dim=2)  # (B, Hkv, T + S, D)
            self.v = torch.cat([self.v, v_new], dim=2)
        self.n += k_new.shape[2]
        return self.k, self.v


class StaticKVCache:
    """One layer's cache preallocated for `max_seq_len` positions, written in place by position.

    `k`, `v` are `[batch, n_kv_heads, max_seq_len, head_dim]` zeros of `dtype`, allocated once.
    `update(input_pos, k_new, v_new)` writes the S new entries `[B, Hkv, S, D]`, entry i into
    slot input_pos[i] (positions may come in any order), and returns the whole buffers `k`, `v`:
    the same shape at every step, whatever the positions. The attention, not the cache, hides
    the slots a query must not read, with a mask built from the positions (`attend`'s input_pos).
    `update` never reads a tensor's value back to the host (no `.item()`, `int(t)`, `if t`,
    `.tolist()`): a CUDA graph replays recorded GPU work on fixed shapes without running your
    Python, so neither a shape nor a branch may depend on the positions' values (the same holds
    for torch.compile's "reduce-overhead" mode, which records CUDA graphs).
    `seq_len` is T, the highest position the latest update wrote + 1 (0 before any write), so writing at an
    earlier position rolls the cache back (as after a rejected speculative draft). Keep it as a
    tensor in `update`; reading `seq_len` may convert it (the host asks between steps).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.v = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.end = torch.zeros((), dtype=torch.long)  # position written + 1, as a tensor; None before any write

    @property
    def seq_len(self) -> int:
        return 0 if self.end is None else int(self.end)  # the host reads it between steps, not in update

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        self.k.index_put_((torch.arange(self.k.shape[0])[:, None, None], torch.arange(self.k.shape[1])[None, :, None], input_pos[None, None, :]), k_new)  # (B, Hkv, S, D): entry i into slot input_pos[i]
        self.v[:, :, input_pos] = v_new
        self.end = input_pos.max() + 1  # the last position written ends the sequence; stays a tensor
        return self.k, self.v  # (B, Hkv, max_seq_len, D): the same shape at every step


def prefill(model, ids: torch.Tensor, caches: list) -> torch.Tensor:
    """Run the prompt `ids` `[B, P]` through `model`, writing every layer's K/V into `caches`.

    `model(ids, input_pos, caches)` is a `kvref.model.Transformer`: it returns logits
    `[B, S, V]` and calls `caches[layer].update(input_pos, k, v)` in each layer. What are the
    positions of the prompt's tokens? Return the logits of the last prompt position, `[B, V]`:
    they choose the first generated token.
    """
    input_pos = torch.arange(ids.shape[1], device=ids.device)  # (P,): positions 0 .. P-1
    return model(ids, input_pos, caches)[:, -1]


def decode_step(model, ids: torch.Tensor, caches: list) -> torch.Tensor:
    """Feed one new token per sequence, `ids` `[B, 1]`, reading and extending `caches`.

    Each layer must append exactly one K/V per sequence, and the new query must read
    everything cached. At which absolute position does the new token sit when T positions
    are cached? Return its logits `[B, V]`.
    """
    input_pos = torch.arange(caches[-1].seq_len, caches[-1].seq_len + 1)  # T cached: positions 0 .. T-1, the new one is T
    return model(ids, input_pos, caches)[:, -1]
