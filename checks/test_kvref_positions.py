"""kvref.rope and kvref.alibi against code nobody here wrote, from `transformers`.

- Llama's `apply_rotary_pos_emb` with `LlamaRotaryEmbedding`'s cos/sin (half-split, any θ);
- GPT-NeoX's `apply_rotary_pos_emb` (half-split, partial rotary: `partial_rotary_factor`);
- GPT-J's `create_sinusoidal_positions` and `apply_rotary_pos_emb` (interleaved, partial
  `rotary_dim`, θ = 10000 fixed), laid out `[B, S, H, D]` as GPTJAttention does;
- BLOOM's `build_alibi_tensor` and its slopes (power-of-two head counts and others, 12 among them).

Bit-exact in fp32 where the operations are the same. kvref computes RoPE in fp32 for a bf16
input where Hugging Face rounds cos/sin to bf16 first: there the two differ by a few bf16 ulps.
Also checked: the laws (norms kept, scores depend on m - n only, R(p + Δ) = R(Δ) R(p)), the
model's own RoPE, and the elementwise op counter the RoPE FLOP kata is measured with.
"""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import GPTNeoXConfig, LlamaConfig  # noqa: E402
from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply  # noqa: E402
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply  # noqa: E402
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply  # noqa: E402

from kvref.alibi import alibi_attention, alibi_bias, alibi_slopes  # noqa: E402
from kvref.opcount import TRANSCENDENTAL, ElementwiseOps, rope_flops_of_decode, rope_flops_of_rotation  # noqa: E402
from kvref.config import ModelConfig  # noqa: E402
from kvref.measure import flops_of  # noqa: E402
from kvref.model import build_model  # noqa: E402
from kvref.rope import apply_rope, rope_apply, rope_cos_sin, rope_inv_freq, rope_rerotate, rope_rotate, rope_tables  # noqa: E402

HEAD_DIMS = st.sampled_from([2, 4, 8, 16, 64, 128])
THETAS = st.sampled_from([10000.0, 500000.0, 1e6, 100.0])


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@st.composite
def rope_inputs(draw):
    B, H, S = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    D = draw(HEAD_DIMS, label="D")
    start = draw(st.integers(0, 5000), label="start")
    pos = torch.arange(start, start + S)
    return rand(B, H, S, D, seed=draw(st.integers(0, 99))), pos


# --- half-split: Llama and GPT-NeoX ------------------------------------------------------------

@given(inputs=rope_inputs(), theta=THETAS)
def test_half_split_rotation_is_bit_exact_with_llamas_apply_rotary_pos_emb(inputs, theta):
    x, pos = inputs
    B, H, S, D = x.shape
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D, rope_theta=theta)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos[None].expand(B, S))
    q_hf, k_hf = llama_apply(x, x.flip(1), cos, sin)
    assert torch.equal(rope_rotate(x, pos, theta), q_hf)
    assert torch.equal(rope_rotate(x.flip(1), pos, theta, "half"), k_hf)
    assert torch.equal(LlamaRotaryEmbedding(cfg).inv_freq, rope_inv_freq(D, theta))


def test_bf16_rotation_is_computed_in_fp32_and_differs_from_llamas_bf16_tables_by_a_few_ulps():
    x = rand(2, 4, 64, 128, seed=1, dtype=torch.bfloat16)
    pos = torch.arange(1000, 1064)
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos[None].expand(2, 64))
    hf, _ = llama_apply(x, x, cos, sin)  # cos/sin rounded to bf16, arithmetic in bf16
    ours = rope_rotate(x, pos)
    exact = rope_rotate(x.double(), pos)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, rope_rotate(x.float(), pos).bfloat16())  # fp32 throughout, one rounding at the end
    # Measured: 39% of the elements differ; mean error against float64 1.1e-3 (kvref) and 1.9e-3 (bf16 tables).
    err_ours, err_hf = (ours.double() - exact).abs().mean(), (hf.double() - exact).abs().mean()
    assert not torch.equal(hf, ours) and err_ours < 0.7 * err_hf and (hf.double() - exact).abs().max() < 0.05


