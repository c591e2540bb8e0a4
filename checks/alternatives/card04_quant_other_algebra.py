"""A correct alternative to solutions/card04_quantization/quant.py: bytes per head vector (ceil of D·bits/8 plus
the group scales), a floor of a true division for the token budget, codes from a NaN-cleaned 0/0 in int32,
dequantization by addcmul, nibbles packed as low + 16·high and unpacked into an interleaved buffer by % and
//, the score error as the difference of two score matrices, D ** -0.5, exp(ε) squared.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

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
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card04_quantization/quant.py"


def quantized_kv_bytes(cfg: ModelConfig, batch: int, seq_len: int, bits: int, group_size: int,
                       asymmetric: bool, scale_dtype: torch.dtype) -> int:
    scale_bytes = scale_dtype.itemsize * (2 if asymmetric else 1)
    per_vector = math.ceil(cfg.head_dim * bits / 8) + cfg.head_dim // group_size * scale_bytes  # one head's K or V of one token
    vectors = 2 * cfg.n_layers * cfg.n_kv_heads * batch * seq_len
    return int(vectors * per_vector)


def kv_tokens_in_budget(cfg: ModelConfig, budget_bytes: int, bits: int, group_size: int,
                        asymmetric: bool, scale_dtype: torch.dtype) -> int:
    per_token = quantized_kv_bytes(cfg, 1, 1, bits, group_size, asymmetric, scale_dtype)
    return math.floor(budget_bytes / per_token)


def kv_quantize(x: torch.Tensor, bits: int, axis: str, asymmetric: bool):
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
    if zero is None:
        return q.to(torch.float32) * scale.to(torch.float32)
    return torch.addcmul(zero.float(), q.float(), scale.float())


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    low, high = codes[..., 0::2], codes[..., 1::2]
    return low + high * 16


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.uint8)
    out[..., 0::2] = packed % 16
    out[..., 1::2] = packed // 16
    return out


def key_axis_errors(q: torch.Tensor, k: torch.Tensor, bits: int) -> dict[str, float]:
    errors = {}
    for axis in ("token", "channel"):
        codes, scale, zero = kv_quantize(k, bits, axis, True)
        k_hat = kv_dequantize(codes, scale, zero)
        delta = (q.float() @ k.float().transpose(-2, -1) - q.float() @ k_hat.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
        errors[axis] = float(delta.double().pow(2).mean().sqrt())
    return errors


def key_error_score_bound(q_norm: float, dk_norm: float, head_dim: int) -> float:
    return q_norm * dk_norm * head_dim ** -0.5


def softmax_weight_ratio_bound(max_score_shift: float) -> float:
    return math.exp(max_score_shift) ** 2
