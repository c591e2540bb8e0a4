"""kvref against Hugging Face `transformers`: the same weights give the same logits and the same cache.

kvref's module names follow `LlamaForCausalLM` (HF adds a `model.` prefix to all but `lm_head`),
so kvref's random weights are copied into a randomly initialised HF Llama by name, and the two
are run side by side: a full forward, then prefill and decode through HF's `DynamicCache`,
comparing logits at every step and the K/V each layer has cached. Nothing is downloaded.
"""

import dataclasses
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvref.config import ModelConfig
from kvref.model import build_model
from kvref.strategies import model_configs

# Nothing here loads a checkpoint; should anything try, it must not reach the Hub. Set before
# transformers (and huggingface_hub, which reads these once) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip(
    "transformers", reason="the cross-check needs Hugging Face transformers (pip install -e '.[dev]')")

IMPLS = ["eager", "sdpa"]
SEEDS = st.integers(0, 2**16)
BATCHES = st.integers(1, 2)
PROMPT_LENS = st.integers(1, 6)
NEW_TOKENS = st.integers(1, 5)
ROPE_THETAS = st.sampled_from([10.0, 10000.0, 500000.0])  # a wrong base would show at every position > 0
WIDTH_PER_HEAD = st.sampled_from([2, 4, 8])
# Both sides compute in fp32 with the same math in a different order (HF scales q·k after the
# matmul in eager, fuses it in SDPA); over 300 random configs the worst logit difference was
# 1.8e-6 of the logits' largest magnitude, the worst K/V difference 3e-6: allow 1e-5 of the
# reference's largest magnitude.
REL_TOL = 1e-5
# Building an HF model costs little at these sizes but far more than a kvref step: a quarter of
# the profile's examples, never fewer than 8.
HF_SETTINGS = settings(max_examples=max(8, settings.default.max_examples // 4))

_BASE = dict(vocab_size=64, n_layers=2, d_model=16, d_ff=32, max_seq_len=64)
GQA = ModelConfig(**_BASE, n_heads=4, n_kv_heads=2, head_dim=8, rope_theta=500000.0)
MQA = ModelConfig(**_BASE, n_heads=4, n_kv_heads=1, head_dim=4)
MHA = ModelConfig(**_BASE, n_heads=2, n_kv_heads=2, head_dim=16, rope_theta=10.0)
WIDE_HEADS = ModelConfig(**_BASE, n_heads=2, n_kv_heads=1, head_dim=16)  # H·D = 32 != d_model = 16


@st.composite
def hf_llama_configs(draw):
    """kvref's random configs, with a width LlamaConfig accepts and a drawn RoPE base."""
    cfg = draw(model_configs(), label="config")
    # transformers 5's LlamaConfig insists hidden_size be a multiple of the query heads even when
    # head_dim is given; head_dim stays independent of d_model / H, which HF supports.
    width = cfg.n_heads * draw(WIDTH_PER_HEAD, label="d_model / n_heads")
    return dataclasses.replace(cfg, d_model=width, rope_theta=draw(ROPE_THETAS, label="rope_theta"))


HF_CONFIGS = hf_llama_configs()


def hf_config(cfg: ModelConfig, attn_implementation: str):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, attn_implementation=attn_implementation)


def hf_name(kvref_name: str) -> str:
    return kvref_name if kvref_name.startswith("lm_head.") else f"model.{kvref_name}"


def hf_twin(model, attn_implementation: str):
    """A randomly initialised HF Llama with `model`'s weights copied in by name."""
    hf = transformers.LlamaForCausalLM(hf_config(model.cfg, attn_implementation))
    hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf.eval()


def new_dynamic_cache(hf):
    try:
        return transformers.DynamicCache(config=hf.config)
    except TypeError:  # transformers 4.x takes no config
        return transformers.DynamicCache()


def hf_layer_kv(cache, i: int):
    """Layer i's cached (keys, values), `[B, Hkv, T, D]`, across the cache APIs of transformers 4 and 5."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        return cache.layers[i].keys, cache.layers[i].values
    if hasattr(cache, "key_cache"):  # earlier DynamicCache: lists of tensors
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i]  # the legacy tuple of (keys, values) per layer


def ids_for(cfg, batch, length, seed):
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=REL_TOL, atol=REL_TOL * float(expected.abs().max()),
                               msg=lambda m: f"{what}: {m}")


def decode_side_by_side(cfg, seed, B, P, N, impl):
    """Prefill P tokens, then N - 1 decode steps on kvref and HF alike, feeding both kvref's greedy
    tokens. Yields (step, kvref logits, HF logits, kvref caches, HF cache) after each call."""
    model = build_model(cfg, seed)
    hf = hf_twin(model, impl)
    caches, hf_cache = model.new_caches("growing"), new_dynamic_cache(hf)
    ids = ids_for(cfg, B, P, seed)
    with torch.no_grad():
        for step in range(N):
            logits = model.prefill(ids, caches) if step == 0 else model.decode_step(ids, caches)  # (B, V)
            out = hf(input_ids=ids, past_key_values=hf_cache, use_cache=True)
            hf_cache = out.past_key_values  # the same object in transformers 5; returned anew in older ones
            yield step, logits, out.logits[:, -1], caches, hf_cache
            ids = logits.argmax(-1, keepdim=True)  # (B, 1)


# --- weights line up -----------------------------------------------------------------------------

def test_kvref_weight_names_and_shapes_map_one_to_one_onto_hf_llama():
    model = build_model(GQA)
    hf = transformers.LlamaForCausalLM(hf_config(GQA, "eager"))
    ours = {hf_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs


# --- full forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@HF_SETTINGS
@given(cfg=HF_CONFIGS, seed=SEEDS, B=BATCHES, S=st.integers(1, 10))
@example(cfg=GQA, seed=0, B=2, S=9)
@example(cfg=MQA, seed=1, B=1, S=7)
@example(cfg=MHA, seed=2, B=2, S=5)
@example(cfg=WIDE_HEADS, seed=3, B=1, S=6)
def test_full_forward_logits_match_hf_llama(impl, cfg, seed, B, S):
    model = build_model(cfg, seed)
    ids = ids_for(cfg, B, S, seed)
    with torch.no_grad():
        close(model(ids), hf_twin(model, impl)(input_ids=ids).logits, f"logits [B, S, V] (attn_implementation={impl})")


# --- cached decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@HF_SETTINGS
@given(cfg=HF_CONFIGS, seed=SEEDS, B=BATCHES, P=PROMPT_LENS, N=NEW_TOKENS)
@example(cfg=GQA, seed=0, B=2, P=4, N=5)
@example(cfg=MQA, seed=1, B=1, P=1, N=5)
@example(cfg=MHA, seed=2, B=2, P=3, N=4)
@example(cfg=WIDE_HEADS, seed=3, B=1, P=2, N=3)
def test_cached_decoding_matches_hf_dynamic_cache_at_every_step(impl, cfg, seed, B, P, N):
    for step, logits, hf_logits, _, _ in decode_side_by_side(cfg, seed, B, P, N, impl):
        close(logits, hf_logits, f"step {step} ({'prefill' if step == 0 else 'decode'}) logits [B, V]")


@pytest.mark.parametrize("impl", IMPLS)
@HF_SETTINGS
@given(cfg=HF_CONFIGS, seed=SEEDS, B=BATCHES, P=PROMPT_LENS, N=NEW_TOKENS)
@example(cfg=GQA, seed=0, B=2, P=4, N=5)
@example(cfg=MQA, seed=1, B=1, P=1, N=5)
@example(cfg=MHA, seed=2, B=2, P=3, N=4)
def test_cached_keys_and_values_match_hf_dynamic_cache_layer_by_layer(impl, cfg, seed, B, P, N):
    # Both store K after RoPE and V as projected, [B, Hkv, T, D], one layer per entry.
    for step, _, _, caches, hf_cache in decode_side_by_side(cfg, seed, B, P, N, impl):
        for layer, cache in enumerate(caches):
            hf_k, hf_v = hf_layer_kv(hf_cache, layer)
            assert hf_k.shape == cache.k.shape == (B, cfg.n_kv_heads, P + step, cfg.head_dim)
            close(cache.k, hf_k, f"step {step} layer {layer} keys [B, Hkv, T, D]")
            close(cache.v, hf_v, f"step {step} layer {layer} values [B, Hkv, T, D]")
