"""A correct alternative to solutions/card03_paging/paging.py: blocks by math.ceil of a true division, and an
allocator that keeps its free blocks in a set and always hands out the smallest ids first.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import math


def blocks_for_tokens(n_tokens: int, block_size: int) -> int:
    return math.ceil(n_tokens / block_size)

EXTENDS = "solutions/card03_paging/paging.py"


class PagedBlockTable:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_blocks = set(range(num_blocks))
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
        self.tables[seq_id] = sorted(self.free_blocks)[:need]
        self.free_blocks -= set(self.tables[seq_id])
        self.lengths[seq_id] = n_tokens
        return list(self.tables[seq_id])

    def append(self, seq_id) -> int:
        pos, table = self.lengths[seq_id], self.tables[seq_id]
        if pos % self.block_size == 0:
            if not self.free_blocks:
                raise MemoryError("no free block")
            table.append(min(self.free_blocks))
            self.free_blocks.remove(table[-1])
        self.lengths[seq_id] = pos + 1
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def free(self, seq_id) -> None:
        self.free_blocks |= set(self.tables.pop(seq_id))
        del self.lengths[seq_id]


