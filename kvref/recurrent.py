"""Spoiler for card10: linear attention as a recurrence, a diagonal state-space scan, and associative recall.

Read it after you pass card10. Three ideas, each with its reference and its measurement:

1. Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", §3.2). Replace
   softmax's exp(q·k) by a kernel φ(q)·φ(k) with a positive feature map, φ(x) = elu(x) + 1:

       out_i = Σ_{j<=i} (φ(q_i)·φ(k_j)) v_j / Σ_{j<=i} φ(q_i)·φ(k_j)          (parallel, [T, T])
             = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i,  S_i = S_{i-1} + φ(k_i) v_iᵀ,  z_i = z_{i-1} + φ(k_i)   (recurrent)

   The state (S [D, Dv], z [D]) per head replaces the cache: its size does not depend on T.
   The normaliser z is what makes the weights sum to 1; without it the output grows with T.
2. A diagonal state-space recurrence (S4D, Mamba's selective scan): h_t = a_t ⊙ h_{t-1} + u_t,
   computed step by step (`ssm_step`, T sequential steps) or as an associative scan in
   ⌈log2 T⌉ rounds of whole-tensor operations (`ssm_scan`). The pairs (a, u) compose as
   (a1, u1) then (a2, u2) = (a2·a1, a2·u1 + u2), an associative operator.
3. Associative recall: N key-value pairs are written, then each key is queried. Softmax
   attention over a cache of the N pairs returns the queried value exactly (at low
   temperature) for any N: the cache grows with N. A linear state S [d_key, d_value] read as
   Sᵀq can hold at most d_key pairs exactly (N keys in general position span min(N, d_key)
   dimensions); `projection_state_recall` writes pairs by a fixed-size recurrence that stores
   each new key's component orthogonal to the keys before it (Greville's recursive pseudoinverse),
   so it reaches that bound: exact up to d_key pairs, not beyond.

Shapes: B batch, H heads, T positions, D key dim, Dv value dim, N state channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvref.validate import check_tensor


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0: Katharopoulos et al. 2020 §3.2.1; keeps every kernel value positive."""
    return F.elu(x) + 1


# --- causal linear attention ---------------------------------------------------------------

def linear_attention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              feature_map=elu_feature_map) -> torch.Tensor:
    """Causal linear attention over all T positions at once: `[B, H, T, D]`, v `[B, H, T, Dv]` -> `[B, H, T, Dv]`."""
    check_tensor("q", q, ndim=4)
    B, H, T, D = q.shape
    check_tensor("k", k, shape=(B, H, T, D), dtype=q.dtype)
    check_tensor("v", v, shape=(B, H, T, None), dtype=q.dtype)
    scores = feature_map(q) @ feature_map(k).transpose(-2, -1)  # (B, H, T, T), all > 0
    scores = scores.tril()  # causal: query i reads keys j <= i
    return (scores @ v) / scores.sum(-1, keepdim=True)  # (B, H, T, Dv)


@dataclass
class LinearAttentionState:
    """What linear attention keeps between steps: S = Σ φ(k) vᵀ and z = Σ φ(k), per head."""
    S: torch.Tensor  # (B, H, D, Dv)
    z: torch.Tensor  # (B, H, D)

    @property
    def nbytes(self) -> int:
        return self.S.nbytes + self.z.nbytes


def linear_attention_init(batch: int, heads: int, d_key: int, d_value: int, dtype=torch.float32,
                          device=None) -> LinearAttentionState:
    """The empty state: no token seen, S = 0 and z = 0."""
    for name, x in (("batch", batch), ("heads", heads), ("d_key", d_key), ("d_value", d_value)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be an int >= 1, got {x!r}")
    return LinearAttentionState(torch.zeros(batch, heads, d_key, d_value, dtype=dtype, device=device),
                                torch.zeros(batch, heads, d_key, dtype=dtype, device=device))


def linear_attention_step(state: LinearAttentionState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          feature_map=elu_feature_map) -> tuple[torch.Tensor, LinearAttentionState]:
    """One token: q, k `[B, H, D]`, v `[B, H, Dv]`. Returns its output `[B, H, Dv]` and the new state.

    The token is written before it is read: position i attends to itself, as in the causal form.
    """
    B, H, D, Dv = state.S.shape
    check_tensor("q", q, shape=(B, H, D), dtype=state.S.dtype)
    check_tensor("k", k, shape=(B, H, D), dtype=state.S.dtype)
    check_tensor("v", v, shape=(B, H, Dv), dtype=state.S.dtype)
    fk = feature_map(k)  # (B, H, D)
    S = state.S + fk[..., :, None] * v[..., None, :]  # (B, H, D, Dv): rank-1 update φ(k) vᵀ
    z = state.z + fk  # (B, H, D)
    fq = feature_map(q)  # (B, H, D)
    num = (fq[..., None, :] @ S).squeeze(-2)  # (B, H, Dv)
    den = (fq * z).sum(-1, keepdim=True)  # (B, H, 1): Σ_j φ(q)·φ(k_j)
    return num / den, LinearAttentionState(S, z)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               feature_map=elu_feature_map) -> tuple[torch.Tensor, LinearAttentionState]:
    """The same outputs as `linear_attention_parallel`, one step at a time; also returns the final state."""
    check_tensor("q", q, ndim=4)
    B, H, T, D = q.shape
    check_tensor("k", k, shape=(B, H, T, D), dtype=q.dtype)
    check_tensor("v", v, shape=(B, H, T, None), dtype=q.dtype)
    state = linear_attention_init(B, H, D, v.shape[-1], q.dtype, q.device)
    outs = []
    for t in range(T):
        out, state = linear_attention_step(state, q[:, :, t], k[:, :, t], v[:, :, t], feature_map)
        outs.append(out)
    return torch.stack(outs, dim=2), state  # (B, H, T, Dv)


