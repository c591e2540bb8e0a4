"""Spoiler for card14: MLA, low-rank keys and layer-selective caching (read it after you pass).

Storing fewer numbers per token, three ways, each written out so that what it stores and what
it costs can be measured.

**Multi-head latent attention** (DeepSeek-V2, arXiv 2405.04434 §2.1; DeepSeek-V3 keeps it). Each
token's hidden state h is projected down to a latent c = RMSNorm(W_dkv h) of C numbers and to one
RoPE key k_r = RoPE(W_kr h) of Dr numbers shared by every head; only (c, k_r) are cached, per
token per layer: C + Dr numbers, whatever the number of heads. Head h's key and value are
k_h = [W_uk[h] c ; k_r] and v_h = W_uv[h] c (up-projections, `kv_b_proj`). RoPE cannot live in the
latent: a rotation that depends on the key's position would sit between q and W_uk, so W_uk could
no longer be moved onto the query; hence the separate, small, rotated key.

The absorbed form never expands a key: q_h · (W_uk[h] c) = (W_uk[h]ᵀ q_h) · c, so the query is
mapped into latent space once and scores are read straight off the cache; likewise the output
o_h = W_uv[h] Σ_j p_j c_j feeds W_o, and W_o[:, h] W_uv[h] is one [d_model, C] matrix per head.
Both forms are here (`mla_scores_naive` / `mla_scores_absorbed`, `mla_output_naive` /
`mla_output_absorbed`) and `MLATransformer(absorbed=...)` runs either.

Weight names follow Hugging Face's DeepseekV3 (`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`)
without query compression (q_lora_rank None) and with half-split RoPE (rope_interleave False), so
its weights copy across. `head_dim` D is both qk_nope_head_dim and v_head_dim.

**Low-rank keys.** `low_rank` truncates the SVD of a key matrix [T, D] to rank r; by Eckart–Young
the Frobenius error is the root of the sum of the dropped squared singular values.

**Layer-selective caching.** Cache K/V of some layers only. Layer l's K/V depend on layer l's
input, which mixes every earlier token through every layer below l (only layer 0's K/V depend on
the token alone): so to rebuild the uncached layers' K/V for T past tokens, the past tokens run
through every layer below the highest uncached one, m (cached layers among them read their K/V
from the cache instead of projecting them), then through layer m's K/V projections.
`rebuild_uncached_kv` does exactly that; `selective_decode_step` decodes with it.

Shapes: B batch, H heads, S new tokens, T cached positions, D head dim, Dr RoPE dim, C latent dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from kvref.attention import attention, causal_mask
from kvref.cache import GrowingKVCache
from kvref.config import ModelConfig
from kvref.measure import flops_of, meta_model
from kvref.model import MLP, MoE, RMSNorm, Transformer
from kvref.rope import apply_rope, rope_cos_sin
from kvref.validate import check_tensor

# --- MLA: the two ways to score and to read out -----------------------------------------------


def _check_mla_inputs(q_nope, q_rope, latent, k_rope, w_uk) -> None:
    check_tensor("q_nope", q_nope, ndim=4, layout="[B, H, S, D]")
    B, H, S, D = q_nope.shape
    check_tensor("q_rope", q_rope, shape=(B, H, S, None), dtype=q_nope.dtype, layout="[B, H, S, Dr]")
    check_tensor("latent", latent, shape=(B, None, None), dtype=q_nope.dtype, layout="[B, T, C]")
    T, C = latent.shape[1:]
    check_tensor("k_rope", k_rope, shape=(B, T, q_rope.shape[-1]), dtype=q_nope.dtype, layout="[B, T, Dr]")
    check_tensor("w_uk", w_uk, shape=(H, D, C), dtype=q_nope.dtype, layout="[H, D, C]")


def mla_scores_naive(q_nope, q_rope, latent, k_rope, w_uk) -> torch.Tensor:
    """Scores [B, H, S, T] with every head's key expanded from the latent: k_h = [W_uk[h] c ; k_r]."""
    _check_mla_inputs(q_nope, q_rope, latent, k_rope, w_uk)
    scale = 1 / math.sqrt(q_nope.shape[-1] + q_rope.shape[-1])
    k_nope = torch.einsum("hdc,btc->bhtd", w_uk, latent)  # (B, H, T, D): a key per head, per token
    rope = q_rope @ k_rope[:, None].transpose(-2, -1)  # (B, H, S, T): one RoPE key shared by the heads
    return (q_nope @ k_nope.transpose(-2, -1) + rope) * scale


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """W_uk[h]ᵀ q_h for every head: queries [B, H, S, D] mapped into latent space, [B, H, S, C]."""
    return torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)


