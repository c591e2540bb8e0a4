"""Weight-only INT8 quantization: what it shrinks (the weights) and what it does not (the KV cache).

The K/V a layer caches are activations: `k = x @ W_k`, computed in the activation dtype.
Storing W_k as int8 with a scale per output row changes how the weights are stored, not the
dtype of x, so the cache keeps its size.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is stored as int8 with one scale per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free Linear layers only")
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (out, 1)
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantize on the fly; the output has the activation's dtype.
        return x @ (self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)).T


def quantize_weights_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every bias-free Linear replaced by an Int8Linear."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, child_name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (the weights, however they are stored)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
