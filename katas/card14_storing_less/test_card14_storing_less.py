"""card14: storing less.

Every answer is compared with a measurement on real tensors:
- bytes per token with `.nbytes` of kvref's MLA caches, filled by a real forward pass of a small
  MLA model (kvref.mla, checked against transformers' DeepseekV3 in checks/) or allocated on
  the meta device for the DeepSeek presets, and with kvref's ordinary caches for the GQA presets;
- absorbed scores with the scores of a naive MLA that expands every head's key from the latent,
  and with the output of a real MLA layer computed from them; their FLOPs with FlopCounterMode's formulas;
- the rank-r error with ‖K - K_r‖_F measured on keys (a kvref model's cached keys, synthetic keys
  with a decaying spectrum and outlier channels) truncated by SVD;
- the recompute bill with FlopCounterMode's formulas while kvref rebuilds the uncached layers' K/V of its
  model (checks/ shows that the rebuilt K/V give the logits of a fully cached decode).
"""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import (PARAMETER_FIELDS, Shown, call_str, describe_config, expect, expect_close, expect_equal,
                          expect_real, plural)
from kvref.attention import causal_mask
from kvref.layer_selective import selective_recompute_flops_measured
from kvref.low_rank import low_rank_error, synthetic_keys
from kvref.config import PRESETS, ModelConfig, preset
from kvref.measure import flops_of, kv_bytes_per_token_measured
from kvref.mla import build_mla_model, mla_cache_bytes_measured, mla_output_naive, mla_scores_absorbed, mla_scores_naive
from kvref.model import build_model
from kvref.strategies import HEAD_DIMS, gqa_model_configs, kv_dtypes, model_configs

impl = kvkata.load("card14_storing_less.storing")

MLA = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, head_dim=8, d_ff=32, max_seq_len=64,
                  mla_latent_dim=12, mla_rope_dim=4)
GQA = ModelConfig(vocab_size=64, n_layers=4, d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32)


def shown(cfg: ModelConfig) -> Shown:
    return Shown(describe_config(cfg, *PARAMETER_FIELDS))


@st.composite
def mla_configs(draw) -> ModelConfig:
    """Small MLA configs: heads, head dim, latent and RoPE dims, layers all vary; 1 head comes up too."""
    return ModelConfig(vocab_size=64, n_layers=draw(st.integers(1, 4), label="n_layers"),
                       d_model=draw(st.sampled_from([8, 16, 32]), label="d_model"),
                       n_heads=draw(st.integers(1, 8), label="n_heads"), head_dim=draw(HEAD_DIMS, label="head_dim"),
                       mla_latent_dim=draw(st.integers(1, 24), label="mla_latent_dim"),
                       mla_rope_dim=draw(st.sampled_from([2, 4, 6, 8]), label="mla_rope_dim"), d_ff=32, max_seq_len=64)


# --- mla_bytes_per_token ---------------------------------------------------------------------

@pytest.mark.kata("mla_bytes_per_token")
@given(cfg=mla_configs(), batch=st.integers(1, 3), seq_len=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@example(cfg=MLA, batch=2, seq_len=5, dtype=torch.bfloat16)
def test_mla_bytes_per_token_match_nbytes_of_the_latent_caches_a_real_mla_model_filled(cfg, batch, seq_len, dtype):
    got = impl.mla_bytes_per_token(cfg, dtype)
    model = build_mla_model(cfg, dtype=dtype)
    caches = model.new_caches(batch, seq_len)  # sized to exactly seq_len positions
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, torch.arange(seq_len), caches)
    total = sum(c.nbytes for c in caches)
    expect_equal(call_str("mla_bytes_per_token", shown(cfg), dtype), got, total // (batch * seq_len),
                 f".nbytes of kvref's {plural(cfg.n_layers, 'MLA cache')} (one per layer: latent [B, T, "
                 f"{cfg.mla_latent_dim}] and RoPE key [B, T, {cfg.mla_rope_dim}], nothing per head) after a forward pass "
                 f"of {plural(batch, 'sequence')} of {plural(seq_len, 'token')}, divided by {batch * seq_len} tokens")


