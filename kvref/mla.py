"""Spoiler for card14: multi-head latent attention, naive and absorbed, and its latent cache (read it after you pass).

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

Folding W_uv into W_o is correct algebra but not how engines serve MLA: FlashMLA and vLLM absorb
W_uk into the query and apply W_uv to the latent context separately, then W_o. The folded
`absorb_output` holds H·d_model·C weights: 469.8M per DeepSeek-V3 layer (H 128, d_model 7168,
C 512) against 117.4M for W_o plus 8.4M for W_uv, about 3.7x the weight bytes a decode step reads.

Weight names follow Hugging Face's DeepseekV3 (`q_a_proj`, `q_a_layernorm`, `q_b_proj`,
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`); queries go through the q_lora_rank
bottleneck when `cfg.mla_q_rank` is set (both presets: 1536) and through one `q_proj` otherwise.
`head_dim` D is both qk_nope_head_dim and v_head_dim. Where kvref differs from the released
checkpoints: it rotates the RoPE dims half-split, with plain RoPE, and scales scores by
1/sqrt(D + Dr). DeepSeek-V2/V3's checkpoints store the RoPE dims interleaved (their
modeling_deepseek.py reorders q_pe and k_pe with a view/transpose before `rotate_half`;
transformers' DeepseekV3Config defaults to rope_interleave=True), and they extend the context with
YaRN, whose mscale multiplies the softmax scale. kvref's weights copy across to transformers'
DeepseekV3 with rope_interleave=False and no rope scaling (checks/test_kvref_compress.py, which
compares them with q_lora_rank None).

The other two ways card14 stores less: kvref/low_rank.py and kvref/layer_selective.py.

Shapes: B batch, H heads, S new tokens, T cached positions, D head dim, Dr RoPE dim, C latent dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvref.attention import causal_mask
from kvref.config import ModelConfig
from kvref.model import MLP, MoE, RMSNorm
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
