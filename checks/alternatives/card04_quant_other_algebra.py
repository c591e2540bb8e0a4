"""A correct alternative to solutions/card04_quantization/quant.py: bytes per head vector (ceil of D·bits/8 plus
the group scales), a floor of a true division for the token budget, codes from a NaN-cleaned 0/0 in int32,
dequantization by addcmul, nibbles packed as low + 16·high and unpacked into an interleaved buffer by % and
//, the score error as the difference of two score matrices, D ** -0.5, exp(ε) squared.

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
    scale_bytes = scale_dtype.itemsize * (2 if asymmetric else 1)
    per_vector = math.ceil(cfg.head_dim * bits / 8) + cfg.head_dim // group_size * scale_bytes  # one head's K or V of one token
    vectors = 2 * cfg.n_layers * cfg.n_kv_heads * batch * seq_len
    return int(vectors * per_vector)


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
    return math.floor(budget_bytes / per_token)


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
    dim = 3 if axis == "token" else 2  # the axis a group spans: channels of a token, tokens of a channel
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
    q = torch.round(shifted / scale).nan_to_num(0.0).clamp(lo, hi).to(torch.int32)  # 0 / 0 in a constant group
    return q, scale, zero


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Read codes back: q·scale + zero (asymmetric) or q·scale (zero is None), float32.

    q is `[B, Hkv, T, D]` integer codes; scale and zero broadcast against it (`[B, Hkv, T, 1]`
    per token, `[B, Hkv, 1, D]` per channel), as `kv_quantize` returns them.
    """
    if zero is None:
        return q.to(torch.float32) * scale.to(torch.float32)
    return torch.addcmul(zero.float(), q.float(), scale.float())


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two to a byte along the last axis.

    codes: torch.uint8, values 0 .. 15, last axis of even length 2n. Returns torch.uint8 with
    last axis n: byte i holds code 2i in its low nibble and code 2i + 1 in its high nibble
    (so [1, 2] packs to 0x21 = 33). Half the bytes of one code a byte.
    """
    low, high = codes[..., 0::2], codes[..., 1::2]
    return low + high * 16


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `int4_pack`: torch.uint8 codes 0 .. 15, the last axis twice as long."""
    out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.uint8)
    out[..., 0::2] = packed % 16
    out[..., 1::2] = packed // 16
    return out


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
        delta = (q.float() @ k.float().transpose(-2, -1) - q.float() @ k_hat.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
        errors[axis] = float(delta.double().pow(2).mean().sqrt())
    return errors


def key_error_score_bound(q_norm: float, dk_norm: float, head_dim: int) -> float:
    """The largest change a key error of norm `dk_norm` can make to one attention score.

    The score of query q and key k is s = q·k / √D. If k is stored as k + Δk with
    ||Δk|| = dk_norm (Euclidean norm over the D channels) and ||q|| = q_norm, how far can s
    move, at most? Return a float; it must be reachable (a tight bound, not just a true one).

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return q_norm * dk_norm * head_dim ** -0.5


def softmax_weight_ratio_bound(max_score_shift: float) -> float:
    """How much a softmax weight can grow when every score moves by at most `max_score_shift`.

    p = softmax(s) over a row of scores; s' = s + δ with every |δ_j| <= ε (ε = max_score_shift
    >= 0). Return the least upper bound of p'_i / p_i over all rows, all i and all such δ (a
    float; by symmetry p_i / p'_i obeys the same bound). Which δ is worst for weight i?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return math.exp(max_score_shift) ** 2
