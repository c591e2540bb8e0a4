"""A correct alternative to solutions/card13_prefix_sharing/sharing.py: keys from blake2b over fixed-width packed
ids, saved bytes as without minus with sharing, sampling blocks and refcounts counted block by block, transfer
bytes from torch.finfo's bits, the offloaded step as a loop over the two engines' clocks.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card13_prefix_sharing/sharing.py"


def prefix_block_keys(token_ids: list[int], block_size: int) -> list[bytes]:
    keys, parent = [], bytes(16)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(struct.pack(f"<{block_size}q", *token_ids[start:start + block_size]))  # 8 bytes an id
        parent = h.digest()
        keys.append(parent)
    return keys


def prefix_sharing_saved_bytes(cfg: ModelConfig, n_requests: int, prompt_len: int, block_size: int,
                               dtype: torch.dtype) -> int:
    slot_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    full_block_slots = prompt_len - prompt_len % block_size
    without = n_requests * full_block_slots * slot_bytes
    with_sharing = full_block_slots * slot_bytes
    return without - with_sharing


def parallel_sampling_blocks(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> int:
    full, rest = prompt_len // block_size, prompt_len % block_size
    held = full + (1 if rest else 0)  # the prompt, prefilled once
    if new_tokens:
        tail = rest + new_tokens  # each sample's tokens past the last full prompt block
        per_sample = math.ceil(tail / block_size)  # its copy of the partial block (if any), then new blocks
        held += n_samples * per_sample - (1 if rest else 0)  # every sample copied the partial block: it is freed
    return held


def prompt_block_refcounts(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> list[int]:
    counts = []
    for start in range(0, prompt_len, block_size):
        partial = start + block_size > prompt_len
        # A partial block is written by every sample: all but the last writer copy it away.
        counts.append(1 if partial and new_tokens > 0 else n_samples)
    return counts


def layer_transfer_seconds(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                           link_bytes_per_s: float) -> float:
    layer_bytes = 2 * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return layer_bytes * (1.0 / link_bytes_per_s)


def offloaded_step_seconds(n_layers: int, compute_s: float, transfer_s: float) -> float:
    copy_done, compute_done = 0.0, 0.0
    for _ in range(n_layers):
        copy_done += transfer_s  # copies run back to back on the copy engine
        compute_done = max(copy_done, compute_done) + compute_s
    return compute_done