@pytest.mark.kata("mla_bytes_per_token")
@given(cfg=mla_configs(), dtype=kv_dtypes)
@example(cfg=MLA, dtype=torch.int8)
@example(cfg=MLA.with_(n_heads=1, n_kv_heads=1), dtype=torch.float64)
def test_mla_bytes_per_token_in_any_element_type_match_a_one_token_mla_cache(cfg, dtype):
    got = impl.mla_bytes_per_token(cfg, dtype)
    expect_equal(call_str("mla_bytes_per_token", shown(cfg), dtype), got, mla_cache_bytes_measured(cfg, 1, 1, dtype),
                 f".nbytes of a one-token MLA cache in every layer, {plural(dtype.itemsize, 'byte')} per element")


@pytest.mark.kata("mla_bytes_per_token")
def test_mla_bytes_per_token_of_every_real_preset_match_an_allocated_cache():
    # GQA beside the presets: its heads (head_dim 8) are wider than d_model / n_heads = 4, as Gemma's are.
    for name, cfg in [*PRESETS.items(), ("GQA", GQA)]:
        for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
            got = impl.mla_bytes_per_token(cfg, dtype)
            if cfg.is_mla:
                measured, what = mla_cache_bytes_measured(cfg, 1, 1, dtype), "latent + RoPE key per layer (MLA)"
            else:
                measured, what = kv_bytes_per_token_measured(cfg, dtype), "K and V of the KV heads per layer (GQA/MHA)"
            expect_equal(call_str("mla_bytes_per_token", cfg, dtype), got, measured,
                         f".nbytes of a one-token cache of the real shapes on the meta device: {what}")


@pytest.mark.kata("mla_bytes_per_token")
def test_deepseek_v2_and_v3_cache_69_120_and_70_272_bytes_a_token_in_bf16():
    for name, layers in (("deepseek-v2", 60), ("deepseek-v3", 61)):
        cfg = preset(name)
        got = impl.mla_bytes_per_token(cfg, torch.bfloat16)
        measured = mla_cache_bytes_measured(cfg, 1, 1, torch.bfloat16)
        mistake = {128 * measured: ": yours is 128 times that, one per head; MLA caches one per layer",
                   layers * 512 * 2: ": yours leaves out the RoPE key, which is cached beside the latent"}.get(got, "")
        expect_equal(call_str("mla_bytes_per_token", preset(name), torch.bfloat16), got, measured,
                     f".nbytes of a one-token MLA cache of {name}'s {layers} layers, built on the meta device" + mistake)
    v3, llama = impl.mla_bytes_per_token(preset("deepseek-v3"), torch.bfloat16), \
        impl.mla_bytes_per_token(preset("llama-3-70b"), torch.bfloat16)
    expect(isinstance(v3, int) and isinstance(llama, int) and v3 * 4 < llama,
           "mla_bytes_per_token(preset('deepseek-v3'), bf16) and (preset('llama-3-70b'), bf16)", (v3, llama),
           f"DeepSeek-V3 (671B parameters) to cache under a quarter of Llama-3-70B's "
           f"{kv_bytes_per_token_measured(preset('llama-3-70b'), torch.bfloat16):,} bytes a token (GQA-8, measured)")


# --- mla_absorbed_scores ---------------------------------------------------------------------

class LargestTensor(TorchFunctionMode):
    """The largest tensor any torch operation returns while it is active."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), list(t.shape)
        return out


# fp32: the absorbed and the naive scores sum the same D·C products in different orders; with
# unit-scale inputs, D <= 16 and C <= 24 they differed by at most 9.5e-7 over 2,000 random draws.
ATOL, RTOL = 1e-4, 1e-4


def score_inputs(B, H, S, T, D, C, Dr, seed):
    """Unit-scale q_nope, q_rope, latent, k_rope and w_uk (scaled by 1/sqrt(C), as a trained projection is)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=gen), torch.randn(B, H, S, Dr, generator=gen),
            torch.randn(B, T, C, generator=gen), torch.randn(B, T, Dr, generator=gen),
            torch.randn(H, D, C, generator=gen) / math.sqrt(C))


@st.composite
def mla_score_inputs(draw, square: bool = False):
    B, H = draw(st.integers(1, 3), label="B"), draw(st.integers(1, 6), label="H")
    T = draw(st.integers(1, 8), label="T")
    S = draw(st.integers(1, T), label="S")
    D = draw(st.sampled_from([2, 4, 6, 8, 16]), label="D")
    C = D if square else draw(st.integers(1, 24), label="C")
    Dr = draw(st.sampled_from([2, 4, 8]), label="Dr")
    return score_inputs(B, H, S, T, D, C, Dr, draw(st.integers(0, 2**16), label="seed"))


