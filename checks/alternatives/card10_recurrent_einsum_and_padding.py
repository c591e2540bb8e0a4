"""A correct alternative to solutions/card10_recurrent/recurrent.py: φ as torch.where(x > 0, x + 1, exp(x)), the
state and readout by einsum, the scan with the shifted elements padded by the identity pair (1, 0), the state
bytes as (D + 1)·D, the crossing length found by a loop.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvref.config import ModelConfig

EXTENDS = "solutions/card10_recurrent/recurrent.py"


def linear_attention_step(S: torch.Tensor, z: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def phi(x):  # elu(x) + 1: x + 1 above 0, exp(x) at or below
        return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))
    fk, fq = phi(k), phi(q)  # (B, H, D)
    S = S + torch.einsum("bhd,bhe->bhde", fk, v)  # (B, H, D, Dv)
    z = z + fk
    out = torch.einsum("bhd,bhde->bhe", fq, S) / torch.einsum("bhd,bhd->bh", fq, z)[..., None]
    return out, S, z


def selective_scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    A, U = a, u
    offset = 1
    while offset < a.shape[1]:
        # The element offset positions back, padded with the identity pair (a = 1, u = 0).
        A_prev = F.pad(A[:, :-offset], (0, 0, offset, 0), value=1.0)  # (B, T, N)
        U_prev = F.pad(U[:, :-offset], (0, 0, offset, 0), value=0.0)
        A, U = A * A_prev, A * U_prev + U  # both from the previous round's A
        offset *= 2
    return U


def linear_state_bytes(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    per_head = (cfg.head_dim + 1) * cfg.head_dim
    return cfg.n_layers * batch * cfg.n_kv_heads * per_head * dtype.itemsize


def cache_outgrows_state_at(cfg: ModelConfig) -> int:
    D, T = cfg.head_dim, 1
    while 2 * T * D <= D * D + D:  # per head and layer: the cache's K and V against S and z
        T += 1
    return T  # smallest T with 2·T·D > D·D + D, i.e. 2·T > D + 1


