"""Spoiler for card04: quantized K/V, their bytes, INT4 packing and the errors along each axis (read it after you pass).

A quantized KV cache stores each K and V element as a `bits`-wide integer code plus, for each
group of elements, a scale (and, when asymmetric, a zero point) in `scale_dtype`.

Conventions (KIVI's, Liu et al. 2024, arXiv 2402.02750, §3):
- asymmetric: a group with minimum m and maximum M has zero point z = m and scale
  s = (M - m) / (2^bits - 1); the code is q = round((x - z) / s), in 0 .. 2^bits - 1, and
  x is read back as q·s + z.
- symmetric: s = max|x| / (2^(bits-1) - 1); q = round(x / s), in -(2^(bits-1) - 1) ..
  2^(bits-1) - 1 (INT4: -7 .. 7, INT8: -127 .. 127, the restricted range: -8 would have no
  positive twin); x is read back as q·s. Stored as q + 2^(bits-1) - 1, unsigned (0 .. 2^bits - 2).
Either way, with s and z kept in fp32 (`quantize` then `dequantize`, `fake_quantize`),
|x - deq(q(x))| <= s / 2: rounding moves a value by at most half a step, and the range never
clips (checked with hypothesis in checks/test_kvref_kv_quant.py). A stored block (`store`,
`load`, `QuantizedKVCache`) keeps s and z in `scale_dtype` (fp16 by default) while its codes were
rounded against the fp32 ones, so it reads back within s / 2 + |q|·|s - ŝ| + |z - ẑ|, ŝ and ẑ
the stored values (fp16: |z - ẑ| up to |z|·2^-11). For a group far from zero, such as a KIVI
outlier channel quantized per channel, |z - ẑ| can exceed s / 2 (also checked there).
A group whose elements are all equal has s = 0: kvref stores s = 0 and reads back z (asymmetric) or 0.

Axes, on `[B, Hkv, T, D]`:
- "token": a group is `group_size` consecutive channels of one token (group_size = D: one scale
  per token per head). Scales `[B, Hkv, T, D // g, 1]`.
- "channel": a group is `group_size` consecutive tokens of one channel. Scales
  `[B, Hkv, T // g, 1, D]`. KIVI quantizes K this way (its outlier channels are fixed, so a
  channel's range is narrow) and V per token (§3.2).

Codes narrower than a byte are packed along the last axis, 8 // bits codes to a byte, the first
code in the lowest bits (INT4: element 2i in the low nibble, 2i + 1 in the high nibble).

`QuantizedKVCache` plugs into kvref.model (`update(input_pos, k, v)`, `seq_len`). It keeps the
newest `residual` tokens in full precision (KIVI's residual window) and quantizes older ones a
group at a time; `nbytes()` counts codes, scales, zero points and the residual window.

The experiment on a trained encoder's real keys (MiniLM) is bench/minilm_keys.py and bench/kv_quant_axes.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvref.config import ModelConfig
from kvref.validate import check_tensor

AXES = ("token", "channel")
LAYOUT = "[B, Hkv, T, D]"


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 8                # 8, 4 or 2 bits per code
    axis: str = "token"          # "token": groups along D; "channel": groups along T
    group_size: int = 0          # elements per group along that axis (0: the whole axis)
    asymmetric: bool = True      # a zero point per group (KIVI) or symmetric around 0
    scale_dtype: torch.dtype = torch.float16  # what scales and zero points are stored in

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 8, 4 or 2, got {self.bits!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 0:
            raise ValueError(f"group_size must be an int >= 0 (0: the whole axis), got {self.group_size!r}")


def qrange(bits: int, asymmetric: bool) -> tuple[int, int]:
    """The codes' range: 0 .. 2^bits - 1 asymmetric, -(2^(bits-1) - 1) .. 2^(bits-1) - 1 symmetric."""
    if asymmetric:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def _grouped(x: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """View `[B, Hkv, T, D]` with the grouped axis split: token -> (.., T, D/g, g), channel -> (.., T/g, g, D)."""
    B, H, T, D = x.shape
    n = D if axis == "token" else T
    g = group_size or n
    if n % g != 0:
        raise ValueError(f"group_size {g} must divide the {'head dim' if axis == 'token' else 'token count'} ({n})")
    if axis == "token":
        return x.reshape(B, H, T, D // g, g)  # reduce over the last dim
    return x.reshape(B, H, T // g, g, D)  # reduce over dim -2


def quantize(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes (int16, unpacked, same shape as x), scales and zero points (None if symmetric).

    Scales and zero points come back grouped (see the module docstring), in fp32: storage
    rounds them to `scheme.scale_dtype` (see `QuantizedKVCache`).
    """
    check_tensor("x", x, ndim=4, layout=LAYOUT)
    xg = _grouped(x.float(), scheme.axis, scheme.group_size)
    dim = -1 if scheme.axis == "token" else -2
    lo, hi = qrange(scheme.bits, scheme.asymmetric)
    if scheme.asymmetric:
        zero = xg.amin(dim, keepdim=True)
        scale = (xg.amax(dim, keepdim=True) - zero) / hi
        q = torch.round((xg - zero) / _nonzero(scale))
    else:
        zero = None
        scale = xg.abs().amax(dim, keepdim=True) / hi
        q = torch.round(xg / _nonzero(scale))
    q = q.clamp(lo, hi).to(torch.int16).reshape(x.shape)
    return q, scale, zero


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # A constant group has scale 0: divide by 1 instead, its codes are then all 0 (x - z = 0, or x = 0).
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = q·s + z (asymmetric) or q·s (symmetric), `[B, Hkv, T, D]` in `dtype`."""
    qg = _grouped(q.float(), scheme.axis, scheme.group_size)
    x = qg * scale.float()
    if zero is not None:
        x = x + zero.float()
    return x.reshape(q.shape).to(dtype)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (0 .. 2^bits - 1) along the last axis, 8 // bits to a byte, first code lowest."""
    per = 8 // bits
    if codes.shape[-1] % per != 0:
        raise ValueError(f"the last axis ({codes.shape[-1]}) must be a multiple of {per} to pack {bits}-bit codes")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    packed = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        packed = packed | (c[..., i] << (bits * i))
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 codes, the last axis 8 // bits times longer."""
    per, mask = 8 // bits, 2**bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


@dataclass
class QuantizedBlock:
    """One stored chunk of tokens: packed codes, scales and zero points in their storage dtypes."""
    codes: torch.Tensor          # uint8 [B, Hkv, t, D * bits / 8]
    scale: torch.Tensor          # scale_dtype, grouped
    zero: torch.Tensor | None    # scale_dtype, grouped (asymmetric only)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]


def store(x: torch.Tensor, scheme: QuantScheme) -> QuantizedBlock:
    """Quantize and pack `[B, Hkv, t, D]` for storage (scales rounded to scheme.scale_dtype)."""
    q, scale, zero = quantize(x, scheme)
    lo, _ = qrange(scheme.bits, scheme.asymmetric)
    codes = pack_bits(q - lo, scheme.bits)  # symmetric codes stored offset by 2^(bits-1) - 1: all unsigned
    return QuantizedBlock(codes, scale.to(scheme.scale_dtype),
                          None if zero is None else zero.to(scheme.scale_dtype))


def load(block: QuantizedBlock, scheme: QuantScheme, dtype: torch.dtype) -> torch.Tensor:
    """Unpack and dequantize a stored block to `[B, Hkv, t, D]` in `dtype`."""
    lo, _ = qrange(scheme.bits, scheme.asymmetric)
    q = unpack_bits(block.codes, scheme.bits).to(torch.int16) + lo
    return dequantize(q, block.scale, block.zero, scheme, dtype)


class QuantizedKVCache:
    """A growing KV cache that stores K and V quantized, with a full-precision residual window.

    The newest tokens stay in full precision; once more than `residual` are waiting, the oldest
    are quantized a chunk at a time: one token for a per-token scheme, `group_size` tokens for a
    per-channel one (a channel's group spans that many tokens, so it waits until they exist).
    `update` returns every position dequantized, `[B, Hkv, T, D]`, in the input's dtype.
    """

    def __init__(self, k_scheme: QuantScheme, v_scheme: QuantScheme | None = None, residual: int = 0) -> None:
        self.k_scheme, self.v_scheme = k_scheme, v_scheme or k_scheme
        for s in (self.k_scheme, self.v_scheme):
            if s.axis == "channel" and s.group_size < 1:
                raise ValueError("a per-channel scheme in a growing cache needs group_size >= 1 tokens per group")
        if not isinstance(residual, int) or residual < 0:
            raise ValueError(f"residual must be an int >= 0, got {residual!r}")
        self.residual = residual
        self.k_blocks: list[QuantizedBlock] = []
        self.v_blocks: list[QuantizedBlock] = []
        self.k_recent: torch.Tensor | None = None  # (B, Hkv, r, D) full precision
        self.v_recent: torch.Tensor | None = None
        self._k_old: torch.Tensor | None = None  # dequantized quantized part, kept to avoid re-reading
        self._v_old: torch.Tensor | None = None
        self.seq_len = 0

    def _chunk(self, scheme: QuantScheme) -> int:
        return scheme.group_size if scheme.axis == "channel" else 1

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        check_tensor("k_new", k_new, ndim=4, layout=LAYOUT)
        check_tensor("v_new", v_new, shape=tuple(k_new.shape), dtype=k_new.dtype, layout=LAYOUT)
        expected = torch.arange(self.seq_len, self.seq_len + k_new.shape[2], device=input_pos.device)
        if input_pos.shape != expected.shape or not torch.equal(input_pos.to(expected.dtype), expected):
            raise ValueError(f"a quantized cache appends: input_pos must be {expected.tolist()}, got {input_pos.tolist()}")
        self.k_recent = k_new if self.k_recent is None else torch.cat([self.k_recent, k_new], dim=2)
        self.v_recent = v_new if self.v_recent is None else torch.cat([self.v_recent, v_new], dim=2)
        self.seq_len += k_new.shape[2]
        self.k_recent, self._k_old = self._flush(self.k_recent, self.k_blocks, self._k_old, self.k_scheme)
        self.v_recent, self._v_old = self._flush(self.v_recent, self.v_blocks, self._v_old, self.v_scheme)
        k = self.k_recent if self._k_old is None else torch.cat([self._k_old, self.k_recent], dim=2)
        v = self.v_recent if self._v_old is None else torch.cat([self._v_old, self.v_recent], dim=2)
        return k, v  # (B, Hkv, T, D)

    def _flush(self, recent, blocks, old, scheme):
        chunk = self._chunk(scheme)
        n = (recent.shape[2] - self.residual) // chunk * chunk  # whole chunks beyond the residual window
        if n <= 0:
            return recent, old
        block = store(recent[:, :, :n], scheme)
        blocks.append(block)
        deq = load(block, scheme, recent.dtype)
        old = deq if old is None else torch.cat([old, deq], dim=2)
        return recent[:, :, n:], old

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache stores: codes, scales, zero points, the residual window."""
        out = [t for b in self.k_blocks + self.v_blocks for t in b.tensors()]
        return out + [t for t in (self.k_recent, self.v_recent) if t is not None and t.shape[2] > 0]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


def quantized_cache_nbytes(cfg: ModelConfig, batch: int, seq_len: int, scheme: QuantScheme,
                           residual: int = 0, dtype: torch.dtype = torch.float16) -> int:
    """`.nbytes` of a filled QuantizedKVCache per layer, summed over layers (real shapes on the meta device: no storage).

    Every layer's cache receives `seq_len` positions of K and V of shape `[batch, Hkv, T, D]`.
    Not for MLA models: they cache one latent and a shared RoPE key per token, not K and V per head.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a kvref.config.ModelConfig, got {type(cfg).__name__}")
    if cfg.is_mla:
        raise ValueError(f"{cfg.name or 'this config'} uses MLA: its cache holds a latent of {cfg.mla_latent_dim} and a "
                         "RoPE key per token, not K and V per KV head, so quantized_cache_nbytes does not apply")
    shape = (batch, cfg.n_kv_heads, seq_len, cfg.head_dim)
    # Small caches are filled for real on the CPU (faster than meta's Python kernels); big ones on meta.
    device = "cpu" if math.prod(shape) <= 1 << 16 else "meta"
    k = torch.zeros(shape, dtype=dtype, device=device)
    cache = QuantizedKVCache(scheme, residual=residual)
    cache.update(torch.arange(seq_len), k, k)  # positions on the CPU: torch.equal has no meta kernel
    return cfg.n_layers * cache.nbytes()


# --- keys to quantize, and the errors that matter -------------------------------------------------

def outlier_channel_keys(shape: tuple[int, int, int, int], n_outliers: int = 2, offset: float = 10.0,
                         seed: int = 0) -> torch.Tensor:
    """Keys `[B, Hkv, T, D]` whose `n_outliers` channels per head sit far from zero, as real LLM keys do.

    Statistics: every element is N(0, 1); in each head, `n_outliers` channels (drawn once, the
    same for every token) add a fixed offset of ±`offset` (sign drawn per channel). So an
    outlier channel's values lie near ±offset for every token (its range across tokens is that
    of N(0, 1)), while each token's range across channels spans about 2·offset.
    """
    B, H, T, D = shape
    if not 0 <= n_outliers <= D:
        raise ValueError(f"n_outliers must be in [0, {D}], got {n_outliers}")
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=gen)
    for h in range(H):
        channels = torch.randperm(D, generator=gen)[:n_outliers]
        signs = torch.randint(0, 2, (n_outliers,), generator=gen) * 2 - 1
        k[:, h, :, channels] += offset * signs.float()
    return k


def outlier_token_keys(shape: tuple[int, int, int, int], n_outliers: int = 2, gain: float = 10.0,
                       seed: int = 0) -> torch.Tensor:
    """Keys `[B, Hkv, T, D]` where `n_outliers` tokens are `gain` times larger in every channel.

    Statistics: every element is N(0, 1); the chosen tokens (the same in every head) are
    multiplied by `gain`. The mirror image of `outlier_channel_keys`: here a token's range is
    narrow relative to itself and a channel's range is set by the loud tokens.
    """
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=gen)
    tokens = torch.randperm(T, generator=gen)[:n_outliers]
    k[:, :, tokens] *= gain
    return k


def fake_quantize(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """deq(q(x)) in x's dtype, scales kept in fp32 (the error of the codes alone)."""
    q, scale, zero = quantize(x, scheme)
    return dequantize(q, scale, zero, scheme, x.dtype)


def score_rms_error(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> float:
    """RMS over every score of q·kᵀ/√D minus q·k̂ᵀ/√D; q `[B, H, S, D]`, k `[B, H, T, D]` (H query heads = KV heads)."""
    d = (q @ (k - k_hat).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
    return float(d.double().pow(2).mean().sqrt())


def output_rms_error(p: torch.Tensor, v: torch.Tensor, v_hat: torch.Tensor) -> float:
    """RMS of P·V minus P·V̂; p `[B, H, S, T]` attention weights, v `[B, H, T, D]`."""
    return float((p @ (v - v_hat)).double().pow(2).mean().sqrt())


def axis_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int) -> dict[str, float]:
    """Score and output RMS errors of quantizing K, or V, along each axis (asymmetric, fp32 scales).

    q `[B, H, S, D]` and k, v `[B, H, T, D]` of one attention layer (H query heads = KV heads),
    unmasked (a bidirectional encoder). Groups hold `group_size` elements on both axes, so both
    store the same number of scales. Keys: "k_<axis>_score", "k_<axis>_output", "v_<axis>_output".
    """
    D = q.shape[-1]
    p = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(D), dim=-1)  # (B, H, S, T)
    out = {}
    for axis in AXES:
        scheme = QuantScheme(bits, axis, group_size, True, torch.float32)
        k_hat, v_hat = fake_quantize(k, scheme), fake_quantize(v, scheme)
        out[f"k_{axis}_score"] = score_rms_error(q, k, k_hat)
        p_hat = torch.softmax((q @ k_hat.transpose(-2, -1)) / math.sqrt(D), dim=-1)
        out[f"k_{axis}_output"] = float((p @ v - p_hat @ v).double().pow(2).mean().sqrt())
        out[f"v_{axis}_output"] = output_rms_error(p, v, v_hat)
    return out
