"""A small Llama-style decoder: RMSNorm, RoPE (half-split), SwiGLU, grouped KV heads.

A config may also ask for a GPT-style MLP (`mlp="gelu"`: up, GELU, down), tied input and
output embeddings, a mixture of experts (built for sizing on the meta device: its weights are
real, its forward refuses) and a sliding window (the model refuses a sequence longer than the
window rather than attend past it).

Module names follow Hugging Face's LlamaForCausalLM (`q_proj`, `k_proj`, ...) so that its
weights can be copied across and the two compared. The same `forward` runs with or without
a cache: without one, every position is computed from scratch; with one (a list holding a
cache per layer), each layer stores its new K/V at `input_pos` and each query reads the slots
the cache returns up to its own position (a mask built from `input_pos`: a static cache
returns its whole buffers, slots not yet written included).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kvref.attention import attention
from kvref.cache import GrowingKVCache, StaticKVCache
from kvref.config import ModelConfig
from kvref.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * D, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        cos, sin = rope_cos_sin(input_pos, D, self.cfg.rope_theta, dtype=x.dtype)  # (S, D)
        # Keys are rotated once, by their absolute position, before they are cached.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # (B, Hkv, T, D): T cached positions (a growing cache) or max_seq_len slots (a static
            # cache's whole buffers); either way slot j holds position j, and the mask built from
            # input_pos lets each query read the slots up to its own position only.
            k, v = cache.update(input_pos, k, v)
        W = self.cfg.sliding_window
        if W and k.shape[2] > W:  # from the shape alone: a static cache longer than the window is refused too
            what = "cache slots" if isinstance(cache, StaticKVCache) else "positions"
            raise ValueError(f"kvref's attention has no sliding window: {k.shape[2]} {what} exceed this model's "
                             f"window of {W} (kvref.roofline costs a windowed model past it)")
        y = attention(q, k, v, None if cache is None else input_pos)  # (B, H, S, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, H * D))


class MLP(nn.Module):
    """SwiGLU (Llama: down(silu(gate(x)) · up(x))) or GELU (GPT-2/3: down(gelu(up(x))))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class MoE(nn.Module):
    """A router and `n_experts` MLPs (Mixtral's names), for sizing only: every weight, no forward.

    Which expert a token goes to depends on values, which the meta device does not have, so a
    routed forward could not be measured there; kvref.roofline costs MoE steps in closed form.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        if cfg.n_shared_experts:  # DeepSeekMoE: experts every token goes through, as one MLP of their summed width
            self.shared_experts = MLP(cfg.with_(d_ff=cfg.n_shared_experts * cfg.d_ff))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("kvref builds mixture-of-experts layers for sizing only (weights, bytes): "
                         "it has no routed forward")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe else MLP(cfg)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), input_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only language model. `forward(ids, input_pos, caches)` returns logits `[B, S, V]`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.is_mla:
            raise ValueError("kvref.model.Transformer implements GQA/MHA attention; MLA configs are for sizing only")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one matrix, stored once

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor | None = None, caches=None) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be an integer tensor [B, S], got {_describe(ids)}")
        S = ids.shape[1]
        if input_pos is None:
            if caches is not None:
                raise ValueError("with caches, pass input_pos: the absolute positions of the new tokens")
            input_pos = torch.arange(S, device=ids.device)
        if caches is not None and len(caches) != self.cfg.n_layers:
            raise ValueError(f"need one cache per layer ({self.cfg.n_layers}), got {len(caches)}")
        x = self.embed_tokens(ids)  # (B, S, d_model)
        for i, layer in enumerate(self.layers):
            x = layer(x, input_pos, None if caches is None else caches[i])
        return self.lm_head(self.norm(x))  # (B, S, V)

    def new_caches(self, kind: str = "growing", batch: int = 1, max_seq_len: int | None = None):
        """One empty cache per layer."""
        if kind == "growing":
            return [GrowingKVCache() for _ in self.layers]
        if kind == "static":
            p = self.embed_tokens.weight
            T = max_seq_len or self.cfg.max_seq_len
            return [StaticKVCache(batch, self.cfg.n_kv_heads, T, self.cfg.head_dim, p.dtype, p.device)
                    for _ in self.layers]
        raise ValueError(f"cache kind must be 'growing' or 'static', got {kind!r}")

    def prefill(self, ids: torch.Tensor, caches) -> torch.Tensor:
        """Write K/V for the whole prompt; return the last position's logits `[B, V]`."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self(ids, pos, caches)[:, -1]

    def decode_step(self, ids: torch.Tensor, caches) -> torch.Tensor:
        """Append one token per sequence (`ids` is `[B, 1]`); return its logits `[B, V]`."""
        if ids.ndim != 2 or ids.shape[1] != 1:
            raise ValueError(f"decode_step takes one new token per sequence, ids [B, 1]; got {_describe(ids)}")
        pos = torch.tensor([caches[0].seq_len], device=ids.device)  # the next position: T cached -> T
        return self(ids, pos, caches)[:, -1]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                 cache: str = "growing") -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding. Returns (ids `[B, P + N]`, logits `[B, N, V]` of each chosen token)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids, steps = prompt, []
        if use_cache:
            caches = self.new_caches(cache, prompt.shape[0], prompt.shape[1] + max_new_tokens)
            logits = self.prefill(prompt, caches)
        else:
            logits = self(prompt)[:, -1]
        for n in range(max_new_tokens):
            steps.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            if n == max_new_tokens - 1:
                break
            # Without a cache, every step recomputes K/V for the whole sequence so far.
            logits = self.decode_step(ids[:, -1:], caches) if use_cache else self(ids)[:, -1]
        return ids, torch.stack(steps, dim=1)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


@dataclass
class KVRowCount:
    """K and V projection rows computed (one row = one token's K, or V, in one layer)."""
    k_rows: int = 0
    v_rows: int = 0

    @property
    def total(self) -> int:
        return self.k_rows + self.v_rows


@contextmanager
def count_kv_rows(model: Transformer):
    """Count, with forward hooks, the rows the K and V projections compute inside the block."""
    count = KVRowCount()

    def hook(name):
        def on_forward(module, inputs, output):
            rows = output.numel() // output.shape[-1]  # B * S tokens projected
            setattr(count, name, getattr(count, name) + rows)
        return on_forward

    handles = []
    for layer in model.layers:
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook("k_rows")))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook("v_rows")))
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def build_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A model with random weights drawn from `seed` (nothing is downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))  # norm gains near 1
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()