# C = D: w_uk[h] and its transpose have the same shape, so only the numbers tell them apart.
SQUARE = score_inputs(B=2, H=3, S=2, T=5, D=8, C=8, Dr=4, seed=0)
AXES = ("batch", "head", "query", "position")


@pytest.mark.kata("mla_absorbed_scores")
@given(inputs=st.one_of(mla_score_inputs(), mla_score_inputs(square=True)))
@example(inputs=SQUARE)
def test_mla_absorbed_scores_equal_the_scores_of_keys_expanded_from_the_latent(inputs):
    got = impl.mla_absorbed_scores(*inputs)
    q_nope, q_rope, latent, k_rope, w_uk = inputs
    cause = ""
    if isinstance(got, torch.Tensor) and w_uk.shape[-1] == w_uk.shape[-2]:
        transposed = mla_scores_naive(q_nope, q_rope, latent, k_rope, w_uk.transpose(-2, -1))
        if got.shape == transposed.shape and torch.allclose(got, transposed, atol=ATOL, rtol=RTOL):
            cause = (". Yours equals the scores with w_uk[h] transposed: with C = D the shapes fit either way, "
                     "only the numbers tell")
    expect_close(call_str("mla_absorbed_scores", *inputs), got, mla_scores_naive(*inputs), axes=AXES,
                 atol=ATOL, rtol=RTOL, layout="[B, H, S, T]",
                 why="the naive MLA scores: k_h = [w_uk[h] @ c ; k_r] expanded for every head and position, "
                     "(q_nope·k_nope + q_rope·k_r) / sqrt(D + Dr)" + cause)


@pytest.mark.kata("mla_absorbed_scores")
def test_mla_absorbed_scores_give_a_real_mla_layers_output_at_every_decode_position():
    model = build_mla_model(MLA, seed=3)
    attn = model.layers[1].self_attn
    x = torch.randn(2, 6, MLA.d_model, generator=torch.Generator().manual_seed(4))
    caches = model.new_caches(2, 6)
    with torch.no_grad():
        attn.score_inputs(x[:, :4], torch.arange(4), caches[1])  # a 4-token prompt's latents, cached
        for t in (4, 5):
            pos = torch.tensor([t])
            inputs = attn.score_inputs(x[:, t:t + 1], pos, caches[1])
            scores = impl.mla_absorbed_scores(*inputs)
            expect_close(call_str("mla_absorbed_scores", *inputs), scores, mla_scores_naive(*inputs), axes=AXES,
                         atol=ATOL, rtol=RTOL, why="the naive scores of kvref's MLA layer at this decode step")
            probs = torch.softmax(scores.masked_fill(~causal_mask(1, t + 1), float("-inf")), dim=-1)
            out = mla_output_naive(probs, inputs[2], attn.up_projections()[1], attn.o_proj.weight)
            full = attn(x[:, :t + 1], torch.arange(t + 1))[:, -1:]  # the same position, every key recomputed
            expect_close(f"the layer output from {call_str('mla_absorbed_scores', *inputs)}", out, full,
                         axes=("batch", "query", "channel"), atol=ATOL, rtol=RTOL,
                         why=f"kvref's MLA layer output for position {t} recomputed from the whole sequence")


