"""A correct alternative to solutions/card00_cache_contract/cache.py: the same katas, other designs.

The growing cache keeps lists of chunks and exposes `k` and `v` as properties; the static cache
writes with `index_copy_` and computes its length only when asked; `repeat_kv` expands a view and
reshapes; `attend` adds a float mask and writes its (stable) softmax by hand.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import torch

EXTENDS = "solutions/card00_cache_contract/cache.py"


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Hugging Face's way: a broadcast view over a new group axis, then one reshape.
    B, Hkv, T, D = x.shape
    G = n_heads // Hkv
    return x[:, :, None].expand(B, Hkv, G, T, D).reshape(B, n_heads, T, D)  # (B, H, T, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
    # The softmax written out by hand, stable because each row's maximum is subtracted first.
    B, H, S, D = q.shape
    T = k.shape[2]
    scores = torch.einsum("bhsd,bhtd->bhst", q, repeat_kv(k, H)) * D ** -0.5  # (B, H, S, T)
    # An additive mask, 0 where allowed and the dtype's most negative number elsewhere (what
    # Hugging Face's eager attention adds), built from the positions the queries sit at.
    q_pos = torch.arange(T - S, T, device=q.device) if input_pos is None else input_pos  # (S,)
    allowed = torch.arange(T, device=q.device)[None, :] <= q_pos[:, None]  # (S, T)
    scores = scores + torch.zeros(S, T, device=q.device).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhst,bhtd->bhsd", weights, repeat_kv(v, H))  # (B, H, S, D)


class GrowingKVCache:
    """One layer's cache that grows by concatenation: `k`, `v` are `[B, Hkv, T, D]` (None when empty).

    `update(input_pos, k_new, v_new)` receives the S new keys and values `[B, Hkv, S, D]` for
    absolute positions `input_pos` `[S]` (always the next S positions), stores them after the
    cached ones, and returns all keys and values so far, `[B, Hkv, T + S, D]`.
    `seq_len` is T, the number of cached positions.
    """

    # A different design that meets the same docstring: the chunks stay in lists, and `k` and
    # `v` are properties that concatenate them when read.
    def __init__(self) -> None:
        self._k_chunks: list[torch.Tensor] = []  # each (B, Hkv, S, D)
        self._v_chunks: list[torch.Tensor] = []

    @property
    def k(self) -> torch.Tensor | None:
        return torch.cat(self._k_chunks, dim=2) if self._k_chunks else None  # (B, Hkv, T, D)

    @property
    def v(self) -> torch.Tensor | None:
        return torch.cat(self._v_chunks, dim=2) if self._v_chunks else None  # (B, Hkv, T, D)

    @property
    def seq_len(self) -> int:
        return sum(chunk.shape[2] for chunk in self._k_chunks)

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        self._k_chunks.append(k_new)
        self._v_chunks.append(v_new)
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
    `seq_len` is T, the last position written + 1 (0 before any write), so writing at an
    earlier position rolls the cache back (as after a rejected speculative draft). Keep it as a
    tensor in `update`; reading `seq_len` may convert it (the host asks between steps).
    """

    # Written with index_copy_ along the sequence axis instead of advanced-index assignment, and
    # the length kept lazily: update stores the positions it was given (a tensor, never read
    # there), and seq_len computes the last one + 1 when the host asks.
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, Tmax, D)
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self._last_written: torch.Tensor | None = None  # (S,) the positions of the last update

    @property
    def seq_len(self) -> int:
        return 0 if self._last_written is None else int(self._last_written.max()) + 1

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        self.k.index_copy_(2, input_pos, k_new)  # (B, Hkv, S, D): entry i into slot input_pos[i]
        self.v.index_copy_(2, input_pos, v_new)
        self._last_written = input_pos
        return self.k, self.v  # (B, Hkv, Tmax, D)


