"""A correct alternative to solutions/card13_prefix_sharing/sharing.py: the same katas, other ways.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card13 test to pass. Here the keys chain BLAKE2b over the parent digest and the block's ids
packed as 8-byte integers (fixed width, so no separator is needed), from an empty root; the saved
bytes go through bytes per token; the blocks and reference counts of parallel sampling are
counted by replaying the appends sample by sample; the offloaded step is the slower lane for
every layer plus the faster lane once.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card13_prefix_sharing/sharing.py"


def prefix_block_keys(token_ids: list[int], block_size: int) -> list[bytes]:
    """One prefix-cache key per full block of `token_ids`, as `bytes` digests of one fixed length."""
    keys, parent = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        parent = hashlib.blake2b(parent + struct.pack(f"<{len(block)}q", *block), digest_size=16).digest()
        keys.append(parent)
    return keys


def prefix_sharing_saved_bytes(cfg: ModelConfig, n_requests: int, prompt_len: int, block_size: int,
                               dtype: torch.dtype) -> int:
    """Bytes of K/V saved when `n_requests` requests that begin with the same `prompt_len`-token prompt share its blocks."""
    token_bytes = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V, every layer
    shared_tokens = prompt_len - prompt_len % block_size  # whole blocks only
    return shared_tokens * token_bytes * (n_requests - 1)


def _fork_and_append(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> tuple[int, int]:
    """Replay the samples' appends, one sample after the other: (blocks allocated after the prompt's,
    references left on the prompt's partial block)."""
    rest = prompt_len % block_size
    partial_refs = n_samples if rest else 0  # every sample points at the partial block after the fork
    allocated = 0
    for _ in range(n_samples):
        fill = rest if rest else block_size  # how full this sample's last block is
        shared = bool(rest)  # is that block the prompt's partial one, shared?
        for _ in range(new_tokens):
            if shared:
                if partial_refs > 1:  # copy-on-write: a private copy, one reference fewer on the original
                    partial_refs -= 1
                    allocated += 1
                shared = False  # a copy of its own, or the original now held by this sample alone
            if fill == block_size:
                allocated, fill = allocated + 1, 0
            fill += 1
    return allocated, partial_refs


def parallel_sampling_blocks(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> int:
    """Blocks held after a `prompt_len`-token prompt is forked into `n_samples` samples that each append `new_tokens`."""
    private, _ = _fork_and_append(prompt_len, n_samples, new_tokens, block_size)
    return -(-prompt_len // block_size) + private


def prompt_block_refcounts(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> list[int]:
    """The reference count of each of the prompt's original blocks, after the samples of parallel_sampling_blocks."""
    _, on_partial = _fork_and_append(prompt_len, n_samples, new_tokens, block_size)
    full = prompt_len // block_size
    return [n_samples for _ in range(full)] + ([on_partial] if prompt_len % block_size else [])


def layer_transfer_seconds(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                           link_bytes_per_s: float) -> float:
    """Seconds to bring ONE layer's K/V for `batch` sequences of `seq_len` positions over a link of `link_bytes_per_s`."""
    k_bytes = batch * cfg.n_kv_heads * seq_len * cfg.head_dim * dtype.itemsize  # [B, Hkv, T, D]
    return (k_bytes + k_bytes) / link_bytes_per_s  # and V of the same shape


def offloaded_step_seconds(n_layers: int, compute_s: float, transfer_s: float) -> float:
    """Time of one pass over `n_layers` layers when each layer's K/V is streamed in while the previous layer computes."""
    # The slower lane runs back to back for every layer; the faster one shows once (the first
    # copy ahead of the compute lane, or the last compute after the copy lane).
    return n_layers * max(compute_s, transfer_s) + min(compute_s, transfer_s)