@pytest.mark.kata("mla_absorbed_scores")
def test_mla_absorbed_scores_of_one_new_token_cost_no_more_flops_than_the_absorbed_form():
    """At decode (S = 1) over T = 64 cached latents, expanding every key costs ~10x more than absorbing."""
    H, T = 8, 64
    inputs = score_inputs(B=1, H=H, S=1, T=T, D=16, C=8, Dr=4, seed=5)
    with LargestTensor() as seen:  # first, before the FLOP count starts: a stub fails at once
        impl.mla_absorbed_scores(*inputs)
    got = flops_of(impl.mla_absorbed_scores, *inputs).total
    absorbed = flops_of(mla_scores_absorbed, *inputs).total
    naive = flops_of(mla_scores_naive, *inputs).total
    expect(got <= absorbed, call_str("mla_absorbed_scores", *inputs), Shown(f"after {got:,} FLOPs"),
           f"at most the {absorbed:,} FLOPs (FlopCounterMode's formulas) of the absorbed form: w_uk moved onto the {H} "
           f"queries (2·H·D·C) then scores against the {T} latents and RoPE keys (2·H·T·(C + Dr)); "
           f"expanding every key first costs {naive:,}")
    # FlopCounterMode counts matmuls only: keys expanded by broadcasting (w_uk[None, :, None] * latent[..., None])
    # cost no counted FLOPs. The tensors tell: no intermediate may be as large as the expanded keys [B, H, T, D].
    B, _, S, D = inputs[0].shape
    expanded = B * H * T * D
    bound = max(max(x.numel() for x in inputs), B * H * S * T)  # an input, or the scores themselves
    expect(seen.largest <= bound, call_str("mla_absorbed_scores", *inputs),
           Shown(f"a tensor of {seen.largest:,} elements {seen.shape} on the way"),
           f"no tensor larger than the inputs or the [B, H, S, T] scores ({bound:,} elements): the expanded keys "
           f"[B, H, T, D] alone hold {expanded:,}, whether built by a matmul or by broadcasting")


# --- low_rank_key_error ----------------------------------------------------------------------

def _singular_values(keys: torch.Tensor) -> list[float]:
    return [float(s) for s in torch.linalg.svdvals(keys.double())]


def _check_rank_errors(keys: torch.Tensor, ranks, what: str) -> None:
    sv = _singular_values(keys)
    norm = float(torch.linalg.norm(keys.double()))
    for rank in ranks:
        got = impl.low_rank_key_error(sv, rank)
        expect_real(call_str("low_rank_key_error", Shown(f"<{len(sv)} singular values of {what}>"), rank), got,
                    low_rank_error(keys, rank), rel=1e-6, abs=1e-9 * norm,
                    why=f"‖K - K_r‖_F measured on {what} [{keys.shape[0]}, {keys.shape[1]}] truncated by SVD to rank "
                        f"{rank} (‖K‖_F = {norm:.4g})")


@pytest.mark.kata("low_rank_key_error")
@given(n_tokens=st.integers(1, 48), head_dim=st.sampled_from([2, 4, 8, 16, 32]), decay=st.floats(0.3, 1.0),
       n_outliers=st.integers(0, 2), seed=st.integers(0, 100))
@example(n_tokens=32, head_dim=16, decay=0.7, n_outliers=2, seed=0)
def test_low_rank_key_error_is_what_svd_truncation_of_synthetic_keys_leaves(n_tokens, head_dim, decay, n_outliers, seed):
    keys = synthetic_keys(n_tokens, head_dim, decay=decay, n_outliers=n_outliers, seed=seed)
    _check_rank_errors(keys, range(min(n_tokens, head_dim) + 2), f"synthetic keys (spectrum decay {decay:.3g}, {n_outliers} outlier channels)")


@pytest.mark.kata("low_rank_key_error")
@given(cfg=st.one_of(model_configs(), gqa_model_configs()), n_tokens=st.integers(2, 24))
def test_low_rank_key_error_at_every_rank_of_a_models_cached_keys(cfg, n_tokens):
    model = build_model(cfg, seed=1)
    caches = model.new_caches("growing")
    ids = torch.randint(0, cfg.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, torch.arange(n_tokens), caches)
    keys = caches[-1].k[0, -1]  # (T, D): the last layer's last KV head, after RoPE
    _check_rank_errors(keys, range(min(keys.shape) + 1), "a kvref model's cached keys (last layer, last KV head)")


@pytest.mark.kata("low_rank_key_error")
def test_low_rank_key_error_of_singular_values_4_and_3_is_5_then_3_then_0():
    for sv, rank, want in (([4.0, 3.0], 0, 5.0), ([4.0, 3.0], 1, 3.0), ([4.0, 3.0], 2, 0.0), ([4.0, 3.0], 5, 0.0),
                           ([12.0, 4.0, 3.0], 1, 5.0), ([2.0, 2.0, 2.0, 2.0], 0, 4.0)):
        keys = torch.diag(torch.tensor(sv, dtype=torch.float64))  # K = diag(sv): these are its singular values
        got = impl.low_rank_key_error(sv, rank)
        expect_real(call_str("low_rank_key_error", sv, rank), got, low_rank_error(keys, rank), rel=1e-9, abs=1e-12,
                    why=f"‖diag({sv}) - its rank-{rank} truncation‖_F = {want:g}: the root of the sum of the squares "
                        f"of the dropped values (not the kept ones, not their sum, not the largest dropped one)")


