"""Spoiler for cards 03 and 13: paged KV memory, the way vLLM manages it.

The cache of every layer is one pool of `num_blocks` physical blocks of `block_size` token
slots, `[num_blocks, block_size, Hkv, D]`. A sequence owns a block table: logical block i of
the sequence (positions i·block_size .. (i+1)·block_size - 1) lives in physical block
`block_table[i]`, so position p is written to slot `block_table[p // bs] · bs + p % bs`
(the slot mapping). Blocks come from a free list and go back to it when no sequence holds them,
so a sequence holds at most one partly filled block: its waste is under one block.

Blocks are reference counted. A fork (parallel sampling, beam search) shares all of the parent's
blocks; appending to a shared, partly filled block first copies it to a private block
(copy-on-write), and the copy is returned so the caller moves the K/V bytes.

With prefix caching, every full block gets a key chained over its parent's key and its own
token ids, `key_i = sha256(key_{i-1} ‖ tokens of block i)`, so a key names the whole prefix up
to the end of its block. A new sequence whose first blocks' keys are cached reuses those
blocks (hits) instead of computing them (misses). A cached block whose refcount falls to 0 stays
cached on the free list, least recently freed first; taking it for a new allocation evicts it.
kvref counts a hit for every leading full block whose key is cached, the prompt's last block
included. An engine still has to run the prompt's last token to get the logits of the first new
token: vLLM v1 caps a prefix hit at num_tokens - 1 tokens, so a prompt made entirely of cached
full blocks has its last block computed again there.

Modelled on vLLM: Kwon et al., SOSP 2023 (PagedAttention), §4.1–4.4; vllm/v1/core/block_pool.py
(free block queue, cached blocks, LRU eviction) and vllm/v1/core/kv_cache_utils.py
(hash_block_tokens over the parent hash and the block's token ids). Written here, not copied.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvref.attention import attention

ROOT_KEY = b"kvref-prefix-root"  # the parent key of a sequence's first block


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 over the parent block's key and this block's tokens."""
    h = hashlib.sha256(parent)
    h.update(b"|" + ",".join(str(int(t)) for t in token_ids).encode())
    return h.digest()