def model_states(cfg, batch: int, seq_len: int, dtype=torch.float32, seed: int = 0) -> list[LinearAttentionState]:
    """Every layer's state after `seq_len` tokens of random K/V, for a model shaped like `cfg`.

    Keys and values come in Hkv heads (the query heads of a group share them, as they share a
    KV cache), so the state holds one (S, z) per KV head: S [B, Hkv, D, D], z [B, Hkv, D].
    """
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, D = batch, cfg.n_kv_heads, cfg.head_dim
    states = []
    for _ in range(cfg.n_layers):
        state = linear_attention_init(B, Hkv, D, D, dtype)
        for _t in range(seq_len):
            k, v, q = (torch.randn(B, Hkv, D, generator=gen).to(dtype) for _ in range(3))
            _, state = linear_attention_step(state, q, k, v)
        states.append(state)
    return states


def states_nbytes(states: list[LinearAttentionState]) -> int:
    """Bytes held by a model's linear-attention states: `.nbytes` of every S and z."""
    return sum(s.nbytes for s in states)


# --- a diagonal state-space recurrence ---------------------------------------------------------

def ssm_step(h: torch.Tensor, a_t: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
    """One step of h_t = a_t ⊙ h_{t-1} + u_t; every tensor `[B, N]`."""
    return a_t * h + u_t


def ssm_recurrence(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h_t for every t, step by step from h_{-1} = 0: a, u `[B, T, N]` -> `[B, T, N]`."""
    check_tensor("a", a, ndim=3)
    check_tensor("u", u, shape=tuple(a.shape), dtype=a.dtype)
    h = torch.zeros_like(u[:, 0])
    hs = []
    for t in range(a.shape[1]):
        h = ssm_step(h, a[:, t], u[:, t])
        hs.append(h)
    return torch.stack(hs, dim=1)  # (B, T, N)


def ssm_scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The same h as `ssm_recurrence`, in ⌈log2 T⌉ rounds (Hillis-Steele inclusive scan).

    After the round with offset s, position t holds the composition of positions
    max(0, t - 2s + 1) .. t: (A, U) with A the product of their a's and U their recurrence
    started from 0. Combining with the block just before it, (A', U'), gives (A·A', A·U' + U).
    No division, so a = 0 (a reset) is fine.
    """
    check_tensor("a", a, ndim=3)
    check_tensor("u", u, shape=tuple(a.shape), dtype=a.dtype)
    A, U = a, u
    T, offset = a.shape[1], 1
    while offset < T:
        U = torch.cat([U[:, :offset], A[:, offset:] * U[:, :-offset] + U[:, offset:]], dim=1)  # (B, T, N)
        A = torch.cat([A[:, :offset], A[:, offset:] * A[:, :-offset]], dim=1)  # (B, T, N)
        offset *= 2
    return U


def diagonal_ssm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scan: bool = True) -> torch.Tensor:
    """y_t = Σ_n c_n h_{t,n}, h_t = a ⊙ h_{t-1} + b ⊙ x_t, per channel: x `[B, T, C]`, a, b, c `[C, N]`.

    The state is `[B, C, N]` whatever T: no cache. `scan` picks the log-depth scan or T steps.
    """
    check_tensor("x", x, ndim=3)
    B, T, C = x.shape
    for name, p in (("a", a), ("b", b), ("c", c)):
        check_tensor(name, p, shape=(C, None), dtype=x.dtype)
    N = a.shape[1]
    u = (x[..., None] * b).reshape(B, T, C * N)  # (B, T, C·N)
    decay = a.reshape(1, 1, C * N).expand(B, T, C * N)  # (B, T, C·N)
    h = (ssm_scan if scan else ssm_recurrence)(decay, u).reshape(B, T, C, N)
    return (h * c).sum(-1)  # (B, T, C)


# --- associative recall --------------------------------------------------------------------------

def recall_pairs(n_pairs: int, d_key: int, d_value: int, seed: int = 0, dtype=torch.float64):
    """N keys, unit vectors in general position, and N values, both Gaussian: `[N, d_key]`, `[N, d_value]`."""
    if not all(isinstance(x, int) and x >= 1 for x in (n_pairs, d_key, d_value)):
        raise ValueError(f"n_pairs, d_key, d_value must be ints >= 1, got {n_pairs!r}, {d_key!r}, {d_value!r}")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_pairs, d_key, generator=gen, dtype=dtype)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    values = torch.randn(n_pairs, d_value, generator=gen, dtype=dtype)
    return keys, values


