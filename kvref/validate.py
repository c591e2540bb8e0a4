"""Argument checks shared by kvref's public functions: clear errors, raised early."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    layout: str | None = None,
) -> None:
    """Raise TypeError or ValueError naming `name` and what was expected.

    `shape` may hold None for a free axis; `layout` names the axes for the message,
    e.g. "[B, Hkv, T, D]".
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and x.ndim != ndim:
        want = layout or (_fmt(shape) if shape is not None else f"{ndim} dims")
        raise ValueError(f"{name} must be {want}, got shape {list(x.shape)}")
    if shape is not None and any(w is not None and w != g for w, g in zip(shape, x.shape)):
        want = f"{layout} = {_fmt(shape)}" if layout else _fmt(shape)
        raise ValueError(f"{name} must be {want}, got shape {list(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {x.device}")


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
