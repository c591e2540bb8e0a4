"""A correct alternative to solutions/card03_paging/paging.py: the waste as unused over reserved slots, the floor
as the short requests' share times their own waste, blocks as (n - 1) // B + 1 and by divmod, a first-in-
first-out free list (a deque), the slot from the last block, paged waste from -n % B per request, itemsize
from torch.finfo's bits.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import collections

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card03_paging/paging.py"


def static_slot_waste(max_seq_len: int, lengths: list[int]) -> float:
    reserved = len(lengths) * max_seq_len
    return sum(max_seq_len - n for n in lengths) / reserved


def reservation_waste_bound(max_seq_len: int, short_fraction: float, short_max: int) -> float:
    """The least static-reservation waste of any trace that matches what is known about its lengths.

    Known: a fraction `short_fraction` of the requests are at most `short_max` tokens long; the
    rest are at most `max_seq_len` (nothing more is known about them). Every request reserves
    `max_seq_len` slots. The assumption about the length distribution is made explicit here:
    assume nothing beyond those two facts, and return the waste of the trace, among all traces
    that satisfy them, that wastes the least (so every real trace with these facts wastes at
    least this much). Which lengths does that trace have?

    The interview case: max_seq_len = 8,192 with 90% of requests at most 512 tokens. Any number
    above this floor needs an assumed distribution (uniform lengths, say), and depends on it.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return short_fraction * (max_seq_len - short_max) / max_seq_len


def blocks_for_tokens(n_tokens: int, block_size: int) -> int:
    return (n_tokens - 1) // block_size + 1


class PagedBlockTable:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_blocks = collections.deque(range(num_blocks))
        self.tables: dict = {}
        self.lengths: dict = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def block_table(self, seq_id) -> list[int]:
        return list(self.tables[seq_id])

    def allocate(self, seq_id, n_tokens: int) -> list[int]:
        need = blocks_for_tokens(n_tokens, self.block_size)
        if need > len(self.free_blocks):
            raise MemoryError(f"{need} blocks needed, {len(self.free_blocks)} free")
        self.tables[seq_id] = [self.free_blocks.popleft() for _ in range(need)]
        self.lengths[seq_id] = n_tokens
        return list(self.tables[seq_id])

    def append(self, seq_id) -> int:
        pos, table = self.lengths[seq_id], self.tables[seq_id]
        if pos % self.block_size == 0:
            if not self.free_blocks:
                raise MemoryError("no free block")
            table.append(self.free_blocks.popleft())
        self.lengths[seq_id] = pos + 1
        return table[-1] * self.block_size + pos % self.block_size

    def free(self, seq_id) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id))
        del self.lengths[seq_id]


def paged_slot_waste(lengths: list[int], block_size: int) -> float:
    unused = sum(-n % block_size for n in lengths)
    return unused / (unused + sum(lengths))


def paged_waste_bytes(cfg: ModelConfig, lengths: list[int], block_size: int, dtype: torch.dtype) -> int:
    unused = sum(blocks_for_tokens(n, block_size) * block_size - n for n in lengths)
    return unused * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