@given(D=st.sampled_from([8, 16, 64]), pct=st.sampled_from([0.25, 0.5, 0.75]), theta=THETAS, start=st.integers(0, 3000))
def test_partial_half_split_rotation_is_bit_exact_with_gpt_neox(D, pct, theta, start):
    r = int(D * pct)
    if r % 2:
        return
    x, pos = rand(2, 3, 5, D, seed=start), torch.arange(start, start + 5)
    cfg = GPTNeoXConfig(hidden_size=3 * D, num_attention_heads=3,
                        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": pct})
    cos, sin = GPTNeoXRotaryEmbedding(cfg)(x, pos[None].expand(2, 5))
    assert cos.shape[-1] == r
    q_hf, _ = neox_apply(x, x, cos, sin)
    ours = rope_rotate(x, pos, theta, "half", rotary_dim=r)
    assert torch.equal(ours, q_hf)
    assert torch.equal(ours[..., r:], x[..., r:])  # the pass-through dimensions are untouched


# --- interleaved: GPT-J --------------------------------------------------------------------------

def gptj_rotate(x, pos, rotary_dim):
    """GPTJAttention.forward's RoPE on kvref's layout: x [B, H, S, D] -> [B, S, H, D] and back."""
    B, H, S, D = x.shape
    table = create_sinusoidal_positions(int(pos.max()) + 1, rotary_dim)  # (P, r): sin | cos
    sincos = table[pos][None].expand(B, S, rotary_dim)
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    t = x.transpose(1, 2)  # (B, S, H, D)
    rot = gptj_apply(t[..., :rotary_dim], sin, cos)
    return torch.cat([rot, t[..., rotary_dim:]], dim=-1).transpose(1, 2)  # (B, H, S, D)


@given(inputs=rope_inputs(), frac=st.sampled_from([1.0, 0.5, 0.25]))
def test_interleaved_rotation_is_bit_exact_with_gptj(inputs, frac):
    x, pos = inputs
    r = max(2, int(x.shape[-1] * frac) // 2 * 2)
    assert torch.equal(rope_rotate(x, pos, 10000.0, "interleaved", rotary_dim=r), gptj_rotate(x, pos, r))


@given(inputs=rope_inputs())
def test_the_two_conventions_give_different_numbers_except_at_position_0_or_with_one_pair(inputs):
    x, pos = inputs
    half, inter = rope_rotate(x, pos, convention="half"), rope_rotate(x, pos, convention="interleaved")
    if x.shape[-1] == 2:
        assert torch.equal(half, inter)  # one pair: both conventions pair dimension 0 with 1
    elif pos.max() > 0:
        assert not torch.allclose(half, inter, atol=1e-3)


# --- the laws --------------------------------------------------------------------------------

@given(inputs=rope_inputs(), convention=st.sampled_from(["half", "interleaved"]), theta=THETAS)
def test_rotation_keeps_every_pairs_norm(inputs, convention, theta):
    x, pos = inputs
    y = rope_rotate(x.double(), pos, theta, convention)
    torch.testing.assert_close(y.norm(dim=-1), x.double().norm(dim=-1), rtol=1e-12, atol=1e-12)


@given(D=HEAD_DIMS, convention=st.sampled_from(["half", "interleaved"]), m=st.integers(0, 4000),
       n=st.integers(0, 4000), shift=st.integers(-4000, 4000))
def test_score_depends_on_m_minus_n_only(D, convention, m, n, shift):
    q, k = rand(1, D, seed=m).double(), rand(1, D, seed=n + 1).double()
    pos = lambda p: torch.tensor([p])  # noqa: E731
    a = (rope_rotate(q, pos(m), convention=convention) * rope_rotate(k, pos(n), convention=convention)).sum()
    s = max(shift, -min(m, n))
    b = (rope_rotate(q, pos(m + s), convention=convention) * rope_rotate(k, pos(n + s), convention=convention)).sum()
    assert abs(a - b) <= 1e-9 * (1 + q.norm() * k.norm())


@given(inputs=rope_inputs(), delta=st.integers(-3000, 3000), convention=st.sampled_from(["half", "interleaved"]),
       frac=st.sampled_from([1.0, 0.5]))
def test_rerotating_by_delta_equals_rotating_the_raw_key_at_p_plus_delta(inputs, delta, convention, frac):
    x, pos = inputs
    x = x.double()
    r = max(2, int(x.shape[-1] * frac) // 2 * 2)
    delta = max(delta, -int(pos.min()))
    moved = rope_rerotate(rope_rotate(x, pos, convention=convention, rotary_dim=r), delta,
                          convention=convention, rotary_dim=r)
    torch.testing.assert_close(moved, rope_rotate(x, pos + delta, convention=convention, rotary_dim=r),
                               rtol=1e-9, atol=1e-9)


@given(inputs=rope_inputs(), theta=THETAS)
def test_the_models_rope_equals_rope_rotate_in_fp32(inputs, theta):
    x, pos = inputs
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta)
    assert torch.equal(apply_rope(x, cos, sin), rope_rotate(x, pos, theta))


def test_rope_refuses_what_it_cannot_rotate():
    x = rand(1, 1, 2, 8)
    with pytest.raises(ValueError, match="convention"):
        rope_rotate(x, torch.arange(2), convention="neox")
    with pytest.raises(ValueError, match="even"):
        rope_rotate(x, torch.arange(2), rotary_dim=3)
    with pytest.raises(ValueError, match="exceeds"):
        rope_rotate(x, torch.arange(2), rotary_dim=10)
    with pytest.raises(ValueError, match="integer"):
        rope_tables(torch.tensor([0.5]), 8)
    cos, sin = rope_tables(torch.arange(2), 8)
    with pytest.raises(ValueError, match="convention .* 'Half'"):  # not silently the interleaved one
        rope_apply(x, cos, sin, convention="Half")


# --- ALiBi: BLOOM ------------------------------------------------------------------------------

def bloom_slopes(n_heads):
    mask = torch.ones(1, 2)
    return build_alibi_tensor(mask, n_heads, torch.float32).reshape(n_heads, 2)[:, 1]  # slope · position 1


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 64, 80, 96, 112, 128])
def test_alibi_slopes_match_bloom_for_power_of_two_and_other_head_counts(n_heads):
    # BLOOM raises an fp32-rounded base (2^-0.5 for 16 heads) to the powers 1 .. n in fp32, so the base's
    # rounding error (up to 2^-24 relative) is multiplied by up to n; kvref rounds the float64 power once.
    # Measured: 3.0e-7 relative at 16 heads, 6.6e-7 at 128.
    torch.testing.assert_close(alibi_slopes(n_heads), bloom_slopes(n_heads), rtol=n_heads * 2.0 ** -24 + 2.0 ** -24, atol=0)
    exact = [2.0 ** (-8 * (i + 1) / n_heads) for i in range(n_heads)]  # the power-of-two sequence, in float64
    if n_heads & (n_heads - 1) == 0:
        assert alibi_slopes(n_heads).tolist() == torch.tensor(exact).float().tolist()


