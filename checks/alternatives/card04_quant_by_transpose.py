"""A correct alternative to solutions/card04_quantization/quant.py: per-channel quantization as per-token
quantization of the transposed keys, int8 and uint8 codes, nibbles packed from a [..., n, 2] view, the RMS
from a float32 vector norm, the ratio bound through a float64 tensor.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card04: precision and quantization.

A quantized KV cache stores each element of K and V as a `bits`-wide integer code, and for each
group of elements a scale (and, if asymmetric, a zero point) to read it back with. Fewer bits
per element, but the scales cost bytes too, and where the groups lie (the axis) decides how
much a group's few large values spoil its many small ones.

Conventions used by every kata here (KIVI's, Liu et al. 2024):
- asymmetric: a group with minimum m and maximum M has zero point z = m and scale
  s = (M - m) / (2^bits - 1); code q = round((x - z) / s), an integer in 0 .. 2^bits - 1;
  read back as q·s + z.
- symmetric: s = max|x| / (2^(bits-1) - 1); q = round(x / s), in -(2^(bits-1) - 1) ..
  2^(bits-1) - 1 (INT4: -7 .. 7, not -8 .. 7: the restricted range keeps 0 exact and the
  range symmetric); read back as q·s; there is no zero point.
- a group whose values are all equal has s = 0; its codes are 0 (and it reads back as z, or 0).
- round() is round-half-to-even (torch.round).
- "per token": one group per token per KV head, across the D channels of its head vector.
  "per channel": one group per channel per KV head, across the T tokens.
- codes narrower than a byte are packed: INT4 two to a byte, INT2 four to a byte.

Shapes: B batch, Hkv KV heads, T positions, D head dim, L layers; K and V are `[B, Hkv, T, D]`.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card04_quantization/quant.py"


def quantized_kv_bytes(cfg: ModelConfig, batch: int, seq_len: int, bits: int, group_size: int,
                       asymmetric: bool, scale_dtype: torch.dtype) -> int:
    """Bytes of a K/V cache of `seq_len` positions for `batch` sequences, quantized to `bits` bits.

    K and V of every layer are quantized per token, group-wise: each token's head vector of D
    channels (in each KV head) is cut into D / group_size groups of `group_size` consecutive
    channels; each group stores one scale, and, if `asymmetric`, one zero point, each an
    element of `scale_dtype` (torch.float16 in KIVI: 2 bytes; use `scale_dtype.itemsize`).
    Codes are packed: 8 // bits to a byte. `bits` is 8, 4 or 2; `group_size` divides D
    (group_size = D: one scale per token per head); for 2 bits D is a multiple of 4.
    An FP16 cache stores 2 bytes a value and no scales: is INT4 then 4x smaller? Work out
    Llama-2-7B at INT4, groups of 32, asymmetric, fp16 scales.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    values = 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim  # K and V elements
    groups = values // group_size
    per_group = (2 if asymmetric else 1) * scale_dtype.itemsize  # a scale, and a zero point if asymmetric
    return values * bits // 8 + groups * per_group


