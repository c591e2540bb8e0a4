"""A correct alternative to solutions/card10_recurrent/recurrent.py: φ as torch.where(x > 0, x + 1, exp(x)), the
state and readout by einsum, the scan with the shifted elements padded by the identity pair (1, 0), the state
bytes as (D + 1)·D, the crossing length found by a loop.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card10: the fundamental assumption breaker.

The KV cache exists because softmax attention needs every past key and value at every step:
exp(q·k_j) does not factor into a part of q and a part of k. Replace it by a kernel that does,
φ(q)·φ(k_j) with a positive feature map φ (Katharopoulos et al. 2020, "Transformers are RNNs",
§3.2; here φ(x) = elu(x) + 1), and causal attention becomes

    out_t = Σ_{j<=t} (φ(q_t)·φ(k_j)) v_j / Σ_{j<=t} φ(q_t)·φ(k_j) = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t

with S_t = Σ_{j<=t} φ(k_j) v_jᵀ and z_t = Σ_{j<=t} φ(k_j): a state of fixed size in place of a cache
that grows. State-space models (S4, Mamba) keep a fixed-size state too, updated by a linear
recurrence h_t = a_t ⊙ h_{t-1} + u_t that a parallel scan computes in log T steps.

What is lost is exact recall. A state S `[d_key, d_value]` read as Sᵀq is a linear map: how many
key-value pairs can it give back exactly? Softmax over a cache of all pairs has no such limit.

Shapes: B batch, H heads, T positions, D key (head) dim, Dv value dim, N state channels.
Models: `cfg` is a `kvref.config.ModelConfig`; a linear-attention layer keeps one state per KV head
(the query heads of a group share its keys and values, as they share a KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvref.config import ModelConfig

REPLACES = "solutions/card10_recurrent/recurrent.py"


def linear_attention_step(S: torch.Tensor, z: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of causal linear attention: returns (out `[B, H, Dv]`, new S, new z).

    S `[B, H, D, Dv]` and z `[B, H, D]` summarise every earlier token (both zero before the first);
    q, k `[B, H, D]` and v `[B, H, Dv]` are the new token's. φ(x) = elu(x) + 1
    (torch.nn.functional.elu). The token attends to itself, as in causal softmax attention: write
    it into the state before reading. The output must be a weighted average of the values seen so
    far, weights φ(q)·φ(k_j) summing to 1. What must the new S and z look like after a million
    tokens: how big? Do not modify the tensors passed in.
    """
    def phi(x):  # elu(x) + 1: x + 1 above 0, exp(x) at or below
        return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))
    fk, fq = phi(k), phi(q)  # (B, H, D)
    S = S + torch.einsum("bhd,bhe->bhde", fk, v)  # (B, H, D, Dv)
    z = z + fk
    out = torch.einsum("bhd,bhde->bhe", fq, S) / torch.einsum("bhd,bhd->bh", fq, z)[..., None]
    return out, S, z


def selective_scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Every h_t of the diagonal recurrence h_t = a_t ⊙ h_{t-1} + u_t, h_{-1} = 0: a, u `[B, T, N]` -> `[B, T, N]`.

    A loop over t is the step form; write the scan form: a fixed number of whole-tensor
    operations per round and about log2(T) rounds, so the number of torch operations grows like
    log T, not T. The pairs (a, u) compose: applying (a1, u1) then (a2, u2) is (a2·a1, a2·u1 + u2).
    Some a_t may be exactly 0 (a gate that resets the state) and products of many a_t underflow:
    never divide by a or by a product of them.
    """
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
    """Bytes of the linear-attention state of a model shaped like `cfg`, for `batch` sequences, elements of `dtype`.

    Every layer keeps S and z (as in `linear_attention_step`, with Dv = D = cfg.head_dim) for each
    KV head of each sequence. How does it depend on the number of tokens seen?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    per_head = (cfg.head_dim + 1) * cfg.head_dim
    return cfg.n_layers * batch * cfg.n_kv_heads * per_head * dtype.itemsize


def cache_outgrows_state_at(cfg: ModelConfig) -> int:
    """The smallest length T at which a KV cache of T positions holds more bytes than the linear state.

    Same model, batch and element type for both (do they matter?): the cache as in card02 (K and V,
    `[B, Hkv, T, D]` per layer), the state as in `linear_state_bytes`. Llama-3-8B (D = 128): from how
    many tokens on is its cache the bigger of the two?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    D, T = cfg.head_dim, 1
    while 2 * T * D <= D * D + D:  # per head and layer: the cache's K and V against S and z
        T += 1
    return T  # smallest T with 2·T·D > D·D + D, i.e. 2·T > D + 1


def recall_capacity(d_key: int, d_value: int) -> int:
    """The most key-value pairs a linear state S `[d_key, d_value]` can give back exactly.

    N pairs (k_i, v_i) are written, keys of length d_key in general position (random), values of
    length d_value arbitrary; each key is then queried and the readout Sᵀk_i must equal v_i for
    every i. Choose S as well as any rule could (the best S for those pairs). For which N does an
    S exist for every draw? (Does d_value limit it? Count the equations and the unknowns, then look
    at what Sᵀ does to the span of the keys.)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return d_key  # N <= d_key independent keys: solvable; past d_key, the readouts of N keys span only d_key dims