@pytest.mark.kata("low_rank_key_error")
def test_low_rank_key_error_is_a_float_when_nothing_is_dropped():
    """A rank at or past the count keeps everything: the error is 0.0, a float like every other answer."""
    for sv, rank in (([4.0, 3.0], 2), ([4.0, 3.0], 5), ([1.5], 1)):
        got = impl.low_rank_key_error(sv, rank)
        call = call_str("low_rank_key_error", sv, rank)
        expect_real(call, got, 0.0, abs=1e-12, why="nothing dropped, nothing lost")
        expect(isinstance(got, float), call, got, "a Python float, as the signature says (0.0, not the int 0)")


# --- selective_cache_recompute_flops ---------------------------------------------------------

@st.composite
def selective_setups(draw):
    """A dense config of 1 to 5 layers (SwiGLU or GELU) and any subset of its layers cached."""
    cfg = draw(st.one_of(model_configs(), gqa_model_configs()), label="config")
    cfg = cfg.with_(n_layers=draw(st.integers(1, 5), label="n_layers"),
                    mlp=draw(st.sampled_from(["swiglu", "gelu"]), label="mlp"))
    cached = draw(st.sets(st.integers(0, cfg.n_layers - 1)), label="cached_layers")
    return cfg, frozenset(cached)


def _bill_why(cfg, cached, n_past, measured):
    uncached = sorted(set(range(cfg.n_layers)) - set(cached))
    top = uncached[-1] if uncached else None
    skipped = sorted(set(cached) & set(range(top))) if uncached else []
    where = (f"the past tokens through layers 0..{top - 1}"
             + (f", whose cached layers {', '.join(map(str, skipped))} read their K/V instead of projecting it" if skipped else "")
             + f", then layer {top}'s K/V projections" if uncached else "nothing: every layer is cached")
    if len(uncached) > 4 and uncached == list(range(uncached[0], uncached[-1] + 1)):
        uncached = f"{uncached[0]}..{uncached[-1]}"
    return (f"FlopCounterMode's formulas counted {measured:,} FLOPs while kvref rebuilt the K/V of uncached layers {uncached} "
            f"for {plural(n_past, 'past token')} ({where})")


@pytest.mark.kata("selective_cache_recompute_flops")
@given(setup=selective_setups(), n_past=st.integers(1, 8))
@example(setup=(GQA, frozenset({2, 3})), n_past=5)
@example(setup=(GQA, frozenset({0, 1})), n_past=5)
@example(setup=(GQA, frozenset({1, 2, 3})), n_past=3)
@example(setup=(GQA, frozenset({0, 1, 2, 3})), n_past=3)
@example(setup=(GQA.with_(mlp="gelu"), frozenset({1, 3})), n_past=4)
def test_selective_cache_recompute_flops_match_flopcountermode_on_the_rebuild(setup, n_past):
    cfg, cached = setup
    got = impl.selective_cache_recompute_flops(cfg, set(cached), n_past)
    measured = selective_recompute_flops_measured(cfg, cached, n_past)
    expect_equal(call_str("selective_cache_recompute_flops", shown(cfg), set(cached), n_past), got, measured,
                 _bill_why(cfg, cached, n_past, measured))


@pytest.mark.kata("selective_cache_recompute_flops")
def test_selective_cache_recompute_flops_of_llama_caching_the_top_or_the_bottom_half():
    """The source card caches the top half and 'recomputes the rest on the fly': which half is cached decides the bill."""
    cfg = preset("llama-2-7b")  # 32 layers
    for cached, text in ((set(range(16, 32)), "{16..31}"), (set(range(16)), "{0..15}"), (set(range(1, 32)), "{1..31}"),
                         (set(range(0, 32, 2)), "{0, 2, .., 30}")):
        got = impl.selective_cache_recompute_flops(cfg, cached, 16)
        measured = selective_recompute_flops_measured(cfg, cached, 16)  # 16 past tokens
        expect_equal(call_str("selective_cache_recompute_flops", preset("llama-2-7b"), Shown(text), 16), got,
                     measured, _bill_why(cfg, cached, 16, measured))
