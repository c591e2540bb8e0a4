"""A correct alternative to solutions/card13_prefix_sharing/sharing.py: keys from sha256 of the repr of (parent,
block ids).

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
    keys, parent = [], b"root"
    for i in range(len(token_ids) // block_size):
        block = token_ids[i * block_size:(i + 1) * block_size]
        parent = hashlib.sha256(repr((parent, tuple(block))).encode()).digest()
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
    shared_blocks = prompt_len // block_size
    block_bytes = 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    return (n_requests - 1) * shared_blocks * block_bytes


def parallel_sampling_blocks(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> int:
    """Blocks held after a `prompt_len`-token prompt is forked into `n_samples` samples that each append `new_tokens`.

    The prompt is prefilled once; the samples share its blocks by reference count. A sample
    appending to a shared block that is only partly full must first get a private copy of it
    (copy-on-write); one that is alone on a block writes in place. How many distinct blocks are
    held once every sample has its `new_tokens`? (Prompt 20, blocks of 16, 4 samples, 1 token
    each: is it 2 blocks, 5, or 8?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    full, rest = divmod(prompt_len, block_size)
    if new_tokens == 0:
        return full + (rest > 0)
    return full + n_samples * (-(-(rest + new_tokens) // block_size))


def prompt_block_refcounts(prompt_len: int, n_samples: int, new_tokens: int, block_size: int) -> list[int]:
    """The reference count of each of the prompt's original blocks, after the samples of parallel_sampling_blocks.

    Same scenario: the prompt's blocks, in order, were shared by all `n_samples` samples; then
    every sample appended `new_tokens` tokens, copying a shared partly filled block before
    writing into it. How many samples still point at each of the original blocks?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    full, rest = divmod(prompt_len, block_size)
    counts = [n_samples] * full
    if rest:
        counts.append(1 if new_tokens else n_samples)
    return counts


def layer_transfer_seconds(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                           link_bytes_per_s: float) -> float:
    """Seconds to bring ONE layer's K/V for `batch` sequences of `seq_len` positions over a link of `link_bytes_per_s`.

    The cache is offloaded to CPU memory (or disk) and streamed back layer by layer. How many
    bytes does one layer hold? (Llama-2-7B, bf16, one 4,096-token sequence, 64 GB/s.)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return 2 * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize / link_bytes_per_s


def offloaded_step_seconds(n_layers: int, compute_s: float, transfer_s: float) -> float:
    """Time of one pass over `n_layers` layers when each layer's K/V is streamed in while the previous layer computes.

    Layer l needs `transfer_s` to arrive (one copy at a time, in layer order) and `compute_s` to
    run (one layer at a time); it starts when its K/V has arrived and layer l - 1 is done; the
    copy of layer l + 1 overlaps the compute of layer l (two buffers). Nothing is prefetched
    before the step starts. When does a layer's transfer hide completely behind compute, and what
    is exposed then? And when it does not?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return transfer_s + (n_layers - 1) * max(compute_s, transfer_s) + compute_s