def softmax_recall(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, scale: float = 1e6) -> torch.Tensor:
    """Softmax attention of `queries` over a cache of every (key, value): `[Nq, d_value]`.

    At scale 1e6 the weight of a key whose cosine with the query is 1 - δ is exp(-1e6·δ)
    relative to the match: the cache returns the stored value, whatever the number of pairs.
    """
    weights = torch.softmax(scale * queries @ keys.T, dim=-1)  # (Nq, N)
    return weights @ values  # (Nq, d_value)


def projection_state_recall(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Write the pairs one by one into a fixed-size state, then read `queries`: `[Nq, d_value]` and the state's bytes.

    State: S `[d_key, d_value]`, read as Sᵀq, and P `[d_key, d_key]`, the projector onto what the
    keys written so far do not span. Writing (k, v): r = P k; if r is not ~0, S += r (v - Sᵀk)ᵀ / (rᵀk)
    stores v at k and leaves every earlier key's readout unchanged (r ⟂ them), and P -= r rᵀ / (rᵀr).
    Once the keys span the space (d_key pairs), r = 0: a new pair can only be written over the old
    ones (a delta-rule step, S += k (v - Sᵀk)ᵀ / (kᵀk)), which corrupts them. Nothing grows with N.
    """
    d_key, d_value = keys.shape[1], values.shape[1]
    S = torch.zeros(d_key, d_value, dtype=keys.dtype)
    P = torch.eye(d_key, dtype=keys.dtype)
    for k, v in zip(keys, values):
        r = P @ k  # (d_key,)
        err = v - S.T @ k  # (d_value,)
        if r.norm() > 1e-9 * k.norm():
            S = S + torch.outer(r, err) / (r @ k)
            P = P - torch.outer(r, r) / (r @ r)
        else:
            S = S + torch.outer(k, err) / (k @ k)
    return queries @ S, S.nbytes + P.nbytes


def hebbian_state_recall(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                         feature_map=None) -> torch.Tensor:
    """Linear attention's own state S = Σ φ(k) vᵀ (with z = Σ φ(k) when a feature map is given), read at `queries`."""
    fk = keys if feature_map is None else feature_map(keys)
    fq = queries if feature_map is None else feature_map(queries)
    out = fq @ (fk.T @ values)  # (Nq, d_value)
    if feature_map is not None:
        out = out / (fq @ fk.sum(0))[:, None]
    return out


def exact_fraction(recalled: torch.Tensor, values: torch.Tensor, rel_tol: float = 1e-6) -> float:
    """Share of pairs read back exactly: |recalled - value| <= rel_tol·|value| per pair."""
    err = (recalled - values).norm(dim=-1)
    return float((err <= rel_tol * values.norm(dim=-1)).double().mean())


def nearest_fraction(recalled: torch.Tensor, values: torch.Tensor) -> float:
    """Share of pairs whose readout is nearer its own value than any other stored value (a looser score)."""
    nearest = torch.cdist(recalled, values).argmin(dim=-1)  # (N,)
    return float((nearest == torch.arange(len(values))).double().mean())


RECALLERS = {
    "softmax cache": lambda k, v: softmax_recall(k, v, k),
    "projection state": lambda k, v: projection_state_recall(k, v, k)[0],
    "hebbian state": lambda k, v: hebbian_state_recall(k, v, k),
    "elu+1 linear attention": lambda k, v: hebbian_state_recall(k, v, k, elu_feature_map),
}


def recall_curve(method: str, d_key: int, d_value: int, pair_counts, trials: int = 3, seed: int = 0,
                 score=exact_fraction) -> list[float]:
    """Mean `score` (exact recall by default) of `method` at each number of pairs, over `trials` random draws."""
    if method not in RECALLERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(RECALLERS)}")
    curve = []
    for n in pair_counts:
        fractions = []
        for trial in range(trials):
            keys, values = recall_pairs(n, d_key, d_value, seed=seed * 1000 + trial)
            fractions.append(score(RECALLERS[method](keys, values), values))
        curve.append(sum(fractions) / trials)
    return curve


def measured_capacity(d_key: int, d_value: int, max_pairs: int | None = None, trials: int = 3, seed: int = 0) -> int:
    """The most pairs the projection state recalls exactly in every trial, found by measuring N = 1, 2, ..."""
    max_pairs = max_pairs or 2 * d_key + 2
    best = 0
    for n in range(1, max_pairs + 1):
        if recall_curve("projection state", d_key, d_value, [n], trials, seed)[0] < 1.0:
            break
        best = n
    return best