def prefix_keys(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of the full blocks of `token_ids`, chained from ROOT_KEY (a partial last block has none)."""
    keys, parent = [], ROOT_KEY
    for i in range(len(token_ids) // block_size):
        parent = block_key(parent, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys


class OutOfBlocks(MemoryError):
    """The free list cannot supply the blocks a request needs; nothing was changed."""


class BlockAllocator:
    """Physical blocks of `block_size` slots, block tables per sequence, refcounts and an LRU free list."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BlockAllocator: {name} must be an int >= 1, got {value!r}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refcount = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: next to reuse
        self.block_tables: dict[object, list[int]] = {}
        self.tokens: dict[object, list[int]] = {}
        self.key_of: dict[int, bytes] = {}    # block -> its prefix key, while cached
        self.cached: dict[bytes, int] = {}    # prefix key -> block
        self.hits = self.misses = self.evictions = 0

    # --- counts --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one sequence (cached blocks with refcount 0 count as free)."""
        return self.num_blocks - len(self.free)

    def seq_len(self, seq_id) -> int:
        return len(self._tokens(seq_id))

    def blocks_needed(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def waste_slots(self, seq_id) -> int:
        """Slots in the sequence's blocks that hold no token of it (only the last block can have any)."""
        return len(self.block_tables[seq_id]) * self.block_size - self.seq_len(seq_id)

    def slot_mapping(self, seq_id) -> list[int]:
        """The slot of every position 0 .. T-1 of the sequence: block_table[p // bs] · bs + p % bs."""
        table, bs = self.block_tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(self.seq_len(seq_id))]

    def _tokens(self, seq_id) -> list[int]:
        if seq_id not in self.tokens:
            raise KeyError(f"BlockAllocator: no sequence {seq_id!r}")
        return self.tokens[seq_id]

    # --- the free list -------------------------------------------------------------------------
    def _take(self) -> int:
        """The least recently freed block; if it still caches a prefix, that entry is evicted."""
        block, _ = self.free.popitem(last=False)
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cached[key]
            self.evictions += 1
        self.refcount[block] = 1
        return block

    def _release(self, block: int) -> None:
        if self.refcount[block] <= 0:  # a bookkeeping bug: raised, not asserted (python -O drops asserts)
            raise RuntimeError(f"BlockAllocator: block {block} released more often than held")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free[block] = None  # to the tail: reused last, so a cached prefix lives as long as possible

    def _cache_full_block(self, seq_id, index: int) -> None:
        """Register block `index` of the sequence, now full, under its chained key (first one wins)."""
        if not self.prefix_caching:
            return
        bs, toks, table = self.block_size, self.tokens[seq_id], self.block_tables[seq_id]
        parent = ROOT_KEY if index == 0 else self.key_of.get(table[index - 1])
        if parent is None:
            parent = prefix_keys(toks[:index * bs], bs)[-1]
        key = block_key(parent, toks[index * bs:(index + 1) * bs])
        if key not in self.cached and table[index] not in self.key_of:
            self.cached[key], self.key_of[table[index]] = table[index], key

    # --- sequences -----------------------------------------------------------------------------
    def allocate(self, seq_id, token_ids: Sequence[int]) -> list[int]:
        """Start a sequence with its prompt; return its block table.

        With prefix caching, the leading full blocks whose chained keys are cached are shared
        (hits); the rest are taken from the free list (misses). Raises OutOfBlocks, changing
        nothing, when the free list is too short.
        """
        if seq_id in self.tokens:
            raise ValueError(f"BlockAllocator.allocate: sequence {seq_id!r} already exists")
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("BlockAllocator.allocate: a sequence starts with at least one token")
        hit_blocks = []
        if self.prefix_caching:
            for key in prefix_keys(token_ids, self.block_size):
                if key not in self.cached:
                    break
                hit_blocks.append(self.cached[key])
        new = self.blocks_needed(len(token_ids)) - len(hit_blocks)
        reusable = sum(1 for b in hit_blocks if self.refcount[b] == 0)  # hits sitting on the free list
        if new > self.num_free_blocks - reusable:
            raise OutOfBlocks(f"sequence {seq_id!r} needs {new} new blocks, {self.num_free_blocks - reusable} free")
        for b in hit_blocks:
            if self.refcount[b] == 0:
                del self.free[b]
            self.refcount[b] += 1
        n_full = len(token_ids) // self.block_size
        self.hits += len(hit_blocks)
        self.misses += n_full - len(hit_blocks)
        self.block_tables[seq_id] = hit_blocks + [self._take() for _ in range(new)]
        self.tokens[seq_id] = token_ids
        for i in range(len(hit_blocks), n_full):
            self._cache_full_block(seq_id, i)
        return list(self.block_tables[seq_id])

    def append(self, seq_id, token_id: int = 0) -> tuple[int, tuple[int, int] | None]:
        """Add one token; return (its slot, the (src, dst) block copy that copy-on-write needs, or None).

        A new block is taken when the last one is full. If the last block is partly filled and
        shared (refcount > 1), the sequence gets a private copy first: writing into the shared
        block would change what the other sequences read.
        """
        toks, table, bs = self._tokens(seq_id), self.block_tables[seq_id], self.block_size
        pos, copy = len(toks), None
        if pos % bs == 0:
            if not self.free:
                raise OutOfBlocks(f"sequence {seq_id!r} needs a block for position {pos}, none free")
            table.append(self._take())
        elif self.refcount[table[-1]] > 1:
            if not self.free:
                raise OutOfBlocks(f"sequence {seq_id!r} needs a private copy of block {table[-1]}, none free")
            src, dst = table[-1], self._take()
            self._release(src)
            table[-1], copy = dst, (src, dst)
        toks.append(int(token_id))
        if (pos + 1) % bs == 0:
            self._cache_full_block(seq_id, pos // bs)
        return table[pos // bs] * bs + pos % bs, copy

    def fork(self, parent_id, child_id) -> list[int]:
        """The child shares every block of the parent (refcount + 1 each); nothing is copied yet."""
        if child_id in self.tokens:
            raise ValueError(f"BlockAllocator.fork: sequence {child_id!r} already exists")
        toks = self._tokens(parent_id)
        self.tokens[child_id] = list(toks)
        self.block_tables[child_id] = list(self.block_tables[parent_id])
        for b in self.block_tables[child_id]:
            self.refcount[b] += 1
        return list(self.block_tables[child_id])

    def free_seq(self, seq_id) -> None:
        """End a sequence: release its blocks, last block first, so a prefix's first blocks are evicted last."""
        self._tokens(seq_id)
        for b in reversed(self.block_tables.pop(seq_id)):
            self._release(b)
        del self.tokens[seq_id]


# --- K/V through a block table ------------------------------------------------------------------

def paged_kv_cache(num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V pools, each `[num_blocks, block_size, Hkv, D]`."""
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: Sequence[int], k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Write S tokens' K/V `[S, Hkv, D]` into `slots` (flat slot ids) of the pools."""
    n, bs, hkv, d = k_cache.shape
    if k.shape != v.shape or k.shape != (len(slots), hkv, d):
        raise ValueError(f"write_slots: K/V must be [S, Hkv, D] = {[len(slots), hkv, d]}, got {list(k.shape)}")
    idx = torch.as_tensor(list(slots), dtype=torch.long, device=k_cache.device)
    k_cache.view(n * bs, hkv, d)[idx] = k.to(k_cache.dtype)
    v_cache.view(n * bs, hkv, d)[idx] = v.to(v_cache.dtype)


def copy_block(k_cache: torch.Tensor, v_cache: torch.Tensor, src: int, dst: int) -> None:
    """Copy-on-write: block `dst` gets block `src`'s K/V."""
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: Sequence[int],
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence's K/V read through its block table, as a contiguous `[1, Hkv, T, D]` pair."""
    n, bs, hkv, d = k_cache.shape
    if not 1 <= seq_len <= len(block_table) * bs:
        raise ValueError(f"gather_kv: seq_len {seq_len} does not fit {len(block_table)} blocks of {bs}")
    blocks = torch.as_tensor(list(block_table), dtype=torch.long, device=k_cache.device)
    k = k_cache[blocks].reshape(-1, hkv, d)[:seq_len]  # (T, Hkv, D)
    v = v_cache[blocks].reshape(-1, hkv, d)[:seq_len]
    return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # (1, Hkv, T, D)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int]) -> torch.Tensor:
    """Attention of S new queries per sequence `[B, H, S, D]` over K/V read through block tables.

    Sequence b has `seq_lens[b]` cached positions (its S new tokens already written), found in
    the blocks `block_tables[b]`; its queries are the last S positions (causal, as card00).
    Returns `[B, H, S, D]`, equal to `kvref.attention.attention` over the contiguous cache.
    """
    if q.ndim != 4 or q.shape[0] != len(block_tables) or len(seq_lens) != len(block_tables):
        raise ValueError(f"paged_attention: q must be [B, H, S, D] with one block table and length per sequence, "
                         f"got q {list(q.shape)}, {len(block_tables)} tables, {len(seq_lens)} lengths")
    out = []
    for b, (table, t) in enumerate(zip(block_tables, seq_lens)):
        if t < q.shape[2]:
            raise ValueError(f"paged_attention: sequence {b} has {t} positions, fewer than its {q.shape[2]} queries")
        k, v = gather_kv(k_cache, v_cache, table, t)
        out.append(attention(q[b:b + 1], k, v))  # (1, H, S, D)
    return torch.cat(out)


# --- measuring waste ----------------------------------------------------------------------------

def static_waste_measured(max_seq_len: int, lengths: Sequence[int], n_kv_heads: int = 1, head_dim: int = 2) -> float:
    """Fraction of a static reservation (max_seq_len slots per request) that holds no token.

    Measured on a real cache: one `[B, Hkv, max_seq_len, D]` buffer filled with NaN, each
    request's K written at its positions, the NaN slots counted.
    """
    if any(not 1 <= n <= max_seq_len for n in lengths) or not lengths:
        raise ValueError(f"static_waste_measured: lengths must be in 1 .. {max_seq_len}, got {list(lengths)[:8]}")
    k = torch.full((len(lengths), n_kv_heads, max_seq_len, head_dim), float("nan"))
    for b, n in enumerate(lengths):
        k[b, :, :n] = 1.0
    unused = torch.isnan(k[:, 0, :, 0]).sum().item()  # slots, counted once per (request, position)
    return unused / (len(lengths) * max_seq_len)


def paged_waste_measured(lengths: Sequence[int], block_size: int) -> tuple[float, int]:
    """(fraction of held slots that hold no token, blocks held) when kvref's allocator holds the trace."""
    alloc = BlockAllocator(sum(math.ceil(n / block_size) for n in lengths) + 1, block_size)
    for i, n in enumerate(lengths):
        alloc.allocate(i, [0] * n)
    held = alloc.num_used_blocks
    waste = sum(alloc.waste_slots(i) for i in range(len(lengths)))
    return waste / (held * block_size), held


def block_nbytes_measured(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers: .nbytes of the K and V pools on the meta device, per block."""
    return _block_nbytes(n_layers, n_kv_heads, head_dim, block_size, dtype)


# Cached apart from the public function, so that calling it always runs a line of kvref: a cache
# hit runs no Python code, and kvkata's formula guard would not see a formula kata measuring.
@functools.lru_cache(maxsize=None)  # the same allocation measures the same: remember it per (shape, dtype)
def _block_nbytes(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    total = 0
    for _ in range(n_layers):
        k, v = paged_kv_cache(1, block_size, n_kv_heads, head_dim, dtype, device="meta")
        total += k.nbytes + v.nbytes
    return total
