"""Measuring instruments: what a real run computes and what a real cache occupies.

The katas' closed forms (rows, FLOPs, bytes) are checked against these measurements, never
against a second copy of a formula:

- K/V projection rows, counted by forward hooks during a real generation
  (`kv_rows_of_generation`, `kv_rows_per_forward`);
- FLOPs, counted as PyTorch's `FlopCounterMode` counts them (its formulas, applied by
  `kvref.opcount.MatmulFlops`) on a real forward pass (`flops_of`,
  `generation_flops_measured`, `forward_flops_measured`, and `kv_recompute_flops_measured`:
  exactly the part of a forward pass that rebuilds every layer's K and V), split into the projections
  (`aten.mm`/`aten.addmm`: every `nn.Linear`, lm_head included) and the attention matmuls
  (`aten.bmm`: `q @ kᵀ` and `softmax @ v`, and SDPA kernels where a model uses them);
- bytes, from `.nbytes` of allocated tensors (`cache_nbytes`, `kv_bytes_per_token_measured`,
  `kv_cache_bytes_measured`, `weight_bytes_read`, `weight_nbytes`).

Real presets (70B parameters) are measured on PyTorch's `meta` device: tensors with shapes,
dtypes and `.nbytes` but no storage, so a Llama-2-70B forward pass costs no memory and
the FLOP counter still sees every matmul's shape. kvref's model runs unchanged there.

FlopCounterMode counts 2 FLOPs per multiply-add of matmul-like ops only: norms, RoPE,
softmax, SiLU and the embedding lookup count zero. It counts what runs, so kvref's attention,
which computes every score of the `[S, T]` rectangle and masks the future ones afterwards,
is counted in full (a fused causal kernel would skip the masked ones). One gap: on the CPU,
`F.scaled_dot_product_attention` runs a fused kernel FlopCounterMode does not know and counts
as 0 FLOPs (torch 2.13); on the meta device it decomposes into matmuls and is counted. Count
models that use SDPA on the meta device (`step_flops_measured` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kvref.cache import StaticKVCache
from kvref.config import ModelConfig
from kvref.model import KVRowCount, Transformer, build_model, count_kv_rows
from kvref.opcount import MatmulFlops

PROJECTION_OPS = ("aten.mm", "aten.addmm")
ATTENTION_OPS = ("aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_efficient_attention",
                 "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_cudnn_attention",
                 "aten._flash_attention_forward", "aten._efficient_attention_forward")


# --- K/V projection rows --------------------------------------------------------------------

def kv_rows_of_generation(model: Transformer, prompt: torch.Tensor, n_new: int,
                          use_cache: bool = True, cache: str = "growing") -> KVRowCount:
    """Rows the K and V projections compute while `model.generate` makes `n_new` tokens.

    One row is one token's K (or V) in one layer, so the totals are summed over layers and
    over the batch. `generate` runs n_new forward passes: the prompt, then one pass per new
    token except the last (the last chosen token is never fed back).
    """
    _check_generation(model, prompt, n_new)
    with count_kv_rows(model) as count:
        model.generate(prompt, n_new, use_cache=use_cache, cache=cache)
    return count


def kv_rows_per_forward(model: Transformer, prompt: torch.Tensor, n_new: int,
                        use_cache: bool = True) -> list[KVRowCount]:
    """The same rows, one entry per forward pass of the generation (entry 0 is the prompt's)."""
    _check_generation(model, prompt, n_new)
    steps: list[KVRowCount] = []
    with count_kv_rows(model) as count:
        def after_forward(module, inputs, output):
            done = KVRowCount(sum(s.k_rows for s in steps), sum(s.v_rows for s in steps))
            steps.append(KVRowCount(count.k_rows - done.k_rows, count.v_rows - done.v_rows))

        handle = model.register_forward_hook(after_forward)
        try:
            model.generate(prompt, n_new, use_cache=use_cache)
        finally:
            handle.remove()
    return steps


# --- FLOPs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlopCount:
    """FLOPs counted as FlopCounterMode counts them, in total and per aten op (2 FLOPs per multiply-add)."""
    total: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def projections(self) -> int:
        """Every nn.Linear: q/k/v/o projections, the MLP and lm_head."""
        return sum(self.by_op.get(op, 0) for op in PROJECTION_OPS)

    @property
    def attention(self) -> int:
        """The attention matmuls: scores q @ kᵀ and the weighted sum softmax @ v."""
        return sum(self.by_op.get(op, 0) for op in ATTENTION_OPS)


def flops_of(fn: Callable, *args, **kwargs) -> FlopCount:
    """Run `fn(*args, **kwargs)` (no grad) and return the FLOPs FlopCounterMode would count.

    Counted by `kvref.opcount.MatmulFlops`: PyTorch's FLOP formulas, applied as FlopCounterMode
    applies them, without the torch._dynamo import (over a second on a CPU) FlopCounterMode's
    first use costs.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    counter = MatmulFlops()
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return FlopCount(counter.total, dict(counter.by_op))


def forward_flops_measured(model: Transformer, ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                           caches=None) -> FlopCount:
    """FLOPs of one forward pass `model(ids, input_pos, caches)`."""
    return flops_of(model, ids, input_pos, caches)


def generation_flops_measured(model: Transformer, prompt: torch.Tensor, n_new: int,
                              use_cache: bool = True) -> FlopCount:
    """FLOPs of `model.generate(prompt, n_new, use_cache)`: every forward pass it runs."""
    _check_generation(model, prompt, n_new)
    return flops_of(model.generate, prompt, n_new, use_cache=use_cache)


class ShapeOnlyCache:
    """A stand-in cache that claims `seq_len` cached positions and returns uninitialised K/V.

    For counting FLOPs on the meta device, where a real cache cannot check positions (meta
    tensors have no values). `update` returns `[B, Hkv, seq_len + S, D]` and advances.
    """

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        B, Hkv, S, D = k_new.shape
        self.seq_len += S
        return k_new.new_empty(B, Hkv, self.seq_len, D), v_new.new_empty(B, Hkv, self.seq_len, D)


class _NoRandomFillOnMeta(TorchFunctionMode):
    """Skips `normal_` on meta tensors, which hold no values to fill.

    On the meta device `normal_` runs a Python decomposition whose first call imports torch._dynamo
    (over a second on a CPU): nn.Embedding's initialisation would cost every card that sizes a real model on
    the meta device that much. Skipping it changes nothing: a meta tensor has no values, and the
    meta `normal_` draws nothing from the CPU generator.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.normal_ or func is nn.init.normal_:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """kvref's model for `cfg` on the meta device: real shapes and dtypes, no storage, no values."""
    with torch.device("meta"), _NoRandomFillOnMeta():
        return Transformer(cfg).to(dtype).eval()


def kv_recompute_flops_measured(cfg: ModelConfig, n_tokens: int, device: str = "meta") -> FlopCount:
    """FLOPs of rebuilding every layer's K and V for `n_tokens` tokens of one sequence, from their ids.

    Layer l's K/V need layer l's input, which every layer below computes: so the tokens run
    through the embedding and every layer but the last in full, then through the last layer's
    input norm and its K and V projections. The last layer's q/o projections and MLP, the final
    norm and lm_head are not run. Counted on the meta device (dense models: MoE has no forward),
    or with `device="cpu"` on kvref's model run for real, for small configs (as `step_flops_measured`).
    """
    _check_config(cfg)
    _check_counts(n_tokens=n_tokens)
    _check_device(device)
    return _copied(_kv_recompute_flops(cfg, n_tokens, device))


# Cached apart from the public functions: a call to a public one always runs a line of kvref, which
# is how kvkata's formula guard sees a formula kata measuring (a cache hit runs no Python code).
@lru_cache(maxsize=64)
def _kv_recompute_flops(cfg: ModelConfig, n_tokens: int, device: str) -> FlopCount:
    model = meta_model(cfg) if device == "meta" else build_model(cfg)
    ids = torch.zeros(1, n_tokens, dtype=torch.long, device=device)
    pos = torch.arange(n_tokens, device=device)

    def rebuild():
        x = model.embed_tokens(ids)  # (1, n_tokens, d_model)
        for layer in model.layers[:-1]:
            x = layer(x, pos)
        last = model.layers[-1]
        h = last.input_layernorm(x)
        last.self_attn.k_proj(h), last.self_attn.v_proj(h)

    return flops_of(rebuild)


def step_flops_measured(cfg: ModelConfig, batch: int, n_new: int, n_cached: int, device: str = "meta") -> FlopCount:
    """FLOPs of one forward pass of `n_new` tokens per sequence after `n_cached` cached ones.

    `n_cached = 0` is a prefill (or an uncached step over the whole sequence), `n_new = 1` a
    cached decode step. On the meta device (the default) it works for real presets: a shape-only
    cache stands for the cached positions. `device="cpu"` runs kvref's model for real, random
    weights and a filled cache, for small configs: the same count (checks/test_kvref_measure.py),
    without the torch._dynamo import (over a second on a CPU) that PyTorch's meta kernels cost on
    their first use.
    """
    _check_config(cfg)
    _check_counts(batch=batch, n_new=n_new)
    if not isinstance(n_cached, int) or isinstance(n_cached, bool) or n_cached < 0:
        raise ValueError(f"n_cached must be an int >= 0, got {n_cached!r}")
    _check_device(device)
    return _copied(_step_flops(cfg, batch, n_new, n_cached, device))


@lru_cache(maxsize=256)
def _step_flops(cfg: ModelConfig, batch: int, n_new: int, n_cached: int, device: str) -> FlopCount:
    if device == "meta":
        model = meta_model(cfg)
        ids = torch.zeros(batch, n_new, dtype=torch.long, device="meta")
        caches = [ShapeOnlyCache(n_cached) for _ in range(cfg.n_layers)] if n_cached else None
    else:
        model = build_model(cfg)
        ids = torch.zeros(batch, n_new, dtype=torch.long)
        caches = model.new_caches("growing") if n_cached else None
        if n_cached:
            with torch.no_grad():
                model(torch.zeros(batch, n_cached, dtype=torch.long), torch.arange(n_cached), caches)
    pos = torch.arange(n_cached, n_cached + n_new, device=device)
    return flops_of(model, ids, pos, caches)


# --- bytes --------------------------------------------------------------------------------

def cache_nbytes(caches) -> int:
    """Bytes held by a model's caches: `.nbytes` of K and V summed over every layer.

    A static cache counts its whole preallocation (`max_seq_len` positions), a growing cache
    what it holds.
    """
    total = 0
    for layer, c in enumerate(caches):
        for name in ("k", "v"):
            t = getattr(c, name, None)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"caches[{layer}].{name} must be a tensor or None, got {type(t).__name__}")
            total += t.nbytes
    return total


