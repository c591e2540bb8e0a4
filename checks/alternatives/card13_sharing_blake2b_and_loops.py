"""A correct alternative to solutions/card13_prefix_sharing/sharing.py: keys from blake2b over fixed-width packed
ids, saved bytes as without minus with sharing, sampling blocks and refcounts counted block by block, transfer
bytes from torch.finfo's bits, the offloaded step as a loop over the two engines' clocks.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card13: sharing and tiering.

Paged K/V (card03) can be shared. Requests that begin with the same tokens (a system prompt,
few-shot examples) have the same K/V for those positions in every layer, because a token's K/V
depends only on the tokens up to it. A server can keep one copy in blocks and point every
request's block table at it, counting references. Only whole blocks are shared: a block is
identified by a key computed from its tokens AND everything before it, so two requests share
block i only if their first (i + 1) · block_size tokens agree. Parallel sampling (n answers to
one prompt) forks a sequence: the samples share all the prompt's blocks, and a sample that
appends to a shared, partly filled block first copies it (copy-on-write).

When the cache does not fit on the GPU at all, it can live in CPU memory or on disk and be
brought in layer by layer, each layer's transfer overlapping the previous layer's compute.

The tests measure with kvref's block allocator (kvref.paging: refcounts, prefix hits, blocks
held), with K/V pools allocated on the meta device for real presets, and with an event-log
simulation of a copy engine and a compute engine (kvref.offload).
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card13_prefix_sharing/sharing.py"


def prefix_block_keys(token_ids: list[int], block_size: int) -> list[bytes]:
    """One prefix-cache key per full block of `token_ids`, as `bytes` digests of one fixed length.

    Key i must be equal for two token lists exactly when their first (i + 1) · block_size tokens
    are equal, and it must not grow with the prefix: compute it from key i - 1 (the parent) and
    block i's own token ids, e.g. with `hashlib.sha256` (the first block's parent is any fixed
    bytes). A partly filled last block gets no key. Why is hashing block i's tokens alone wrong?
    (Two prompts [1, 2, 3, 4] and [9, 9, 3, 4] in blocks of 2.)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    keys, parent = [], bytes(16)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(struct.pack(f"<{block_size}q", *token_ids[start:start + block_size]))  # 8 bytes an id
        parent = h.digest()
        keys.append(parent)
    return keys


def prefix_sharing_saved_bytes(cfg: ModelConfig, n_requests: int, prompt_len: int, block_size: int,
                               dtype: torch.dtype) -> int:
    """Bytes of K/V saved when `n_requests` requests that begin with the same `prompt_len`-token prompt share its blocks.

    Each request continues with tokens of its own right after the shared prompt. Without
    sharing, every request holds its own blocks; with prefix caching, blocks whose keys match are
    held once. Count the bytes in every layer, for K and V, in `dtype`. Which blocks of the
    prompt can be shared, and how many copies of each are still needed? (100 requests, a
    1,000-token prompt, blocks of 16: is block 62 shared?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    slot_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    full_block_slots = prompt_len - prompt_len % block_size
    without = n_requests * full_block_slots * slot_bytes
    with_sharing = full_block_slots * slot_bytes
    return without - with_sharing


def parallel_sampling_blocks(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> int:
    """Blocks held after a `prompt_len`-token prompt is forked into `n_samples` samples that each append `new_tokens`.

    The prompt is prefilled once; the samples share its blocks by reference count. A sample
    appending to a shared block that is only partly full must first get a private copy of it
    (copy-on-write); one that is alone on a block writes in place. How many distinct blocks are
    held once every sample has its `new_tokens`? (Prompt 20, blocks of 16, 4 samples, 1 token
    each: is it 2 blocks, 5, or 8?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    full, rest = prompt_len // block_size, prompt_len % block_size
    held = full + (1 if rest else 0)  # the prompt, prefilled once
    if new_tokens:
        tail = rest + new_tokens  # each sample's tokens past the last full prompt block
        per_sample = math.ceil(tail / block_size)  # its copy of the partial block (if any), then new blocks
        held += n_samples * per_sample - (1 if rest else 0)  # every sample copied the partial block: it is freed
    return held


def prompt_block_refcounts(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> list[int]:
    """The reference count of each of the prompt's original blocks, after the samples of parallel_sampling_blocks.

    Same scenario: the prompt's blocks, in order, were shared by all `n_samples` samples; then
    every sample appended `new_tokens` tokens, copying a shared partly filled block before
    writing into it. How many samples still point at each of the original blocks?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    counts = []
    for start in range(0, prompt_len, block_size):
        partial = start + block_size > prompt_len
        # A partial block is written by every sample: all but the last writer copy it away.
        counts.append(1 if partial and new_tokens > 0 else n_samples)
    return counts


def layer_transfer_seconds(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                           link_bytes_per_s: float) -> float:
    """Seconds to bring ONE layer's K/V for `batch` sequences of `seq_len` positions over a link of `link_bytes_per_s`.

    The cache is offloaded to CPU memory (or disk) and streamed back layer by layer. How many
    bytes does one layer hold? (Llama-2-7B, bf16, one 4,096-token sequence, 64 GB/s.)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    layer_bytes = 2 * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return layer_bytes * (1.0 / link_bytes_per_s)


def offloaded_step_seconds(n_layers: int, compute_s: float, transfer_s: float) -> float:
    """Time of one pass over `n_layers` layers when each layer's K/V is streamed in while the previous layer computes.

    Layer l needs `transfer_s` to arrive (one copy at a time, in layer order) and `compute_s` to
    run (one layer at a time); it starts when its K/V has arrived and layer l - 1 is done; the
    copy of layer l + 1 overlaps the compute of layer l (two buffers). Nothing is prefetched
    before the step starts. When does a layer's transfer hide completely behind compute, and what
    is exposed then? And when it does not?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    copy_done, compute_done = 0.0, 0.0
    for _ in range(n_layers):
        copy_done += transfer_s  # copies run back to back on the copy engine
        compute_done = max(copy_done, compute_done) + compute_s
    return compute_done
