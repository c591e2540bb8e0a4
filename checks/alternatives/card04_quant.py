"""A correct alternative to solutions/card04_quantization/quant.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card04 test to pass. Here the bytes are counted a token at a time (codes of one token's head
vector, then its groups' metadata), the budget divides by that; the quantizer moves the group axis
last, multiplies by the reciprocal of the step and clamps the symmetric codes to -2^(b-1) .. 2^(b-1) - 1
(code -2^(b-1) is never reached, so the codes are the same) in int32; dequantize uses addcmul;
packing is arithmetic (low + 16·high) and unpacking uses % and //; the axis errors come from einsum
and a norm; the bounds are written as a product and a square.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card04_quantization/quant.py"


def quantized_kv_bytes(cfg: ModelConfig, batch: int, seq_len: int, bits: int, group_size: int,
                       asymmetric: bool, scale_dtype: torch.dtype) -> int:
    D = cfg.head_dim
    code_bytes = D // (8 // bits)  # one head vector's packed codes
    meta_bytes = (D // group_size) * scale_dtype.itemsize * (1 + int(asymmetric))
    vectors = 2 * cfg.n_layers * cfg.n_kv_heads * batch * seq_len  # head vectors of K and V
    return vectors * (code_bytes + meta_bytes)


def kv_tokens_in_budget(cfg: ModelConfig, budget_bytes: int, bits: int, group_size: int,
                        asymmetric: bool, scale_dtype: torch.dtype) -> int:
    return int(budget_bytes) // quantized_kv_bytes(cfg, 1, 1, bits, group_size, asymmetric, scale_dtype)


def kv_quantize(x: torch.Tensor, bits: int, axis: str, asymmetric: bool):
    x = x.to(torch.float32)
    moved = x if axis == "token" else x.transpose(-2, -1)  # the group's axis last: (B, Hkv, groups, members)
    if asymmetric:
        lo_v, hi_v = moved.aminmax(dim=-1, keepdim=True)
        levels = (1 << bits) - 1
        scale, zero, lo, hi = (hi_v - lo_v) / levels, lo_v, 0, levels
        centred = moved - lo_v
    else:
        top = (1 << (bits - 1)) - 1
        scale, zero, lo, hi = moved.abs().amax(dim=-1, keepdim=True) / top, None, -top - 1, top
        centred = moved
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # a constant group: every code 0
    q = (centred * inv).round().clamp(lo, hi).to(torch.int32)
    if axis == "channel":
        q, scale = q.transpose(-2, -1), scale.transpose(-2, -1)
        zero = None if zero is None else zero.transpose(-2, -1)
    return q.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous()


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    base = torch.zeros((), dtype=torch.float32) if zero is None else zero.to(torch.float32)
    return torch.addcmul(base, q.to(torch.float32), scale.to(torch.float32))


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.to(torch.int32).unflatten(-1, (-1, 2))  # (..., n, 2)
    return (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    wide = packed.to(torch.int32)
    return torch.stack((wide % 16, wide // 16), dim=-1).flatten(-2).to(torch.uint8)


def key_axis_errors(q: torch.Tensor, k: torch.Tensor, bits: int) -> dict[str, float]:
    D = q.shape[-1]
    errors = {}
    for axis in ("channel", "token"):
        k_hat = kv_dequantize(*kv_quantize(k, bits, axis, True))
        delta = torch.einsum("bhsd,bhtd->bhst", q.double(), k.double() - k_hat.double()) / D**0.5
        errors[axis] = (torch.linalg.vector_norm(delta) / math.sqrt(delta.numel())).item()
    return errors


def key_error_score_bound(q_norm: float, dk_norm: float, head_dim: int) -> float:
    return float(math.prod((q_norm, dk_norm, head_dim**-0.5)))


def softmax_weight_ratio_bound(max_score_shift: float) -> float:
    return math.exp(max_score_shift) ** 2
