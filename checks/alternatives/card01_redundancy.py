"""A correct alternative to solutions/card01_redundancy/redundancy.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card01 test to pass. Here the token passes are summed pass by pass in a loop; the rows
multiply per-pass rows; the redundant fraction is 1 - 1/(P + t) with an explicit 0.0 at the
prompt's pass; a forward's FLOPs list every matmul by name, with kvref's whole score rectangle
counted as q·kᵀ and softmax·v separately; and a generation's FLOPs come in closed form (the sums
over passes done by hand) instead of calling the forward pass by pass.

Shapes: B batch, P prompt length, N new tokens, S tokens fed in one pass, T keys, L layers,
H query heads, Hkv KV heads, D head dim, V vocab, d = d_model.
"""

from __future__ import annotations

from kvref.config import ModelConfig

REPLACES = "solutions/card01_redundancy/redundancy.py"


def token_passes(prompt_len: int, n_new: int, use_cache: bool) -> int:
    """How many tokens go through one layer's K/V projection, per sequence, to generate `n_new` tokens."""
    total = 0
    for i in range(n_new):  # pass i picks new token i + 1
        if use_cache:
            total += prompt_len if i == 0 else 1
        else:
            total += prompt_len + i
    return total


def kv_projection_rows(cfg: ModelConfig, batch: int, prompt_len: int, n_new: int, use_cache: bool) -> int:
    """All K and V projection rows computed to generate `n_new` tokens for `batch` sequences."""
    rows_per_token = cfg.n_layers * 2  # a K row and a V row in each layer
    return batch * rows_per_token * token_passes(prompt_len, n_new, use_cache)


def redundant_fraction(prompt_len: int, step: int) -> float:
    """The fraction of the K/V rows an uncached forward pass computes that a cache would have held."""
    if step == 0:
        return 0.0  # the prompt's pass: nothing computed before it
    return 1.0 - 1.0 / (prompt_len + step)


def forward_flops(cfg: ModelConfig, batch: int, n_new: int, n_cached: int) -> int:
    """FLOPs of one forward pass of kvref's model: `n_new` tokens per sequence after `n_cached` cached."""
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    linears = {  # (in_features, out_features) of every nn.Linear a token goes through in one layer
        "q_proj": (d, H * D), "k_proj": (d, Hkv * D), "v_proj": (d, Hkv * D), "o_proj": (H * D, d),
        "gate_proj": (d, cfg.d_ff), "up_proj": (d, cfg.d_ff), "down_proj": (cfg.d_ff, d),
    }
    tokens = batch * n_new
    per_token = L * sum(2 * i * o for i, o in linears.values()) + 2 * d * cfg.vocab_size  # + lm_head
    keys = n_cached + n_new
    qk = 2 * D * keys * tokens * H * L  # every query head scores every key, masked ones included
    pv = 2 * D * keys * tokens * H * L
    return tokens * per_token + qk + pv


def generation_flops(cfg: ModelConfig, batch: int, prompt_len: int, n_new: int, use_cache: bool) -> int:
    """FLOPs of every forward pass `kvref.model.Transformer.generate` runs for `n_new` new tokens."""
    d, H, Hkv, D, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    weights = L * (2 * d * H * D + 2 * d * Hkv * D + 3 * d * cfg.d_ff) + d * cfg.vocab_size
    P, N = prompt_len, n_new
    if use_cache:
        # the prefill: P tokens over P keys; step i (1 <= i < N): one token over P + i keys
        tokens = P + (N - 1)
        score_cells = P * P + sum(P + i for i in range(1, N))
    else:
        # pass i: P + i tokens over P + i keys
        tokens = N * P + N * (N - 1) // 2
        score_cells = sum((P + i) ** 2 for i in range(N))
    return 2 * batch * tokens * weights + 4 * L * batch * H * D * score_cells
