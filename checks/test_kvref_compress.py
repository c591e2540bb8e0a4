"""kvref.mla, kvref.low_rank and kvref.layer_selective (card14) against code nobody here wrote, and their identities measured.

- MLA: the absorbed scores and output equal the naive ones (fp32, hypothesis over shapes); the
  absorbed and naive models give the same logits, cached decoding the logits of recomputation;
  and kvref's MLA model equals Hugging Face's DeepseekV3 (random weights copied across by name,
  no query compression, half-split RoPE), logits and cached latents, through HF's DynamicCache.
- Low rank: the error of the SVD truncation is the root of the sum of the dropped squared singular
  values, and no other rank-r approximation tried does better (Eckart–Young).
- Layer-selective caching: decoding with only some layers cached gives the logits of a fully cached
  decode, and the rebuild's FLOPs with nothing cached are kvref.measure's K/V recompute FLOPs.
"""

import importlib.util
import math
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvref.config import ModelConfig, preset
from kvref.layer_selective import new_selective_caches, selective_decode_step, selective_recompute_flops_measured
from kvref.low_rank import low_rank, low_rank_error, synthetic_keys
from kvref.measure import kv_recompute_flops_measured
from kvref.mla import (MLACache, MLATransformer, absorb_output, build_mla_model, mla_cache_bytes_measured,
                       mla_output_absorbed, mla_output_naive, mla_scores_absorbed, mla_scores_naive)
from kvref.model import build_model
from kvref.roofline import kv_bytes_per_token
from kvref.strategies import gqa_model_configs, model_configs

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# fp32: naive and absorbed sum the same products in a different order. Over 2,000 random draws
# (unit-scale inputs, D <= 16, C <= 24, H <= 6) the worst difference was 7.7e-7 of the scores'
# largest magnitude; allow 1e-5 of it (the HF comparison meets the same bound).
REL_TOL = 1e-5

MLA = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=48, max_seq_len=64,
                  mla_latent_dim=12, mla_rope_dim=4, norm_eps=1e-6)


def assert_close(got, want, what):
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item()
    assert err <= REL_TOL * scale, f"{what}: largest difference {err:.3g}, {err / scale:.3g} of the largest magnitude"


@st.composite
def score_inputs(draw):
    B, H, T = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    S, D, C, Dr = draw(st.integers(1, T)), draw(st.sampled_from([2, 4, 8, 16])), draw(st.integers(1, 24)), \
        draw(st.sampled_from([2, 4, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return (torch.randn(B, H, S, D, generator=gen), torch.randn(B, H, S, Dr, generator=gen),
            torch.randn(B, T, C, generator=gen), torch.randn(B, T, Dr, generator=gen),
            torch.randn(H, D, C, generator=gen) / math.sqrt(C))


@st.composite
def mla_configs(draw):
    return ModelConfig(vocab_size=64, n_layers=draw(st.integers(1, 3)), d_model=draw(st.sampled_from([16, 32])),
                       n_heads=draw(st.integers(1, 4)), head_dim=draw(st.sampled_from([2, 4, 8])),
                       mla_latent_dim=draw(st.integers(1, 16)), mla_rope_dim=draw(st.sampled_from([2, 4])),
                       d_ff=32, max_seq_len=64, norm_eps=1e-6)


# --- MLA: absorbed = naive -------------------------------------------------------------------

@given(inputs=score_inputs())
def test_absorbed_scores_equal_the_scores_of_expanded_keys(inputs):
    assert_close(mla_scores_absorbed(*inputs), mla_scores_naive(*inputs), "absorbed vs naive scores")


@given(inputs=score_inputs(), d_model=st.sampled_from([4, 16]), seed=st.integers(0, 99))
def test_absorbed_output_equals_values_expanded_then_o_proj(inputs, d_model, seed):
    q_nope, _, latent, _, w_uv = inputs
    B, H, S, D = q_nope.shape
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(B, H, S, latent.shape[1], generator=gen), dim=-1)
    w_o = torch.randn(d_model, H * D, generator=gen) / math.sqrt(H * D)
    assert_close(mla_output_absorbed(probs, latent, absorb_output(w_uv, w_o)), mla_output_naive(probs, latent, w_uv, w_o),
                 "W_uv absorbed into W_o vs values expanded")


def test_the_absorbed_query_uses_the_transpose_of_w_uk():
    """With C = D a missing transpose runs: the check must see it."""
    gen = torch.Generator().manual_seed(0)
    q_nope, q_rope = torch.randn(1, 2, 1, 4, generator=gen), torch.randn(1, 2, 1, 2, generator=gen)
    latent, k_rope, w_uk = torch.randn(1, 3, 4, generator=gen), torch.randn(1, 3, 2, generator=gen), \
        torch.randn(2, 4, 4, generator=gen)
    wrong = mla_scores_absorbed(q_nope, q_rope, latent, k_rope, w_uk.transpose(1, 2))
    assert not torch.allclose(wrong, mla_scores_naive(q_nope, q_rope, latent, k_rope, w_uk), atol=1e-3)


@settings(max_examples=min(settings().max_examples, 10))
@given(cfg=mla_configs(), batch=st.integers(1, 2), prompt=st.integers(1, 4), new=st.integers(1, 3),
       seed=st.integers(0, 99))
@example(cfg=MLA, batch=2, prompt=3, new=3, seed=0)
def test_mla_model_absorbed_or_naive_cached_or_not_gives_the_same_logits(cfg, batch, prompt, new, seed):
    model = build_mla_model(cfg, seed=seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt + new), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids)
        assert_close(model(ids, absorbed=True), full, "absorbed vs naive logits, no cache")
        for absorbed in (False, True):
            caches = model.new_caches(batch, prompt + new)
            model(ids[:, :prompt], torch.arange(prompt), caches, absorbed)
            for t in range(prompt, prompt + new):
                assert_close(model.decode_step(ids[:, t:t + 1], caches, absorbed), full[:, t],
                             f"cached decode (absorbed={absorbed}) at position {t}")
    assert sum(c.nbytes for c in caches) == mla_cache_bytes_measured(cfg, batch, prompt + new, torch.float32)


# --- MLA: against transformers' DeepseekV3 ---------------------------------------------------

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the cross-check needs Hugging Face transformers (pip install -e '.[dev]')")


def hf_deepseek_v3(cfg: ModelConfig):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hc = DeepseekV3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                          num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                          num_key_value_heads=cfg.n_heads, q_lora_rank=None, kv_lora_rank=cfg.mla_latent_dim,
                          qk_rope_head_dim=cfg.mla_rope_dim, qk_nope_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim,
                          first_k_dense_replace=cfg.n_layers,  # every layer a dense MLP, as kvref's
                          rope_interleave=False, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
                          rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                          tie_word_embeddings=False, attn_implementation="eager")
    return hc, DeepseekV3ForCausalLM(hc).eval()


