"""Spoiler for card14: low-rank keys, the SVD truncated, and keys with a decaying spectrum (read it after you pass).

`low_rank` truncates the SVD of a key matrix [T, D] to rank r; by Eckart–Young
the Frobenius error is the root of the sum of the dropped squared singular values.
"""

from __future__ import annotations

import torch

from kvref.validate import check_tensor

# --- low-rank keys --------------------------------------------------------------------------


def low_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of a matrix [T, D] in Frobenius norm: its SVD truncated."""
    check_tensor("x", x, ndim=2, layout="[T, D]")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)  # (T, R), (R,), (R, D)
    r = min(rank, s.numel())
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(x.dtype)  # (T, D)


def low_rank_error(x: torch.Tensor, rank: int) -> float:
    """‖x - low_rank(x, rank)‖_F, measured on the tensors (in float64)."""
    return float(torch.linalg.norm(x.double() - low_rank(x.double(), rank)))


def synthetic_keys(n_tokens: int, head_dim: int, decay: float = 0.7, n_outliers: int = 2,
                   outlier_scale: float = 8.0, seed: int = 0) -> torch.Tensor:
    """Keys [T, D] with a decaying spectrum and a few outlier channels, as trained models' keys have.

    K = G diag(decay^i) Q with G Gaussian [T, D] and Q a random orthogonal [D, D]; then the first
    `n_outliers` channels are multiplied by `outlier_scale` (fixed channels, as KIVI saw in keys).
    """
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n_tokens, head_dim, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
    keys = (g * decay ** torch.arange(head_dim, dtype=torch.float64)) @ q  # (T, D)
    keys[:, :n_outliers] *= outlier_scale
    return keys.float()
