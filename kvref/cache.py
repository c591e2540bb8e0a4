"""Spoiler for card00: the KV cache the card00 katas ask for (read it after you pass).

The KV cache of one attention layer, in the two forms serving engines use.

Layout everywhere: `[B, Hkv, T, D]` (batch, KV heads, cached positions, head dim).
Both forms store the S new keys and values at absolute positions `input_pos` with
`update(input_pos, k_new, v_new)` and return keys and values whose slot j holds position j;
`seq_len` is T, the last position written + 1. Only K and V are stored; a query is used once,
by its own step, and never again.

- `GrowingKVCache` only appends: `input_pos` must be the next S positions, and an earlier
  position raises ValueError.
- `StaticKVCache` also accepts a write at an earlier position, which rolls the cache back
  (as after a rejected speculative draft): `seq_len` becomes that write's last position + 1.

- `GrowingKVCache` concatenates and returns exactly the T positions cached: simple, but each
  step reallocates and the shape changes every step (what Hugging Face's DynamicCache does).
- `StaticKVCache` preallocates `max_seq_len` slots, writes by position and returns its whole
  buffers, `[B, Hkv, max_seq_len, D]`, the same tensors at every step, reading no value back
  to the host (what gpt-fast's KVCache and transformers' StaticCache do). A CUDA graph replays
  recorded kernels on fixed shapes and fixed addresses and cannot stop for the CPU: a prefix
  whose length depends on the positions, or an `int(input_pos.max())`, could not be captured.
  Slots past a query's position hold zeros or stale keys; the attention hides them with a mask
  built from the positions (`kvref.attention.attention(q, k, v, input_pos)`).
"""

from __future__ import annotations

import torch

from kvref.validate import check_tensor

LAYOUT = "[B, Hkv, S, D]"


def _check_update(cache, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    check_tensor("k_new", k_new, ndim=4, layout=LAYOUT)
    check_tensor("v_new", v_new, shape=tuple(k_new.shape), dtype=k_new.dtype, device=k_new.device, layout=LAYOUT)
    check_tensor("input_pos", input_pos, shape=(k_new.shape[2],), layout="[S]")
    if input_pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_pos must hold integer positions, got dtype {input_pos.dtype}")
    if cache.k is not None:
        check_tensor("k_new", k_new, shape=(cache.k.shape[0], cache.k.shape[1], None, cache.k.shape[3]),
                     dtype=cache.k.dtype, device=cache.k.device, layout=LAYOUT)


class GrowingKVCache:
    """A cache that grows by concatenation along the sequence axis: `input_pos` must be the next S positions."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, Hkv, T, D)
        self.v: torch.Tensor | None = None  # (B, Hkv, T, D)

    @property
    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        _check_update(self, input_pos, k_new, v_new)
        expected = torch.arange(self.seq_len, self.seq_len + k_new.shape[2], device=input_pos.device)
        if not torch.equal(input_pos.to(expected.dtype), expected):
            raise ValueError(
                f"a growing cache appends: input_pos must be {expected.tolist()} "
                f"(the next {k_new.shape[2]} positions after {self.seq_len} cached), got {input_pos.tolist()}"
            )
        if self.k is None:
            self.k, self.v = k_new.clone(), v_new.clone()
        else:
            self.k = torch.cat([self.k, k_new], dim=2)  # (B, Hkv, T + S, D)
            self.v = torch.cat([self.v, v_new], dim=2)
        return self.k, self.v


class StaticKVCache:
    """A preallocated cache of `max_seq_len` slots, written in place by position.

    `update(input_pos, k_new, v_new)` writes entry i at slot input_pos[i] (positions in any
    order) and returns the whole buffers `k`, `v`, `[B, Hkv, max_seq_len, D]`: the shape does
    not depend on the positions, and nothing in `update` reads a tensor's value back to the host.
    `seq_len`, the last position written + 1, is kept as a tensor where the positions live and
    read (with a sync) only when asked: a graph-captured decode loop keeps its own position.
    Positions on the CPU are checked (in range, no gap after the cached ones): reading them
    costs no device sync. Positions on an accelerator are trusted, as gpt-fast and transformers
    trust them: checking them would stop the device for the host.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), ("max_seq_len", max_seq_len),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, Tmax, D)
        # Zeros, not torch.empty: a masked slot gets weight exactly 0, and 0 x NaN would still be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.end: torch.Tensor | None = None  # 0-d: the last position written + 1; None before any write

    @property
    def seq_len(self) -> int:
        """The last position written + 1 (0 before any write). Reading it syncs with the device."""
        return 0 if self.end is None else int(self.end)

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        _check_update(self, input_pos, k_new, v_new)
        max_seq_len = self.k.shape[2]
        if k_new.shape[2] > max_seq_len:
            raise ValueError(f"{k_new.shape[2]} new positions do not fit a cache of {max_seq_len}")
        if input_pos.device.type == "cpu" and (self.end is None or self.end.device.type == "cpu"):
            _check_positions(input_pos, self.seq_len, max_seq_len)
        if input_pos.numel() == 0:
            return self.k, self.v
        self.k.index_copy_(2, input_pos, k_new)  # entry i into slot input_pos[i], in any order
        self.v.index_copy_(2, input_pos, v_new)
        # The last position written + 1, not a running maximum: writing at an earlier position
        # rolls the cache back, and what lies past it is no longer part of the sequence.
        self.end = input_pos.max() + 1  # a tensor on the positions' device: never read here
        return self.k, self.v  # (B, Hkv, Tmax, D): the same tensors, the same shape, at every step


def _check_positions(input_pos: torch.Tensor, cached: int, max_seq_len: int) -> None:
    """Positions in range that leave no gap after the `cached` ones (CPU positions: no sync)."""
    if input_pos.numel() == 0:
        return
    first, last = int(input_pos.min()), int(input_pos.max())
    if first < 0 or last >= max_seq_len:
        raise ValueError(f"input_pos must lie in [0, {max_seq_len}), got {input_pos.tolist()}")
    if first > cached or not torch.isin(torch.arange(first, last + 1), input_pos).all():
        raise ValueError(f"input_pos {input_pos.tolist()} leaves a gap after the {cached} cached positions")
    if torch.unique(input_pos).numel() != input_pos.numel():
        raise ValueError(f"input_pos {input_pos.tolist()} writes a position twice")