@needs_transformers
@settings(max_examples=max(4, settings().max_examples // 4))
@given(cfg=mla_configs(), seed=st.integers(0, 99))
@example(cfg=MLA, seed=0)
def test_mla_model_equals_transformers_deepseek_v3_with_the_same_weights(cfg, seed):
    from transformers import DynamicCache

    cfg = cfg.with_(d_model=cfg.n_heads * 8)  # DeepseekV3Config wants hidden_size a multiple of the heads
    ours = build_mla_model(cfg, seed=seed)
    hc, hf = hf_deepseek_v3(cfg)
    hf.load_state_dict({(k if k.startswith("lm_head") else "model." + k): v for k, v in ours.state_dict().items()},
                       strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, "kvref MLA vs DeepseekV3 logits")
        caches, past = ours.new_caches(2, 6), DynamicCache(config=hc)
        ours(ids[:, :4], torch.arange(4), caches, absorbed=True)
        hf(ids[:, :4], past_key_values=past, use_cache=True)
        for t in (4, 5):
            want = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True).logits[:, -1]
            assert_close(ours.decode_step(ids[:, t:t + 1], caches, absorbed=True), want, f"decode at {t}")
    for layer, (mine, theirs) in enumerate(zip(caches, past.layers)):
        # HF caches the latent as keys [B, 1, T, C] and the rotated key as values [B, 1, T, Dr].
        assert_close(mine.latent, theirs.keys[:, 0], f"layer {layer}'s cached latent")
        assert_close(mine.k_rope, theirs.values[:, 0], f"layer {layer}'s cached RoPE key")
        assert mine.nbytes == theirs.keys.nbytes + theirs.values.nbytes


@needs_transformers
def test_transformers_deepseek_v3_defaults_are_kvrefs_preset_and_cache_70_272_bytes_a_token():
    from transformers import DeepseekV3Config

    hc, cfg = DeepseekV3Config(), preset("deepseek-v3")
    assert (hc.num_hidden_layers, hc.hidden_size, hc.num_attention_heads, hc.kv_lora_rank, hc.qk_rope_head_dim,
            hc.qk_nope_head_dim, hc.v_head_dim) == (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.mla_latent_dim,
                                                    cfg.mla_rope_dim, cfg.head_dim, cfg.head_dim)
    assert hc.num_hidden_layers * (hc.kv_lora_rank + hc.qk_rope_head_dim) * 2 == 70_272
    assert mla_cache_bytes_measured(cfg, 1, 1, torch.bfloat16) == 70_272
    assert mla_cache_bytes_measured(preset("deepseek-v2"), 1, 1, torch.bfloat16) == 69_120  # 60 layers, V2 §2.1


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v3"])
def test_roofline_prices_an_mla_token_at_what_kvrefs_mla_cache_holds(name):
    for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        assert kv_bytes_per_token(preset(name), dtype.itemsize) == mla_cache_bytes_measured(preset(name), 1, 1, dtype)


# --- low rank -------------------------------------------------------------------------------

@given(n_tokens=st.integers(1, 40), head_dim=st.sampled_from([2, 3, 8, 16]), decay=st.floats(0.3, 1.0),
       seed=st.integers(0, 99), data=st.data())
def test_svd_truncation_error_is_the_root_of_the_dropped_squared_singular_values(n_tokens, head_dim, decay, seed,
                                                                                    data):
    keys = synthetic_keys(n_tokens, head_dim, decay=decay, n_outliers=min(2, head_dim), seed=seed)
    sv = torch.linalg.svdvals(keys.double())
    rank = data.draw(st.integers(0, min(n_tokens, head_dim) + 1), label="rank")
    tail = float(sv[rank:].pow(2).sum().sqrt())
    assert math.isclose(low_rank_error(keys, rank), tail, rel_tol=1e-9, abs_tol=1e-9 * float(sv.norm()))
    assert torch.linalg.matrix_rank(low_rank(keys.double(), rank)) <= rank


@given(seed=st.integers(0, 99), rank=st.integers(1, 7))
def test_no_random_rank_r_approximation_beats_svd_truncation(seed, rank):
    keys = synthetic_keys(32, 8, decay=0.8, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(5):
        basis, _ = torch.linalg.qr(torch.randn(8, rank, generator=gen, dtype=torch.float64))  # (D, r)
        projected = keys @ basis @ basis.T  # the best approximation within that subspace
        assert float(torch.linalg.norm(keys - projected)) >= low_rank_error(keys, rank) - 1e-9


def test_low_rank_refuses_a_negative_rank_and_a_non_matrix():
    with pytest.raises(ValueError, match="rank must be an int >= 0"):
        low_rank(torch.zeros(3, 2), -1)
    with pytest.raises(ValueError, match=r"x must be \[T, D\]"):
        low_rank(torch.zeros(3), 1)


# --- layer-selective caching ----------------------------------------------------------------

@settings(max_examples=min(settings().max_examples, 10))
@given(cfg=st.one_of(model_configs(max_layers=4), gqa_model_configs(max_layers=4)), data=st.data(),
       length=st.integers(2, 6))
def test_decoding_with_only_some_layers_cached_gives_the_fully_cached_logits(cfg, data, length):
    cached = data.draw(st.sets(st.integers(0, cfg.n_layers - 1)), label="cached_layers")
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
    caches = new_selective_caches(model, cached)
    for t in range(length):
        got = selective_decode_step(model, ids[:, :t + 1], caches)
        assert_close(got, full[:, t], f"position {t}, cached layers {sorted(cached)}")
    assert all((c is None) == (layer not in cached) for layer, c in enumerate(caches))
    assert all(c.seq_len == length for c in caches if c is not None)


@given(cfg=st.one_of(model_configs(), gqa_model_configs()), n_past=st.integers(1, 8))
def test_the_rebuild_with_nothing_cached_costs_kvref_measures_k_v_recompute(cfg, n_past):
    assert selective_recompute_flops_measured(cfg, set(), n_past) == kv_recompute_flops_measured(cfg, n_past).total
    assert selective_recompute_flops_measured(cfg, set(range(cfg.n_layers)), n_past) == 0


def test_selective_caching_refuses_layers_the_model_does_not_have():
    cfg = ModelConfig(vocab_size=8, n_layers=2, d_model=8, n_heads=2, d_ff=8)
    with pytest.raises(ValueError, match=r"cached_layers must be layer indices in \[0, 2\)"):
        selective_recompute_flops_measured(cfg, {2}, 3)
    with pytest.raises(TypeError, match=r"cached_layers must be an iterable of layer indices, got 1"):
        selective_recompute_flops_measured(cfg, 1, 3)  # one layer, not wrapped in a set


def test_a_selective_decode_step_names_caches_of_the_wrong_length_and_ids_of_the_wrong_shape():
    cfg = ModelConfig(vocab_size=8, n_layers=2, d_model=8, n_heads=2, d_ff=8)
    model = build_model(cfg)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"caches must hold one entry per layer \(2\), got 1"):
        selective_decode_step(model, ids, new_selective_caches(model, {0})[:1])
    with pytest.raises(ValueError, match=r"ids must be a tensor of token ids \[B, T \+ 1\]"):
        selective_decode_step(model, ids[0], new_selective_caches(model, {0}))


# --- argument checks ------------------------------------------------------------------------

def test_mla_cache_appends_and_refuses_a_gap_or_an_overflow():
    cache = MLACache(1, 3, 4, 2)
    cache.update(torch.arange(2), torch.zeros(1, 2, 4), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"input_pos must be \[2\]"):
        cache.update(torch.tensor([3]), torch.zeros(1, 1, 4), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="cannot take 2 more after 2"):
        cache.update(torch.arange(2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 2))


def test_mla_model_refuses_a_config_without_a_latent_or_with_an_odd_rope_dim():
    with pytest.raises(ValueError, match="mla_latent_dim > 0"):
        MLATransformer(MLA.with_(mla_latent_dim=0))
    with pytest.raises(ValueError, match="mla_rope_dim must be even"):
        MLATransformer(MLA.with_(mla_rope_dim=3))