def kv_cache_bytes_measured(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of a cache holding `seq_len` positions for `batch` sequences in every layer.

    Allocated on the meta device as kvref's StaticKVCache, one per layer, and measured by
    `.nbytes`: nothing is stored, so real presets at long contexts cost nothing to measure.
    """
    _check_counts(batch=batch, seq_len=seq_len)
    if cfg.is_mla:
        raise ValueError("kvref has no MLA cache to allocate: MLA caches a latent per token (card14)")
    caches = [StaticKVCache(batch, cfg.n_kv_heads, seq_len, cfg.head_dim, dtype, device="meta")
              for _ in range(cfg.n_layers)]
    return cache_nbytes(caches)


def kv_bytes_per_token_measured(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one more token adds to the cache: a one-position, one-sequence cache, measured."""
    return kv_cache_bytes_measured(cfg, 1, 1, dtype)


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of every weight matrix a forward pass multiplies by (each nn.Linear's weight).

    The embedding table is only indexed (one row per token) and the norm gains are vectors,
    so neither is counted: this is what a dense model's decode step must stream from memory
    (a tied lm_head is the embedding matrix: counted once, as lm_head). For a mixture of
    experts it is every expert's weights, more than a step reads (kvref.roofline).
    """
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.nbytes
    return total


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter a model stores (a tied matrix once): what must fit in memory."""
    return sum(p.nbytes for p in model.parameters())  # parameters() yields a shared one once


# --- argument checks ----------------------------------------------------------------------

def _check_counts(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_config(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a kvref.config.ModelConfig, got {type(cfg).__name__}")


def _check_device(device) -> None:
    if device not in ("meta", "cpu"):
        raise ValueError(f"device must be 'meta' or 'cpu', got {device!r}")


def _copied(count: FlopCount) -> FlopCount:
    """A cached count's own copy: its by_op dict is mutable, and the cache must not change."""
    return FlopCount(count.total, dict(count.by_op))


def _check_generation(model, prompt, n_new) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a kvref.model.Transformer, got {type(model).__name__}")
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 2:
        raise ValueError(f"prompt must be an integer tensor [B, P], got {prompt!r:.60}")
    if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    _check_counts(n_new=n_new)
