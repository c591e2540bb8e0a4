"""A correct alternative to solutions/card04_quantization/quant.py: per-channel quantization as per-token
quantization of the transposed keys, int8 and uint8 codes, nibbles packed from a [..., n, 2] view, the RMS
from a float32 vector norm, the ratio bound through a float64 tensor.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import math

import torch


EXTENDS = "solutions/card04_quantization/quant.py"


def kv_quantize(x: torch.Tensor, bits: int, axis: str, asymmetric: bool):
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


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # (..., n, 2)
    return (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)


def key_axis_errors(q: torch.Tensor, k: torch.Tensor, bits: int) -> dict[str, float]:
    errors = {}
    for axis in ("token", "channel"):
        codes, scale, zero = kv_quantize(k, bits, axis, True)
        k_hat = kv_dequantize(codes, scale, zero)
        delta = (q.float() @ (k.float() - k_hat).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
        errors[axis] = (torch.linalg.vector_norm(delta) / delta.numel() ** 0.5).item()
    return errors


def softmax_weight_ratio_bound(max_score_shift: float) -> float:
    return float(torch.tensor(2.0 * max_score_shift, dtype=torch.float64).exp())
