"""A correct alternative to solutions/card14_storing_less/storing.py: the error as a float64 vector norm, and the
rebuild bill layer by layer in a loop.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card14: storing less, by MLA, low-rank keys or fewer cached layers.

Three ways to keep fewer numbers per token than K and V of every KV head in every layer:

- Multi-head latent attention (DeepSeek-V2 and V3) caches, per token and per layer, one latent
  c of C numbers (`cfg.mla_latent_dim`) and one RoPE key k_r of Dr numbers (`cfg.mla_rope_dim`),
  shared by all heads. Head h's key is [W_uk[h] c ; k_r] and its value W_uv[h] c, where W_uk[h]
  and W_uv[h] are [D, C] up-projections (D = `cfg.head_dim`).
- A low-rank key matrix: keep the top r singular triplets of the keys [T, D] of one head.
- Caching only some layers, and rebuilding the K/V of the others when a step needs them.

The tests measure: `.nbytes` of kvref's MLA cache (filled by a real MLA model, or allocated on
PyTorch's meta device for the real presets), scores of a naive MLA that expands every key, the
Frobenius error of an SVD truncation computed on real tensors, and FLOPs counted by PyTorch's
FlopCounterMode while kvref rebuilds the uncached layers' K/V of a real model.

Shapes: B batch, H heads, S new tokens (queries), T cached positions, D head dim, Dr RoPE dim,
C latent dim, L layers, d = d_model. An element's size in bytes is `dtype.itemsize`.
"""

from __future__ import annotations

import math
from collections.abc import Set

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card14_storing_less/storing.py"


def mla_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one more token adds to the cache of a whole model, in `dtype`, for an MLA or a GQA config.

    An MLA config (`cfg.is_mla`) caches, in every layer, the latent and the decoupled RoPE key:
    how many numbers is that per token per layer, and does it depend on `cfg.n_heads`? A config
    without MLA (`cfg.mla_latent_dim == 0`) caches K and V of `cfg.n_kv_heads` heads of
    `cfg.head_dim` in every layer, as in card02: return that, so the two compare. DeepSeek-V3 in
    bf16: fewer bytes per token than Llama-3-8B?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    if cfg.is_mla:
        return cfg.n_layers * (cfg.mla_latent_dim + cfg.mla_rope_dim) * dtype.itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def mla_absorbed_scores(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                        w_uk: torch.Tensor) -> torch.Tensor:
    """MLA attention scores [B, H, S, T], computed from the cached latents without expanding any key.

    q_nope [B, H, S, D]: each head's query part that meets the latent's key (no RoPE);
    q_rope [B, H, S, Dr]: each head's rotated query part; latent [B, T, C]: the cached latents;
    k_rope [B, T, Dr]: the cached rotated key, one per token, shared by every head;
    w_uk [H, D, C]: head h's key is k_h = [w_uk[h] @ c ; k_r] for a token's latent c and RoPE key k_r.

    Return (q_nope_h · k_nope_h + q_rope_h · k_r) / sqrt(D + Dr) for every head, query and cached
    position, before any mask or softmax. The naive way builds w_uk[h] @ c for all T positions
    and H heads. Instead move w_uk onto the query: q · (W c) = (? q) · c. Which matrix, and
    which side? The result must equal the naive scores (fp32, up to rounding).
    """
    scale = 1 / math.sqrt(q_nope.shape[-1] + q_rope.shape[-1])
    q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)  # (B, H, S, C): W_uk[h]ᵀ q_h
    scores = q_latent @ latent[:, None].transpose(-2, -1)  # (B, H, S, T)
    return (scores + q_rope @ k_rope[:, None].transpose(-2, -1)) * scale


def low_rank_key_error(singular_values: list[float], rank: int) -> float:
    """The Frobenius error ‖K - K_r‖_F of the best rank-`rank` approximation of a key matrix K.

    `singular_values` are K's singular values in descending order, as Python floats (what
    torch.linalg.svdvals returns); K_r keeps the `rank` largest singular triplets and drops the
    rest (rank 0 keeps nothing; a rank at or past the count keeps everything). Which singular
    values does the error come from, those kept or those dropped? Is ‖·‖_F a sum of them, of
    their squares, or the root of that? (Keys with singular values 4 and 3: the rank-0 error is?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return float(torch.linalg.vector_norm(torch.tensor(singular_values[rank:], dtype=torch.float64)))


def selective_cache_recompute_flops(cfg: ModelConfig, cached_layers: Set[int], n_past: int) -> int:
    """FLOPs one decode step spends rebuilding the K/V of the layers that are not cached, for `n_past` tokens.

    `cached_layers` holds the indices (0 .. L-1) of the layers whose K/V are cached; the other
    layers' K/V for the n_past earlier tokens of one sequence must be computed again from the
    tokens' ids before the new token can attend to them. Count what that rebuild costs, not the
    new token's own forward pass.

    Layer l's K and V are projections of layer l's input: which layers must the past tokens run
    through to produce it, and does that depend on how many layers are uncached or on which?
    A cached layer's K/V are read from the cache, not projected again; nothing above the highest
    uncached layer runs, nor the final norm and lm_head.

    Count as FlopCounterMode does on kvref's model: 2 FLOPs per multiply-add of a matmul
    (nn.Linear: 2 · tokens · in · out; the MLP has 3 matrices of d × d_ff for "swiglu", 2 for
    "gelu"); attention among the n_past tokens computes all n_past × n_past scores q·kᵀ over D
    and as many weighted sums over D in each of H heads (the causal mask is applied afterwards);
    norms, RoPE and softmax count 0. `cfg` is dense (no experts) and has no sliding window.
    Return an int.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    uncached = [layer for layer in range(cfg.n_layers) if layer not in cached_layers]
    if not uncached:
        return 0
    d, H, Hkv, D, T = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, n_past
    kv = 2 * d * Hkv * D  # K and V projection weights of one layer
    qo = 2 * d * H * D  # q and o projection weights
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    attention = 4 * H * T * T * D  # q·kᵀ and p·v over the whole T x T rectangle
    flops = 0
    for layer in range(max(uncached) + 1):
        if layer not in cached_layers:
            flops += 2 * T * kv  # this layer's K and V for the past tokens
        if layer < max(uncached):  # the past tokens go on through this layer to reach the next
            flops += 2 * T * (qo + mlp) + attention
    return flops