def kv_tokens_in_budget(cfg: ModelConfig, budget_bytes: int, bits: int, group_size: int,
                        asymmetric: bool, scale_dtype: torch.dtype) -> int:
    """The most tokens of one sequence whose quantized K/V cache fits in `budget_bytes`.

    Same storage as `quantized_kv_bytes` (per token, groups of `group_size` channels, packed
    codes, a scale and maybe a zero point per group). Returns an int (0 if not even one token
    fits). Someone asks: "a 1T-parameter model, 4,096 tokens: how big is its KV cache?"
    Which numbers of the model do you need, and is its parameter count one of them? Two
    models of about 7B parameters (Llama-2-7B and Mistral-7B) are a good place to look.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    per_token = quantized_kv_bytes(cfg, 1, 1, bits, group_size, asymmetric, scale_dtype)
    return budget_bytes // per_token


def kv_quantize(x: torch.Tensor, bits: int, axis: str, asymmetric: bool):
    """Quantize K or V `[B, Hkv, T, D]` (floating) along `axis`, one group per token or per channel.

    Returns (q, scale, zero):
    - q: integer codes (any integer dtype; int16 holds every range here), the shape of x, in
      0 .. 2^bits - 1 if asymmetric, else in -(2^(bits-1) - 1) .. 2^(bits-1) - 1.
    - scale: float32, `[B, Hkv, T, 1]` for axis "token" (over the D channels of each token),
      `[B, Hkv, 1, D]` for axis "channel" (over the T tokens of each channel).
    - zero: float32, the shape of scale, each group's minimum, if asymmetric; None if symmetric.
    `bits` is 8, 4 or 2. Every element then reads back within scale / 2 of x (kv_dequantize).
    """
    if axis == "channel":  # per channel is per token of the transposed keys
        q, scale, zero = kv_quantize(x.transpose(2, 3), bits, "token", asymmetric)
        return q.transpose(2, 3), scale.transpose(2, 3), None if zero is None else zero.transpose(2, 3)
    dim = -1
    x = x.float()
    if asymmetric:
        zero = x.amin(dim, keepdim=True)
        scale = (x.amax(dim, keepdim=True) - zero) / (2**bits - 1)
        lo, hi = 0, 2**bits - 1
        shifted = x - zero
    else:
        zero = None
        hi = 2 ** (bits - 1) - 1
        lo = -hi
        scale = x.abs().amax(dim, keepdim=True) / hi
        shifted = x
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: codes 0
    q = torch.round(shifted / safe).clamp(lo, hi).to(torch.uint8 if asymmetric else torch.int8)
    return q, scale, zero


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Read codes back: q·scale + zero (asymmetric) or q·scale (zero is None), float32.

    q is `[B, Hkv, T, D]` integer codes; scale and zero broadcast against it (`[B, Hkv, T, 1]`
    per token, `[B, Hkv, 1, D]` per channel), as `kv_quantize` returns them.
    """
    x = q.float() * scale.float()
    return x if zero is None else x + zero.float()


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two to a byte along the last axis.

    codes: torch.uint8, values 0 .. 15, last axis of even length 2n. Returns torch.uint8 with
    last axis n: byte i holds code 2i in its low nibble and code 2i + 1 in its high nibble
    (so [1, 2] packs to 0x21 = 33). Half the bytes of one code a byte.
    """
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # (..., n, 2)
    return (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `int4_pack`: torch.uint8 codes 0 .. 15, the last axis twice as long."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def key_axis_errors(q: torch.Tensor, k: torch.Tensor, bits: int) -> dict[str, float]:
    """Measure which axis to quantize keys along: the scores' RMS error for each.

    q `[B, H, S, D]` queries and k `[B, H, T, D]` keys (as many query heads as KV heads).
    Quantize k asymmetrically to `bits` bits per token and, separately, per channel (one group
    per token, or per channel, as in `kv_quantize`), read each back, and return
    {"token": e_token, "channel": e_channel} where e is the root mean square, over every
    score, of q·kᵀ/√D minus q·k̂ᵀ/√D (Python floats). Which is smaller depends on the keys:
    what do real keys look like, and what did you measure?
    """
    errors = {}
    for axis in ("token", "channel"):
        codes, scale, zero = kv_quantize(k, bits, axis, True)
        k_hat = kv_dequantize(codes, scale, zero)
        delta = (q.float() @ (k.float() - k_hat).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
        errors[axis] = (torch.linalg.vector_norm(delta) / delta.numel() ** 0.5).item()
    return errors


def key_error_score_bound(q_norm: float, dk_norm: float, head_dim: int) -> float:
    """The largest change a key error of norm `dk_norm` can make to one attention score.

    The score of query q and key k is s = q·k / √D. If k is stored as k + Δk with
    ||Δk|| = dk_norm (Euclidean norm over the D channels) and ||q|| = q_norm, how far can s
    move, at most? Return a float; it must be reachable (a tight bound, not just a true one).

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return q_norm * dk_norm / math.sqrt(head_dim)


def softmax_weight_ratio_bound(max_score_shift: float) -> float:
    """How much a softmax weight can grow when every score moves by at most `max_score_shift`.

    p = softmax(s) over a row of scores; s' = s + δ with every |δ_j| <= ε (ε = max_score_shift
    >= 0). Return the least upper bound of p'_i / p_i over all rows, all i and all such δ (a
    float; by symmetry p_i / p'_i obeys the same bound). Which δ is worst for weight i?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return float(torch.tensor(2.0 * max_score_shift, dtype=torch.float64).exp())
