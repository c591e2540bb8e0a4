"""card03: slot reservation and fragmentation.

A server that does not know how long a request will run can reserve `max_seq_len` K/V slots
for it up front (static reservation: one contiguous `[max_seq_len, Hkv, D]` region per request
and layer), or hand out memory in fixed blocks of `block_size` slots as the request grows
(paging, PagedAttention). A slot holds the K and V of one token in one layer; a request of n
tokens fills n slots. Every slot that is reserved but holds no token is waste: no other request
can use it while it is held.

The tests measure: static waste on a real cache (a buffer of `max_seq_len` slots per request,
the written slots counted), paged waste by kvref's block allocator holding the same trace, and
bytes on caches allocated on the meta device. Lengths are token counts, >= 1 and at most
`max_seq_len`.
"""

from __future__ import annotations

import torch

from kvref.config import ModelConfig


def static_slot_waste(max_seq_len: int, lengths: list[int]) -> float:
    """The fraction of statically reserved slots that hold no token, for requests of `lengths` tokens.

    Each request reserves `max_seq_len` slots and fills `lengths[i]` of them. Return
    unused slots / reserved slots over the whole trace, a float in [0, 1). (Three requests of
    1, 512 and 8,192 tokens against max_seq_len 8,192: how many of the 24,576 slots are used?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return 1 - sum(lengths) / (len(lengths) * max_seq_len)


def reservation_waste_bound(max_seq_len: int, short_fraction: float, short_max: int) -> float:
    """The least static-reservation waste of any trace that matches what is known about its lengths.

    Known: a fraction `short_fraction` of the requests are at most `short_max` tokens long; the
    rest are at most `max_seq_len` (nothing more is known about them). Every request reserves
    `max_seq_len` slots. The assumption about the length distribution is made explicit here:
    assume nothing beyond those two facts, and return the waste of the trace, among all traces
    that satisfy them, that wastes the least (so every real trace with these facts wastes at
    least this much), as a float. Which lengths does that trace have?

    The interview case: max_seq_len = 8,192 with 90% of requests at most 512 tokens. Any number
    above this floor needs an assumed distribution (uniform lengths, say), and depends on it.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    used = short_fraction * short_max + (1 - short_fraction) * max_seq_len
    return 1 - used / max_seq_len


def blocks_for_tokens(n_tokens: int, block_size: int) -> int:
    """The blocks a sequence of `n_tokens` tokens holds when memory comes in blocks of `block_size` slots.

    Tokens fill a sequence's blocks in order; a new block is taken only when the last one is
    full. (70 tokens in blocks of 16? 64? 0 tokens?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return -(-n_tokens // block_size)


class PagedBlockTable:
    """A block allocator: `num_blocks` physical blocks of `block_size` slots, one block table per sequence.

    - `allocate(seq_id, n_tokens)` starts a sequence holding `n_tokens >= 1` tokens and returns
      its block table, the list of physical block ids (0 .. num_blocks - 1) its positions live in:
      position p is in block `table[p // block_size]`, at offset `p % block_size`.
    - `append(seq_id)` adds one token and returns its slot, `block * block_size + offset`.
    - `free(seq_id)` ends the sequence and returns its blocks to the free list.
    - `block_table(seq_id)` returns the sequence's current block table (a list of ints).
    - `num_free_blocks` is how many blocks no sequence holds.

    No block may be held by two sequences. When there are not enough free blocks, `allocate`
    and `append` raise MemoryError and change nothing. The lists `allocate` and `block_table`
    return are the caller's: changing one changes nothing in the allocator. A freed `seq_id` is
    gone, and one whose `allocate` was refused never started: `block_table`, `append` and `free`
    of it raise KeyError (until it is allocated).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
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
        self.tables[seq_id] = [self.free_blocks.pop() for _ in range(need)]
        self.lengths[seq_id] = n_tokens
        return list(self.tables[seq_id])

    def append(self, seq_id) -> int:
        pos, table = self.lengths[seq_id], self.tables[seq_id]
        if pos % self.block_size == 0:
            if not self.free_blocks:
                raise MemoryError("no free block")
            table.append(self.free_blocks.pop())
        self.lengths[seq_id] = pos + 1
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def free(self, seq_id) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id))
        del self.lengths[seq_id]


def paged_slot_waste(lengths: list[int], block_size: int) -> float:
    """The fraction of the slots in held blocks that hold no token, when each request holds whole blocks.

    Requests of `lengths` tokens each hold just enough blocks of `block_size` slots. Return
    unused slots / slots held over the whole trace, a float in [0, 1). Where in a sequence can
    an unused slot be, and how many can there be at most?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    held = sum(blocks_for_tokens(n, block_size) for n in lengths) * block_size
    return 1 - sum(lengths) / held


def paged_waste_bytes(cfg: ModelConfig, lengths: list[int], block_size: int, dtype: torch.dtype) -> int:
    """Bytes held in blocks but holding no token, for requests of `lengths` tokens, the whole model in `dtype`.

    A block of `block_size` slots exists in every layer, for K and for V, for all the KV heads.
    How many bytes does one unused slot cost across the model? (Llama-2-70B: 80 layers,
    8 KV heads of 128, d_model 8192.)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    unused = sum(blocks_for_tokens(n, block_size) * block_size - n for n in lengths)
    return unused * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