def test_alibi_slopes_of_the_paper():
    """Press et al. 2022, §3: 8 heads give 1/2, 1/4, ..., 1/256; 16 heads interleave 2^-0.5, 2^-1, ..., 2^-8."""
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-i / 2) for i in range(1, 17)]))
    twelve = alibi_slopes(12).tolist()
    assert twelve[:8] == [2.0 ** -i for i in range(1, 9)]  # those of 8 heads
    torch.testing.assert_close(torch.tensor(twelve[8:]), torch.tensor([2.0 ** -(i + 0.5) for i in range(4)]))
    assert alibi_slopes(12)[8:].tolist() != [2.0 ** (-8 * i / 12) for i in range(9, 13)]


@given(n_heads=st.sampled_from([4, 8, 12, 6]), T=st.integers(1, 12), pad=st.integers(0, 3))
def test_alibi_bias_equals_bloom_up_to_one_constant_per_query_row(n_heads, T, pad):
    """BLOOM adds slope · key position to every row; kvref adds -slope · (q - k): they differ by slope · q."""
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, T)], dim=1)  # left padding
    bloom = build_alibi_tensor(mask, n_heads, torch.float32).reshape(n_heads, 1, pad + T)[..., pad:]  # (H, 1, T)
    pos = torch.arange(T)
    ours = alibi_bias(alibi_slopes(n_heads), pos, pos)  # (H, T, T)
    torch.testing.assert_close(ours + alibi_slopes(n_heads)[:, None, None] * pos[None, :, None],
                               bloom.expand(n_heads, T, T), rtol=1e-6, atol=1e-5)