def mla_scores_absorbed(q_nope, q_rope, latent, k_rope, w_uk) -> torch.Tensor:
    """The same scores read straight off the cache: (W_uk[h]ᵀ q_h) · c + q_r · k_r, no key expanded."""
    _check_mla_inputs(q_nope, q_rope, latent, k_rope, w_uk)
    scale = 1 / math.sqrt(q_nope.shape[-1] + q_rope.shape[-1])
    q_latent = absorb_query(q_nope, w_uk)  # (B, H, S, C)
    rope = q_rope @ k_rope[:, None].transpose(-2, -1)  # (B, H, S, T)
    return (q_latent @ latent[:, None].transpose(-2, -1) + rope) * scale


def mla_output_naive(probs, latent, w_uv, w_o) -> torch.Tensor:
    """Attention output [B, S, d_model]: values W_uv[h] c expanded per head, then o_proj (w_o [d_model, H·D])."""
    B, H, S, T = probs.shape
    v = torch.einsum("hdc,btc->bhtd", w_uv, latent)  # (B, H, T, D)
    y = (probs @ v).transpose(1, 2).reshape(B, S, H * w_uv.shape[1])  # (B, S, H·D)
    return y @ w_o.T


def absorb_output(w_uv: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """W_o[:, h] W_uv[h] for every head, [H, d_model, C]: o_proj folded into the value up-projection."""
    H, D, C = w_uv.shape
    return torch.einsum("mhd,hdc->hmc", w_o.view(w_o.shape[0], H, D), w_uv)


def mla_output_absorbed(probs, latent, w_ov) -> torch.Tensor:
    """The same output from latent-space context vectors Σ_j p_j c_j [B, H, S, C] and `absorb_output`'s w_ov."""
    context = probs @ latent[:, None]  # (B, H, S, C): every head averages the same cached latents
    return torch.einsum("bhsc,hmc->bsm", context, w_ov)


# --- MLA: the cache and the model ----------------------------------------------------------


class MLACache:
    """One layer's MLA cache: the latent [B, Tmax, C] and the RoPE key [B, Tmax, Dr], preallocated.

    Nothing per head: every head reads the same latent. `update` appends the next S positions and
    returns what the new queries may read, ([B, T, C], [B, T, Dr]).
    """

    def __init__(self, batch: int, max_seq_len: int, latent_dim: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("batch", batch), ("max_seq_len", max_seq_len), ("latent_dim", latent_dim),
                            ("rope_dim", rope_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.latent = torch.zeros(batch, max_seq_len, latent_dim, dtype=dtype, device=device)  # (B, Tmax, C)
        self.k_rope = torch.zeros(batch, max_seq_len, rope_dim, dtype=dtype, device=device)  # (B, Tmax, Dr)
        self.seq_len = 0

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rope.nbytes

    def update(self, input_pos: torch.Tensor, latent_new: torch.Tensor, k_rope_new: torch.Tensor):
        B, Tmax, C = self.latent.shape
        check_tensor("latent_new", latent_new, shape=(B, None, C), dtype=self.latent.dtype, layout="[B, S, C]")
        S = latent_new.shape[1]
        check_tensor("k_rope_new", k_rope_new, shape=(B, S, self.k_rope.shape[2]), dtype=self.latent.dtype,
                     layout="[B, S, Dr]")
        first = self.seq_len
        if first + S > Tmax:
            raise ValueError(f"an MLA cache of {Tmax} positions cannot take {S} more after {first}")
        if input_pos.device.type != "meta" and input_pos.tolist() != list(range(first, first + S)):
            raise ValueError(f"an MLA cache appends: input_pos must be {list(range(first, first + S))}, "
                             f"got {input_pos.tolist()}")
        self.latent[:, first:first + S] = latent_new
        self.k_rope[:, first:first + S] = k_rope_new
        self.seq_len = first + S
        return self.latent[:, :self.seq_len], self.k_rope[:, :self.seq_len]


def _check_mla_config(cfg: ModelConfig) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a kvref.config.ModelConfig, got {type(cfg).__name__}")
    if not cfg.is_mla:
        raise ValueError("an MLA model needs mla_latent_dim > 0 (the latent C cached per token)")
    if cfg.mla_rope_dim < 2 or cfg.mla_rope_dim % 2:
        raise ValueError(f"mla_rope_dim must be even and >= 2 (RoPE rotates pairs), got {cfg.mla_rope_dim}")


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 attention; `absorbed` picks how scores and output are computed.

    Queries go through one q_proj, or, with `cfg.mla_q_rank` (DeepSeek's q_lora_rank), through a
    low-rank bottleneck q_a_proj -> q_a_layernorm -> q_b_proj, as the released models do.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_mla_config(cfg)
        self.cfg = cfg
        H, D, C, Dr = cfg.n_heads, cfg.head_dim, cfg.mla_latent_dim, cfg.mla_rope_dim
        if cfg.mla_q_rank:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.mla_q_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.mla_q_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.mla_q_rank, H * (D + Dr), bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, H * (D + Dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, C + Dr, bias=False)  # latent and RoPE key, together
        self.kv_a_layernorm = RMSNorm(C, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (D + D), bias=False)  # per head: W_uk (D rows), then W_uv (D rows)
        self.o_proj = nn.Linear(H * D, cfg.d_model, bias=False)

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk and W_uv, each [H, D, C]: k_nope_h = W_uk[h] c, v_h = W_uv[h] c."""
        H, D = self.cfg.n_heads, self.cfg.head_dim
        w = self.kv_b_proj.weight.view(H, 2 * D, self.cfg.mla_latent_dim)  # (H, 2D, C)
        return w[:, :D], w[:, D:]

    def score_inputs(self, x: torch.Tensor, input_pos: torch.Tensor, cache: MLACache | None = None):
        """(q_nope [B, H, S, D], q_rope [B, H, S, Dr], latent [B, T, C], k_rope [B, T, Dr], w_uk [H, D, C]) for `x` [B, S, d].

        The new tokens' latents and RoPE keys are written to `cache` first, so T counts them.
        """
        B, S, _ = x.shape
        H, D, C, Dr = self.cfg.n_heads, self.cfg.head_dim, self.cfg.mla_latent_dim, self.cfg.mla_rope_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.cfg.mla_q_rank else self.q_proj(x)
        q = q.view(B, S, H, D + Dr).transpose(1, 2)  # (B, H, S, D + Dr)
        q_nope, q_rope = q.split([D, Dr], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([C, Dr], dim=-1)  # (B, S, C), (B, S, Dr)
        latent = self.kv_a_layernorm(latent)
        cos, sin = rope_cos_sin(input_pos, Dr, self.cfg.rope_theta, dtype=x.dtype)  # (S, Dr)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, None], cos, sin)[:, 0]  # (B, S, Dr): rotated once, by its position
        if cache is not None:
            latent, k_rope = cache.update(input_pos, latent, k_rope)  # (B, T, C), (B, T, Dr)
        return q_nope, q_rope, latent, k_rope, self.up_projections()[0]

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache: MLACache | None = None,
                absorbed: bool = False) -> torch.Tensor:
        S = x.shape[1]
        q_nope, q_rope, latent, k_rope, w_uk = self.score_inputs(x, input_pos, cache)
        w_uv = self.up_projections()[1]
        scores = (mla_scores_absorbed if absorbed else mla_scores_naive)(q_nope, q_rope, latent, k_rope, w_uk)
        T = latent.shape[1]
        scores = scores.masked_fill(~causal_mask(S, T, x.device), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)  # (B, H, S, T)
        if absorbed:
            return mla_output_absorbed(probs, latent, absorb_output(w_uv, self.o_proj.weight))
        return mla_output_naive(probs, latent, w_uv, self.o_proj.weight)


class MLABlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # DeepSeekMoE: routed and shared experts (sizing only), or one dense MLP of dense_d_ff.
        self.mlp = MLP(cfg.with_(d_ff=cfg.dense_d_ff or cfg.d_ff, n_experts=0, experts_per_token=0, n_shared_experts=0,
                                 first_dense_layers=0)) if dense else MoE(cfg)

    def forward(self, x, input_pos, cache=None, absorbed=False):
        x = x + self.self_attn(self.input_layernorm(x), input_pos, cache, absorbed)
        return x + self.mlp(self.post_attention_layernorm(x))


class MLATransformer(nn.Module):
    """A decoder with MLA in every layer. `forward(ids, input_pos, caches, absorbed)` -> logits.

    With experts (DeepSeekMoE) the layers from `cfg.first_dense_layers` on hold routed and shared
    experts, built for sizing on the meta device (their forward refuses, as kvref.model.MoE's does).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_mla_config(cfg)
        if cfg.sliding_window or cfg.tie_embeddings:
            raise ValueError("kvref's MLA model has no sliding window and untied embeddings")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MLABlock(cfg, dense=not cfg.is_moe or i < cfg.first_dense_layers)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, ids, input_pos=None, caches=None, absorbed: bool = False) -> torch.Tensor:
        if input_pos is None:
            input_pos = torch.arange(ids.shape[1], device=ids.device)
        if caches is not None and len(caches) != self.cfg.n_layers:
            raise ValueError(f"need one MLA cache per layer ({self.cfg.n_layers}), got {len(caches)}")
        x = self.embed_tokens(ids)  # (B, S, d_model)
        for i, layer in enumerate(self.layers):
            x = layer(x, input_pos, None if caches is None else caches[i], absorbed)
        return self.lm_head(self.norm(x))  # (B, S, V)

    def new_caches(self, batch: int, max_seq_len: int) -> list[MLACache]:
        p = self.embed_tokens.weight
        return [MLACache(batch, max_seq_len, self.cfg.mla_latent_dim, self.cfg.mla_rope_dim, p.dtype, p.device)
                for _ in self.layers]

    def decode_step(self, ids, caches, absorbed: bool = False) -> torch.Tensor:
        """Append one token per sequence (`ids` [B, 1]) after what the caches hold; its logits [B, V]."""
        pos = torch.tensor([caches[0].seq_len], device=ids.device)
        return self(ids, pos, caches, absorbed)[:, -1]


def build_mla_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> MLATransformer:
    """An MLA model with random weights drawn from `seed` (nothing is downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    model = MLATransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def mla_cache_bytes_measured(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """`.nbytes` of one MLACache per layer holding `seq_len` positions, allocated on the meta device."""
    _check_mla_config(cfg)
    caches = [MLACache(batch, seq_len, cfg.mla_latent_dim, cfg.mla_rope_dim, dtype, device="meta")
              for _ in range(cfg.n_layers)]
    return sum(c.nbytes for c in caches)


# --- low-rank keys --------------------------------------------------------------------------


def low_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of a matrix [T, D] in Frobenius norm: its SVD truncated."""
    check_tensor("x", x, ndim=2, layout="[T, D]")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)  # (T, R), (R,), (R, D)
    r = min(rank, s.numel())
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(x.dtype)  # (T, D)


def low_rank_error(x: torch.Tensor, rank: int) -> float:
    """‖x - low_rank(x, rank)‖_F, measured on the tensors (in float64)."""
    return float(torch.linalg.norm(x.double() - low_rank(x.double(), rank)))


def synthetic_keys(n_tokens: int, head_dim: int, decay: float = 0.7, n_outliers: int = 2,
                   outlier_scale: float = 8.0, seed: int = 0) -> torch.Tensor:
    """Keys [T, D] with a decaying spectrum and a few outlier channels, as trained models' keys have.

    K = G diag(decay^i) Q with G Gaussian [T, D] and Q a random orthogonal [D, D]; then the first
    `n_outliers` channels are multiplied by `outlier_scale` (fixed channels, as KIVI saw in keys).
    """
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n_tokens, head_dim, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
    keys = (g * decay ** torch.arange(head_dim, dtype=torch.float64)) @ q  # (T, D)
    keys[:, :n_outliers] *= outlier_scale
    return keys.float()


# --- layer-selective caching ----------------------------------------------------------------


def _check_layers(cfg: ModelConfig, cached_layers: Iterable[int]) -> frozenset[int]:
    layers = frozenset(cached_layers)
    bad = [l for l in layers if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"cached_layers must be layer indices in [0, {cfg.n_layers}), got {sorted(map(repr, bad))}")
    return layers


def _project_kv(attn, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, _ = h.shape
    Hkv, D = attn.cfg.n_kv_heads, attn.cfg.head_dim
    k = attn.k_proj(h).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(h).view(B, T, Hkv, D).transpose(1, 2)
    cos, sin = rope_cos_sin(pos, D, attn.cfg.rope_theta, dtype=h.dtype)
    return apply_rope(k, cos, sin), v


def rebuild_uncached_kv(model: Transformer, past_ids: torch.Tensor,
                        cached_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K/V [B, Hkv, T, D] of every layer not in `cached_kv`, for the T past tokens, from their ids.

    The past tokens run through layers 0 .. m-1 (m the highest uncached layer): a cached layer
    reads its K/V from `cached_kv`, an uncached one projects them; then layer m projects its K/V.
    Nothing above m runs, and no lm_head. Returns {} when every layer is cached.
    """
    cfg = model.cfg
    uncached = [l for l in range(cfg.n_layers) if l not in cached_kv]
    if not uncached:
        return {}
    B, T = past_ids.shape
    pos = torch.arange(T, device=past_ids.device)
    rebuilt = {}
    x = model.embed_tokens(past_ids)  # (B, T, d_model)
    for l in range(max(uncached) + 1):
        layer = model.layers[l]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if l in cached_kv:
            k, v = cached_kv[l]
        else:
            k, v = rebuilt[l] = _project_kv(attn, h, pos)
        if l == max(uncached):
            break
        H, D = cfg.n_heads, cfg.head_dim
        q = attn.q_proj(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        cos, sin = rope_cos_sin(pos, D, cfg.rope_theta, dtype=h.dtype)
        y = attention(apply_rope(q, cos, sin), k, v)  # (B, H, T, D)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return rebuilt


def new_selective_caches(model: Transformer, cached_layers: Iterable[int]) -> list[GrowingKVCache | None]:
    """A growing cache for each layer in `cached_layers`, None for the others."""
    layers = _check_layers(model.cfg, cached_layers)
    return [GrowingKVCache() if l in layers else None for l in range(model.cfg.n_layers)]


def _filled(k: torch.Tensor, v: torch.Tensor) -> GrowingKVCache:
    cache = GrowingKVCache()
    cache.update(torch.arange(k.shape[2], device=k.device), k, v)
    return cache


@torch.no_grad()
def selective_decode_step(model: Transformer, ids: torch.Tensor, caches: list[GrowingKVCache | None]) -> torch.Tensor:
    """Logits [B, V] of the last token of `ids` [B, T + 1]; the cached layers' caches hold positions 0 .. T-1.

    The uncached layers' K/V for the T past tokens are rebuilt (`rebuild_uncached_kv`), used for
    this step and dropped; the cached layers' caches grow by one position. With T = 0 (the first
    token) there is nothing to rebuild. To fill the caches from a prompt, call this once per token.
    """
    T = ids.shape[1] - 1
    cached = {l: (c.k, c.v) for l, c in enumerate(caches) if c is not None and c.k is not None}
    if any(c is not None and c.seq_len != T for c in caches):
        raise ValueError(f"every cached layer must hold the {T} past positions")
    rebuilt = rebuild_uncached_kv(model, ids[:, :-1], cached) if T else {}
    step = [c if c is not None else (_filled(*rebuilt[l]) if T else GrowingKVCache()) for l, c in enumerate(caches)]
    return model(ids[:, -1:], torch.tensor([T], device=ids.device), step)[:, -1]


def selective_recompute_flops_measured(cfg: ModelConfig, cached_layers: Iterable[int], n_past: int) -> int:
    """FLOPs (FlopCounterMode) of `rebuild_uncached_kv` for one sequence of `n_past` tokens, on the meta device."""
    layers = _check_layers(cfg, cached_layers)
    if not isinstance(n_past, int) or isinstance(n_past, bool) or n_past < 1:
        raise ValueError(f"n_past must be an int >= 1, got {n_past!r}")
    model = meta_model(cfg)
    ids = torch.zeros(1, n_past, dtype=torch.long, device="meta")
    kv = torch.empty(1, cfg.n_kv_heads, n_past, cfg.head_dim, dtype=torch.bfloat16, device="meta")  # (1, Hkv, T, D)
    return flops_of(rebuild_uncached_kv, model, ids, {l: (kv, kv) for l in layers}).total
