"""A correct alternative to solutions/card03_paging/paging.py: the same katas, other designs.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card03 test to pass. Here the static waste is the mean of each request's own waste (every
request reserves as many slots, so the mean is the pooled share); the floor is written as the
short requests' share of empty slots; blocks come from math.ceil; the allocator keeps one record
per sequence (its table and length), hands out the lowest free block first from a sorted set,
and finds an append's slot in the table's last block; paged waste counts each request's empty
tail slots, (-n) mod B.

Lengths are token counts, >= 1 and at most `max_seq_len`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card03_paging/paging.py"


def static_slot_waste(max_seq_len: int, lengths: list[int]) -> float:
    """The fraction of statically reserved slots that hold no token, for requests of `lengths` tokens."""
    return sum((max_seq_len - n) / max_seq_len for n in lengths) / len(lengths)


def reservation_waste_bound(max_seq_len: int, short_fraction: float, short_max: int) -> float:
    """The least static-reservation waste of any trace that matches what is known about its lengths."""
    # The fullest matching trace: short requests at exactly short_max, the rest full. Only the
    # short ones leave slots empty, max_seq_len - short_max each.
    return short_fraction * (max_seq_len - short_max) / max_seq_len


def blocks_for_tokens(n_tokens: int, block_size: int) -> int:
    """The blocks a sequence of `n_tokens` tokens holds when memory comes in blocks of `block_size` slots."""
    return math.ceil(n_tokens / block_size)


@dataclass
class _Sequence:
    table: list[int] = field(default_factory=list)
    length: int = 0


class PagedBlockTable:
    """A block allocator: `num_blocks` physical blocks of `block_size` slots, one block table per sequence."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._free = set(range(num_blocks))
        self._seqs: dict = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def _take(self, n: int) -> list[int]:
        taken = sorted(self._free)[:n]  # the lowest ids first
        self._free.difference_update(taken)
        return taken

    def block_table(self, seq_id) -> list[int]:
        return self._seqs[seq_id].table.copy()

    def allocate(self, seq_id, n_tokens: int) -> list[int]:
        need = blocks_for_tokens(n_tokens, self.block_size)
        if len(self._free) < need:
            raise MemoryError(f"{need} blocks needed, {len(self._free)} free")
        self._seqs[seq_id] = _Sequence(self._take(need), n_tokens)
        return self.block_table(seq_id)

    def append(self, seq_id) -> int:
        seq = self._seqs[seq_id]
        offset = seq.length % self.block_size
        if offset == 0:  # the last block is full (or the table is empty): take a new one first
            if not self._free:
                raise MemoryError("no free block")
            seq.table += self._take(1)
        seq.length += 1
        return seq.table[-1] * self.block_size + offset

    def free(self, seq_id) -> None:
        self._free.update(self._seqs.pop(seq_id).table)


def paged_slot_waste(lengths: list[int], block_size: int) -> float:
    """The fraction of the slots in held blocks that hold no token, when each request holds whole blocks."""
    empty = sum(-n % block_size for n in lengths)
    return empty / (sum(lengths) + empty)


def paged_waste_bytes(cfg: ModelConfig, lengths: list[int], block_size: int, dtype: torch.dtype) -> int:
    """Bytes held in blocks but holding no token, for requests of `lengths` tokens, the whole model in `dtype`."""
    slot_bytes = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V, every layer
    return slot_bytes * sum(-n % block_size for n in lengths)