@given(n_heads=st.sampled_from([2, 8, 12]), T=st.integers(1, 10), D=st.sampled_from([4, 8]),
       offset=st.integers(0, 10000))
def test_alibi_attention_matches_sdpa_with_blooms_bias_and_ignores_absolute_offsets(n_heads, T, D, offset):
    q, k, v = (rand(1, n_heads, T, D, seed=s) for s in range(3))
    pos = torch.arange(T)
    bloom = build_alibi_tensor(torch.ones(1, T), n_heads, torch.float32).reshape(1, n_heads, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bloom.masked_fill(~causal, float("-inf")))
    got = alibi_attention(q, k, v, alibi_slopes(n_heads), pos + offset, pos + offset)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- the RoPE FLOP instrument ----------------------------------------------------------------------

def test_elementwise_counter_counts_multiplies_and_adds_and_nothing_else():
    x, y = rand(3, 5), rand(3, 5, seed=1)
    with ElementwiseOps() as ops:
        z = x * y + x  # 15 multiplies, 15 adds
        torch.cat([-z, z]).float()  # a sign flip, a copy and a cast: no arithmetic
        z.cos()
    assert ops.flops == 30 and ops.by_op["cos"] == 15
    with ElementwiseOps() as ops:
        torch.arange(4) * 2  # integers are not FLOPs
    assert ops.flops == 0
    with ElementwiseOps() as ops:
        x.pow(2)  # RMSNorm's square: tallied as pow, not as a transcendental, and not in .flops
    assert ops.by_op == {"pow": 15} and ops.flops == 0
    assert "pow" not in TRANSCENDENTAL.values()


def test_flop_counter_mode_does_not_see_rope():
    x, pos = rand(2, 4, 8, 16), torch.arange(8)
    cos, sin = rope_tables(pos, 16)
    assert flops_of(apply_rope, x, cos, sin).total == 0  # why the RoPE kata is measured with ElementwiseOps


@given(D=st.sampled_from([4, 8, 16]), frac=st.sampled_from([1.0, 0.5, 0.25]), convention=st.sampled_from(["half", "interleaved"]),
       H=st.integers(1, 4), S=st.integers(1, 3))
def test_rope_apply_spends_three_flops_per_rotated_element(D, frac, convention, H, S):
    r = max(2, int(D * frac) // 2 * 2)
    assert rope_flops_of_rotation(rand(2, H, S, D), r, convention) == 3 * 2 * H * S * r


@pytest.mark.parametrize("T", [1, 4, 9])
def test_rope_flops_of_a_cached_decode_step_do_not_grow_with_the_cache(T):
    cfg = ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=16)
    model = build_model(cfg)
    ids = torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(T))
    assert rope_flops_of_decode(model, ids) == 3 * 8 * (4 + 2) * 2 * 2  # 3 · D · (H + Hkv) · L · B
