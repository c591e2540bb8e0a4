"""card01: the computational redundancy problem.

Greedy generation of N new tokens after a P-token prompt runs N forward passes: pass 0 reads
the prompt and picks new token 1; pass i (1 <= i < N) feeds new token i and picks token i+1.
The N-th new token is picked by the last pass and never fed back. Without a cache, pass i
recomputes K and V for all P + i tokens of the sequence so far; with a cache, pass 0 computes
the prompt's P and every later pass computes exactly one.

Counting conventions, the same as kvref's measuring instruments (kvref.measure):
- a K/V projection row is one token's K (or V) in one layer of one sequence;
- FLOPs are those of every matmul a forward pass runs, 2 per multiply-add, as
  torch.utils.flop_counter.FlopCounterMode counts them on kvref's model: each nn.Linear
  (q, k, v, o projections; the MLP's gate, up and down matrices, as the toy and Llama configs
  these katas are tested on have SwiGLU MLPs; lm_head on every position) and the two attention
  matmuls, q @ kᵀ and softmax @ v. Norms, RoPE, softmax and the embedding lookup count zero.

Shapes: B batch, P prompt length, N new tokens, S tokens fed in one pass, T keys each of them
scores against, L layers, H query heads, Hkv KV heads, D head dim, V vocab, d = d_model.
"""

from __future__ import annotations

from kvref.config import ModelConfig


def token_passes(prompt_len: int, n_new: int, use_cache: bool) -> int:
    """How many tokens go through one layer's K/V projection, per sequence, to generate `n_new` tokens.

    Pass 0 reads the `prompt_len` prompt tokens. How many tokens does pass i feed when nothing
    is cached, and how many when the cache holds every earlier K/V? How many passes are there
    for `n_new` new tokens (is the last new token ever fed back)?
    A widely shared interview answer says a 100-token answer after a 1000-token prompt costs
    about 55,000 attention computations without a cache and 100 with one, a 550x saving.
    Count the two totals yourself.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    if use_cache:
        return prompt_len + (n_new - 1)  # the prompt once, then one token per later pass
    # pass i feeds all P + i tokens: sum over i = 0 .. N-1
    return n_new * prompt_len + n_new * (n_new - 1) // 2


def kv_projection_rows(cfg: ModelConfig, batch: int, prompt_len: int, n_new: int, use_cache: bool) -> int:
    """All K and V projection rows computed to generate `n_new` tokens for `batch` sequences.

    One row is one token's K, or its V, in one layer of one sequence: the number the hooks of
    `kvref.model.count_kv_rows` report as `total` for the whole model. Which factors turn
    `token_passes` into this count?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    return 2 * cfg.n_layers * batch * token_passes(prompt_len, n_new, use_cache)  # K and V, every layer


def redundant_fraction(prompt_len: int, step: int) -> float:
    """The fraction of the K/V rows an uncached forward pass computes that a cache would have held.

    `step` numbers the passes of a generation from 0 (the prompt's). Without a cache, how many
    tokens does pass `step` project, and how many of their K/V were already computed by an
    earlier pass? Return a float in [0, 1). (At which step is nothing redundant yet?)

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    fed = prompt_len + step  # the uncached pass reprojects the whole sequence so far
    new = prompt_len if step == 0 else 1  # a cache would have projected only these
    return (fed - new) / fed


def forward_flops(cfg: ModelConfig, batch: int, n_new: int, n_cached: int) -> int:
    """FLOPs of one forward pass of kvref's model: `n_new` tokens per sequence after `n_cached` cached.

    Count what FlopCounterMode counts (see the module docstring). Every nn.Linear costs
    2 · in_features · out_features FLOPs per token: list them, with their shapes, for one layer
    (mind H against Hkv) and for the model. Each new token's row of scores spans
    T = n_cached + n_new keys in kvref, masked ones included: q @ kᵀ and softmax @ v each cost
    2 · D FLOPs per (query head, new token, key). A prefill is n_cached = 0; a cached decode
    step is n_new = 1; an uncached step is a prefill of the whole sequence.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    d, H, Hkv, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * cfg.d_ff  # q, k+v, o; gate, up, down
    weights = cfg.n_layers * per_layer + d * cfg.vocab_size  # + lm_head
    T = n_cached + n_new
    dense = 2 * batch * n_new * weights
    scores = 4 * cfg.n_layers * batch * H * n_new * T * D  # q @ kᵀ and softmax @ v
    return dense + scores


def generation_flops(cfg: ModelConfig, batch: int, prompt_len: int, n_new: int, use_cache: bool) -> int:
    """FLOPs of every forward pass `kvref.model.Transformer.generate` runs for `n_new` new tokens.

    Use the passes of `token_passes`: with a cache, one prefill then one-token steps, each
    attending everything before it; without, a forward over the whole sequence every pass.
    Which part of a cached step still grows with the sequence length?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    if not use_cache:
        return sum(forward_flops(cfg, batch, prompt_len + i, 0) for i in range(n_new))
    steps = sum(forward_flops(cfg, batch, 1, prompt_len + i - 1) for i in range(1, n_new))
    return forward_flops(cfg, batch, prompt_len, 0) + steps
