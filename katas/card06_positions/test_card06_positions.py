"""card06: attention mask and position embedding coupling.

What the answers are checked against:
- RoPE: kvref.rope's rotation, which is bit-exact in fp32 with Hugging Face's Llama and
  GPT-NeoX (half-split, partial rotary) and GPT-J (interleaved) code (checks/test_kvref_positions.py);
- the relative-position claim: scores q_m · k_n measured on random vectors at many (m, n);
- cached decoding: a full recompute of attention at every step, keys rotated from scratch;
- RoPE FLOPs: multiplies and adds counted by an instrument (kvref.opcount.ElementwiseOps, a
  TorchDispatchMode) while kvref's model runs a real cached decode step (FlopCounterMode counts
  matmuls only and sees none of RoPE's arithmetic);
- ALiBi: kvref.alibi's slopes, equal to BLOOM's `build_alibi_tensor` for every head count, and
  attention over the whole window recomputed at every step from absolute positions.
"""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import Mismatch, call_str, expect, expect_close, expect_equal, expect_real, expect_tensor, expect_tensor_equal, plural
from kvref.alibi import alibi_attention, alibi_slopes
from kvref.config import ModelConfig, preset
from kvref.model import build_model
from kvref.opcount import rope_flops_of_decode, rope_flops_of_rotation
from kvref.rope import rope_rotate as kvref_rotate
from kvref.strategies import gqa_model_configs, model_configs

rope = kvkata.load("card06_positions.rope")
alibi = kvkata.load("card06_positions.alibi")

CONVENTIONS = st.sampled_from(["half", "interleaved"])
THETAS = st.sampled_from([10000.0, 500000.0, 100.0])
HEAD_DIMS = st.sampled_from([2, 4, 6, 8, 16, 64])
AXES = ("batch", "head", "position", "dim")
OTHER = {"half": "interleaved", "interleaved": "half"}


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def fp32_rope_atol(x: torch.Tensor, max_pos: int) -> float:
    """fp32 angles p · f carry a rounding error of a few ulps of p · f: the result's, times |x|."""
    return 4e-7 * (1 + max_pos) * float(x.abs().max()) + 1e-6


@st.composite
def rotary_dims(draw, D: int):
    """None (all D dimensions) or an even number of leading dimensions, 2 .. D."""
    return draw(st.one_of(st.none(), st.integers(1, D // 2).map(lambda h: 2 * h)), label="rotary_dim")


def expect_close_in_bf16(call, got, want, atol, rtol, why, precision, fp32_right):
    """expect_close for a bf16 call; a mismatch blames bf16 (`precision`) only when `fp32_right()`, the
    same call on the same inputs in fp32 checked against its fp32 answer, passes: a wrong rotation or a
    wrong sign fails in fp32 too, and then the note says so instead."""
    try:
        expect_close(call, got, want, AXES, atol=atol, rtol=rtol, why=why)
    except Mismatch as failure:
        try:
            right, raised = fp32_right(), ""
        except Exception as exc:  # noqa: BLE001 - the learner's code, rerun
            right, raised = False, f" (it raises {type(exc).__name__}: {exc})"
        note = (f"the same call with these inputs in fp32 passes, so bf16 precision is the cause: {precision}" if right
                else f"the same call with these inputs in fp32 fails too{raised}, so bf16 precision is not the "
                     f"cause: the mistake is in the arithmetic itself (the fp32 tests of this kata show it)")
        raise Mismatch(f"{failure}\n  {note}") from None


def fp32_close(got, want, atol, rtol) -> bool:
    return got.shape == want.shape and bool(((got.double() - want.double()).abs() <= atol + rtol * want.double().abs()).all())


def attention_ref(q, keys, values):
    """softmax(q · kᵀ / sqrt(D)) · v in float64, over every key given (no mask: the keys are the past)."""
    scores = (q.double() @ keys.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ values.double()


# --- rope_rotate ------------------------------------------------------------------------------------

@pytest.mark.kata("rope_rotate")
@given(data=st.data(), D=HEAD_DIMS, S=st.integers(1, 5), start=st.integers(0, 3000), theta=THETAS,
       convention=CONVENTIONS)
@example(data=None, D=8, S=3, start=5, theta=10000.0, convention="interleaved")
def test_rope_rotate_equals_the_rotation_of_llama_and_gptj_code(data, D, S, start, theta, convention):
    r = data.draw(rotary_dims(D)) if data is not None else 4
    x, pos = rand(2, 3, S, D, seed=start), torch.arange(start, start + S)
    got = rope.rope_rotate(x, pos, theta, convention, r)
    want = kvref_rotate(x, pos, theta, convention, r)
    atol = fp32_rope_atol(x, start + S)
    cause = ""
    if isinstance(got, torch.Tensor) and got.shape == want.shape and not torch.allclose(got, want, atol=atol, rtol=1e-5):
        for other, words in ((kvref_rotate(x, -pos, theta, convention, r), "it turns the wrong way (sin's sign "
                              "flipped): a pair (a, b) becomes (a·cos - b·sin, b·cos + a·sin)"),
                             (kvref_rotate(x, pos, theta, OTHER[convention], r), f"it is the {OTHER[convention]} "
                              f"convention's rotation")):
            if torch.allclose(got, other, atol=atol, rtol=1e-5):
                cause = f". Yours matches another rotation: {words}"
                break
    expect_close(call_str("rope_rotate", x, pos, theta, convention, r), got, want, AXES,
                 atol=atol, rtol=1e-5,
                 why=f"the {convention} rotation at positions {start}..{start + S - 1}, base {theta:g}, "
                     f"{'all' if r is None else r} of {D} dimensions rotated (kvref.rope, bit-exact with "
                     f"{'Llama/GPT-NeoX' if convention == 'half' else 'GPT-J'} in transformers); the other convention "
                     f"pairs {'2i with 2i+1' if convention == 'half' else 'i with i + r/2'}" + cause)


@pytest.mark.kata("rope_rotate")
def test_rope_rotate_of_unit_vectors_pairs_the_right_dimensions_at_the_right_frequencies():
    """D = 4, base 10000: pair 0 turns by 1 radian per position, pair 1 by 10000^(-2/4) = 0.01."""
    pos = torch.tensor([1])
    c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
    cases = [  # (convention, unit vector index, expected)
        ("half", 0, [c1, 0, s1, 0]), ("half", 1, [0, c2, 0, s2]), ("half", 3, [0, -s2, 0, c2]),
        ("interleaved", 0, [c1, s1, 0, 0]), ("interleaved", 2, [0, 0, c2, s2]), ("interleaved", 1, [-s1, c1, 0, 0]),
    ]
    for convention, i, want in cases:
        x = torch.zeros(1, 1, 1, 4)
        x[..., i] = 1.0
        got = rope.rope_rotate(x, pos, convention=convention)  # theta: the default, 10000
        expect_close(call_str("rope_rotate", x, pos, convention=convention), got, torch.tensor(want).view(1, 1, 1, 4),
                     AXES, atol=1e-6, rtol=0,
                     why=f"unit vector e{i} at position 1: {convention} pairs "
                         f"{'dim j with j + 2' if convention == 'half' else 'dim 2j with 2j + 1'}; pair 0 turns by "
                         "1 rad, pair 1 by 0.01 rad (frequencies fall with the pair index)")
    x, far = torch.tensor([[[[0.0, 1.0, 0.0, 0.0]]]]), torch.tensor([3000])
    got = rope.rope_rotate(x, far)  # theta and convention: the defaults, 10000 and "half"
    expect_close(call_str("rope_rotate", x, far), got, torch.tensor([0, math.cos(30), 0, math.sin(30)]).view(1, 1, 1, 4),
                 AXES, atol=2e-5, rtol=0,
                 why="e1 at position 3000 with the defaults (theta 10000, half-split): pair 1 turns by 3000 · 10000^(-2/4) "
                     "= 30 rad")


@pytest.mark.kata("rope_rotate")
@given(D=st.sampled_from([8, 16, 64]), r=st.sampled_from([2, 4]), convention=CONVENTIONS, start=st.integers(1, 500))
def test_rope_rotate_with_partial_rotary_leaves_the_last_dimensions_alone(D, r, convention, start):
    x, pos = rand(1, 2, 3, D, seed=D + r), torch.arange(start, start + 3)
    got = rope.rope_rotate(x, pos, 10000.0, convention, r)
    call = call_str("rope_rotate", x, pos, 10000.0, convention, r)
    expect_tensor(call, got, x.shape, x.dtype)
    expect_tensor_equal(call, got[..., r:], x[..., r:], AXES)
    expect_close(call, got, kvref_rotate(x, pos, 10000.0, convention, r), AXES, atol=fp32_rope_atol(x, start + 3),
                 rtol=1e-5, why=f"only the first {r} of {D} dimensions rotate, at frequencies 10000^(-2i/{r})")


@pytest.mark.kata("rope_rotate")
@given(convention=CONVENTIONS, seed=st.integers(0, 50))
def test_rope_rotate_of_bf16_input_is_computed_in_fp32(convention, seed):
    x, pos = rand(2, 4, 16, 64, seed=seed, dtype=torch.bfloat16), torch.arange(16)
    got = rope.rope_rotate(x, pos, 10000.0, convention)
    want = kvref_rotate(x, pos, 10000.0, convention)  # fp32 throughout, rounded to bf16 once
    # bf16 cos/sin and products (as Hugging Face does) miss elements where the two products nearly
    # cancel by about 2^-9 · |x|: measured, at least 7x this tolerance on every seed. fp32 in another
    # order (exp/log frequencies, a·cos - b·sin) stays within 0.55x of it: one bf16 rounding step.
    expect_close_in_bf16(
        call_str("rope_rotate", x, pos, 10000.0, convention), got, want, atol=4e-6 * 16 * float(x.abs().max()),
        rtol=2 ** -6, why="kvref's rotation of the same bf16 input, rounded to bf16 once at the end",
        precision="the angles, cos, sin and products must be computed in fp32 and rounded to bf16 once at the end",
        fp32_right=lambda: fp32_close(rope.rope_rotate(x.float(), pos, 10000.0, convention),
                                      kvref_rotate(x.float(), pos, 10000.0, convention), fp32_rope_atol(x, 16), 1e-5))
    expect(got.dtype == torch.bfloat16, call_str("rope_rotate", x, pos), got, "a bf16 tensor, the input's dtype")


# --- rope_rotate: pinned cases (issue 21) ----------------------------------------------------------

@pytest.mark.kata("rope_rotate")
def test_rope_rotate_takes_each_rows_position_from_input_pos_in_any_order():
    """Row s turns by input_pos[s]: positions need not start at 0, rise, or be contiguous (a batch of
    chunks, a speculative tree, a re-fed token). arange(S) + input_pos[0] agrees only when they are."""
    x = rand(1, 2, 5, 8, seed=7)
    for pos in (torch.tensor([9, 3, 3000, 0, 4]), torch.tensor([6, 5, 4, 3, 2])):
        for convention in ("half", "interleaved"):
            call = call_str("rope_rotate", x, pos, 10000.0, convention)
            got = rope.rope_rotate(x, pos, 10000.0, convention)
            expect_close(call, got, kvref_rotate(x, pos, 10000.0, convention), AXES, atol=fp32_rope_atol(x, 3000),
                         rtol=1e-5, why=f"row s rotated by input_pos[s] = {pos.tolist()}[s], whatever their order")


@pytest.mark.kata("rope_rotate")
def test_rope_rotate_of_bf16_input_at_long_positions_turns_by_the_exact_position():
    """Positions are integers: cast to bf16 (8 significant bits), 3001 becomes 3008 and the fastest pair turns 7 rad
    too far. The angles need the positions as they are, in fp32, whatever x's dtype."""
    x, pos = rand(1, 2, 4, 16, seed=12, dtype=torch.bfloat16), torch.tensor([257, 1001, 3001, 4095])
    call = call_str("rope_rotate", x, pos)
    got = rope.rope_rotate(x, pos)
    expect_tensor(call, got, x.shape, torch.bfloat16, layout="x's shape and dtype")
    rounded = pos.to(torch.bfloat16).long().tolist()
    expect_close(call, got, kvref_rotate(x, pos, 10000.0, "half"), AXES,
                 atol=fp32_rope_atol(x, 4095) + 2 ** -8 * float(x.abs().max()), rtol=2 ** -7,
                 why=f"row s turned by input_pos[s] = {pos.tolist()}[s] exactly, in fp32, then rounded to bf16 once; "
                     f"positions rounded to bf16 would be {rounded}")


@pytest.mark.kata("rope_rotate")
def test_rope_rotate_of_fp16_input_returns_fp16():
    x, pos = rand(1, 2, 6, 16, seed=8, dtype=torch.float16), torch.arange(6)
    call = call_str("rope_rotate", x, pos)
    got = rope.rope_rotate(x, pos)
    expect_tensor(call, got, x.shape, torch.float16, layout="x's shape and dtype")
    expect_close(call, got, kvref_rotate(x, pos, 10000.0, "half"), AXES, atol=1e-3 * float(x.abs().max()), rtol=2 ** -9,
                 why="fp16 in, fp16 out, rotated in fp32 and rounded once")


# --- rope_relative_score --------------------------------------------------------------------------

@pytest.mark.kata("rope_relative_score")
@given(D=HEAD_DIMS, distance=st.integers(-40, 3000), theta=THETAS, convention=CONVENTIONS, seed=st.integers(0, 99))
@example(D=8, distance=-7, theta=10000.0, convention="half", seed=1)
@example(D=8, distance=5, theta=10000.0, convention="interleaved", seed=2)
def test_rope_relative_score_equals_scores_measured_at_many_absolute_positions(D, distance, theta, convention, seed):
    q, k = rand(4, D, seed=seed).double(), rand(4, D, seed=seed + 100).double()
    # theta 10000 is the signature's default: leave it out, so the default is checked too
    args = (distance,) if theta == 10000.0 else (distance, theta)
    got = rope.rope_relative_score(q.float(), k.float(), *args, convention=convention)
    expect_tensor(call_str("rope_relative_score", q.float(), k.float(), *args, convention=convention), got, (4,))
    n_values = [0, 1, 17, 255, 1000, 4095] if distance >= 0 else [40, 41, 300, 4095]
    for n in n_values:
        m = n + distance
        qm = kvref_rotate(q[:, None], torch.tensor([m]), theta, convention)[:, 0]
        kn = kvref_rotate(k[:, None], torch.tensor([n]), theta, convention)[:, 0]
        measured = (qm * kn).sum(-1)  # float64: the positions' own rounding is far below the tolerance
        expect_close(call_str("rope_relative_score", q.float(), k.float(), *args, convention=convention), got, measured,
                     ("pair",), atol=1e-4 * float(q.norm(dim=-1).max() * k.norm(dim=-1).max()), rtol=1e-4,
                     why=f"q rotated at m = {m} dotted with k rotated at n = {n} ({convention}, base {theta:g}), "
                         f"measured; every (m, n) with m - n = {distance} gives the same score")


@pytest.mark.kata("rope_relative_score")
def test_rope_relative_score_of_bf16_vectors_is_fp32():
    q, k = rand(3, 8, seed=9, dtype=torch.bfloat16), rand(3, 8, seed=10, dtype=torch.bfloat16)
    call = call_str("rope_relative_score", q, k, 5)
    got = rope.rope_relative_score(q, k, 5)
    expect_tensor(call, got, (3,), torch.float32, layout="[N] fp32, whatever the inputs' dtype")
    want = (kvref_rotate(q.double()[:, None], torch.tensor([5]), 10000.0, "half")[:, 0] * k.double()).sum(-1)
    expect_close(call, got, want, ("pair",), atol=1e-2, rtol=1e-2,
                 why="q rotated by 5 positions dotted with k, from the bf16 vectors, summed in fp32")


# --- rope_cached_decode ----------------------------------------------------------------------------

def run_rope_decode(B, H, D, steps, start, window, theta, convention, seed):
    """Decode `steps` tokens from position `start`, the cache holding the previous min(start, window) keys.

    Returns the first mismatch as an exception, checked against attention recomputed from the raw
    keys rotated at their absolute positions.
    """
    N = start + steps
    q, k, v = (rand(B, H, N, D, seed=seed + i) for i in range(3))  # raw projections of every position
    first = start - min(start, window)
    pos_all = torch.arange(N)
    k_rot = kvref_rotate(k, pos_all, theta, convention)  # every key rotated at its own position
    k_cache, v_cache = k_rot[:, :, first:start].clone(), v[:, :, first:start].clone()
    base = () if theta == 10000.0 else (theta,)  # 10000 is the signature's default: left out, so it is checked too
    for p in range(start, N):
        call = call_str("rope_cached_decode", q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], k_cache, v_cache,
                        p, *base, convention=convention)
        out, k_cache, v_cache = rope.rope_cached_decode(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1],
                                                        k_cache, v_cache, p, *base, convention=convention)
        lo = p + 1 - min(p + 1, window + 1)  # the window: the cache's keys and the new one
        expect_tensor(call, k_cache, (B, H, p + 1 - lo, D), layout="returned k_cache [B, H, T + 1, D]")
        expect_close(call, k_cache, k_rot[:, :, lo:p + 1], AXES, atol=fp32_rope_atol(k, N), rtol=1e-5,
                     why=f"the cache of positions {lo}..{p}: each key rotated once, at its own position "
                         f"({convention}); the new key at position {p}, not at its slot {p - lo}, and old keys unchanged")
        expect_equal(call + " -> v_cache", v_cache.shape[2], p + 1 - lo, "values appended once per step")
        q_rot = kvref_rotate(q[:, :, p:p + 1], torch.tensor([p]), theta, convention)
        want = attention_ref(q_rot, k_rot[:, :, lo:p + 1], v[:, :, lo:p + 1])
        expect_close(call, out, want, AXES, atol=2e-4 * (1 + N / 1000), rtol=1e-4,
                     why=f"attention of the query at position {p} over positions {lo}..{p}, recomputed from the raw "
                         f"keys rotated at their positions (query rotated at {p})")
        if window < k_cache.shape[2]:
            k_cache, v_cache = k_cache[:, :, 1:], v_cache[:, :, 1:]  # the sliding window drops the oldest


@pytest.mark.kata("rope_cached_decode")
@given(B=st.integers(1, 2), H=st.integers(1, 3), D=st.sampled_from([2, 4, 8, 16]), prompt=st.integers(0, 4),
       steps=st.integers(1, 5), theta=THETAS, convention=CONVENTIONS, seed=st.integers(0, 99))
@example(B=1, H=2, D=8, prompt=3, steps=4, theta=10000.0, convention="interleaved", seed=0)
def test_rope_cached_decode_equals_full_recompute_at_every_step(B, H, D, prompt, steps, theta, convention, seed):
    run_rope_decode(B, H, D, steps, prompt, window=10**6, theta=theta, convention=convention, seed=seed)


@pytest.mark.kata("rope_cached_decode")
@given(H=st.integers(1, 3), D=st.sampled_from([4, 8, 16]), start=st.integers(6, 2000), window=st.integers(1, 5),
       steps=st.integers(1, 4), convention=CONVENTIONS, seed=st.integers(0, 99))
@example(H=2, D=8, start=9, window=3, steps=4, convention="half", seed=0)
def test_rope_cached_decode_in_a_sliding_window_rotates_by_position_not_slot(H, D, start, window, steps, convention, seed):
    run_rope_decode(1, H, D, steps, start, window=window, theta=10000.0, convention=convention, seed=seed)


def bf16_decode_problem(B, H, D, T, seed):
    """bf16 q, k, v for T cached positions and a new one, every score near 50 (+ a spread of a few):
    the last dimension, in RoPE's slowest-turning pair under either convention, adds 50 to q·k/sqrt(D).
    bf16 rounds a score near 50 by up to 0.125, so scores or a softmax kept in bf16 move the output
    by 2.6% or more of its largest element (measured, 30 seeds); fp32 scores stay within one bf16
    rounding of the output, 0.36% (kvref/solutions)."""
    q, k, v = rand(B, H, 1, D, seed=seed) * 2, rand(B, H, T + 1, D, seed=seed + 1), rand(B, H, T + 1, D, seed=seed + 2)
    q[..., -1], k[..., -1] = 50.0, math.sqrt(D)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


@pytest.mark.kata("rope_cached_decode")
@given(convention=CONVENTIONS, seed=st.integers(0, 50))
def test_rope_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32(convention, seed):
    B, H, D, T, pos = 2, 4, 64, 48, 100
    q, k, v = bf16_decode_problem(B, H, D, T, seed)
    k_rot = kvref_rotate(k, torch.arange(pos - T, pos + 1), 10000.0, convention)  # bf16, rotated in fp32
    call = call_str("rope_cached_decode", q, k[:, :, T:], v[:, :, T:], k_rot[:, :, :T], v[:, :, :T], pos,
                    convention=convention)
    out, k_cache, _ = rope.rope_cached_decode(q, k[:, :, T:], v[:, :, T:], k_rot[:, :, :T].clone(), v[:, :, :T].clone(),
                                              pos, convention=convention)
    expect(out.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16, call, (out.dtype, k_cache.dtype),
           "bf16 out and a bf16 cache: the inputs' dtype (compute in fp32, round once at the end)")
    q_rot = kvref_rotate(q, torch.tensor([pos]), 10000.0, convention)
    want = attention_ref(q_rot, k_rot, v)

    def fp32_right():
        q32, k32, v32, k_rot32 = q.float(), k.float(), v.float(), kvref_rotate(k.float(), torch.arange(pos - T, pos + 1),
                                                                               10000.0, convention)
        out32 = rope.rope_cached_decode(q32, k32[:, :, T:], v32[:, :, T:], k_rot32[:, :, :T].clone(),
                                        v32[:, :, :T].clone(), pos, convention=convention)[0]
        want32 = attention_ref(kvref_rotate(q32, torch.tensor([pos]), 10000.0, convention), k_rot32, v32)
        return fp32_close(out32, want32, 1e-4 * float(want32.abs().max()), 1e-4)

    expect_close_in_bf16(call, out, want, atol=2 ** -7 * float(want.abs().max()), rtol=0,
                         why="attention computed in float64 from the bf16 inputs, the output rounded to bf16",
                         precision="every score is near 50, where bf16's spacing is 0.25, so q·kᵀ and the softmax "
                                   "must run in fp32 (q.float(), k_cache.float(), v_cache.float()) and only the "
                                   "output be rounded to bf16", fp32_right=fp32_right)


# --- rope_rerotate --------------------------------------------------------------------------------

@pytest.mark.kata("rope_rerotate")
@given(data=st.data(), D=HEAD_DIMS, delta=st.integers(-2000, 2000), theta=THETAS, convention=CONVENTIONS,
       seed=st.integers(0, 99))
@example(data=None, D=8, delta=-3, theta=10000.0, convention="interleaved", seed=0)
def test_rope_rerotate_equals_rotating_the_raw_key_at_p_plus_delta(data, D, delta, theta, convention, seed):
    r = data.draw(rotary_dims(D)) if data is not None else 4
    k = rand(2, 2, 5, D, seed=seed)
    pos = torch.tensor([7, 2000, 3, 2500, 4000])  # any positions, not contiguous: the shift is what matters
    pos = pos.clamp_min(-delta)
    k_rot = kvref_rotate(k, pos, theta, convention, r)
    got = rope.rope_rerotate(k_rot, delta, theta, convention, r)
    expect_close(call_str("rope_rerotate", k_rot, delta, theta, convention, r), got,
                 kvref_rotate(k, pos + delta, theta, convention, r), AXES, atol=2 * fp32_rope_atol(k, 6000), rtol=1e-5,
                 why=f"keys rotated at {pos.tolist()} moved by {delta}: the raw keys rotated at {(pos + delta).tolist()} "
                     f"({convention}, {'all' if r is None else r} of {D} dimensions)")
    # `[..., S, D]`: any leading dimensions, here one layer's cache of one sequence, `[Hkv, S, D]`.
    got3 = rope.rope_rerotate(k_rot[0], delta, theta, convention, r)
    expect_close(call_str("rope_rerotate", k_rot[0], delta, theta, convention, r), got3,
                 kvref_rotate(k[0], pos + delta, theta, convention, r), ("head", "position", "dim"),
                 atol=2 * fp32_rope_atol(k, 6000), rtol=1e-5,
                 why="the same keys without the batch dimension: positions run along dimension -2, whatever comes before")


@pytest.mark.kata("rope_rerotate")
@given(D=st.sampled_from([4, 8, 16]), window=st.integers(1, 4), steps=st.integers(1, 6), convention=CONVENTIONS,
       seed=st.integers(0, 99))
@example(D=8, window=2, steps=5, convention="half", seed=0)
def test_rope_rerotate_renumbers_a_sink_cache_as_if_rotated_from_scratch(D, window, steps, convention, seed):
    """StreamingLLM: 4 sinks + a window, keys at positions within the cache; each eviction moves the window back by 1."""
    sinks, H = 4, 2
    N = sinks + window + steps
    k, v, q = (rand(1, H, N, D, seed=seed + i) for i in range(3))
    kept = list(range(sinks + window))  # original token indices held, in cache order
    cache = kvref_rotate(k[:, :, kept], torch.arange(len(kept)), 10000.0, convention)
    for t in range(sinks + window, N):
        # evict the oldest non-sink token: those after it move one slot (one position) back
        call = call_str("rope_rerotate", cache[:, :, sinks + 1:], -1, convention=convention)
        moved = rope.rope_rerotate(cache[:, :, sinks + 1:], -1, convention=convention)  # theta: the default, 10000
        cache = torch.cat([cache[:, :, :sinks], moved], dim=2)
        kept = kept[:sinks] + kept[sinks + 1:]
        want_cache = kvref_rotate(k[:, :, kept], torch.arange(len(kept)), 10000.0, convention)
        expect_close(call, cache, want_cache, AXES, atol=1e-5, rtol=1e-5,
                     why=f"after evicting one token, the kept tokens {kept} sit at in-cache positions "
                         f"0..{len(kept) - 1}; their raw keys rotated there from scratch")
        # the new token goes in at the next in-cache position, and its query is rotated there too
        new_pos = torch.tensor([len(kept)])
        cache = torch.cat([cache, kvref_rotate(k[:, :, t:t + 1], new_pos, 10000.0, convention)], dim=2)
        kept.append(t)


@pytest.mark.kata("rope_rerotate")
def test_rope_rerotate_of_bf16_keys_returns_bf16():
    k = rand(1, 2, 4, 16, seed=11)
    pos = torch.tensor([3, 10, 11, 40])
    k_rot = kvref_rotate(k, pos, 10000.0, "half").bfloat16()
    call = call_str("rope_rerotate", k_rot, -2)
    got = rope.rope_rerotate(k_rot, -2)
    expect_tensor(call, got, k_rot.shape, torch.bfloat16, layout="k_rot's shape and dtype")
    expect_close(call, got, kvref_rotate(k_rot.float(), torch.full((4,), -2), 10000.0, "half"), AXES,
                 atol=2 ** -7 * float(k.abs().max()), rtol=2 ** -7,
                 why="bf16 keys moved back 2 positions, computed in fp32 and rounded to bf16 once")


# --- rope_decode_flops ----------------------------------------------------------------------------

@st.composite
def flop_configs(draw):
    return draw(st.one_of(model_configs(max_layers=2), gqa_model_configs(max_layers=2)), label="config")


@pytest.mark.kata("rope_decode_flops")
@given(cfg=flop_configs(), batch=st.integers(1, 3), cached=st.integers(1, 6))
@example(cfg=ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=16),
         batch=2, cached=5)
def test_rope_decode_flops_match_the_ops_counted_in_a_cached_model_step(cfg, batch, cached):
    got = rope.rope_decode_flops(cfg, batch)
    model = build_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (batch, cached), generator=torch.Generator().manual_seed(cached))
    measured = rope_flops_of_decode(model, prompt)
    expect_equal(call_str("rope_decode_flops", cfg, batch), got, measured,
                 f"multiplies and adds counted inside kvref's RoPE during one decode step after {plural(cached, 'cached token')}, "
                 f"{plural(cfg.n_layers, 'layer')}, {cfg.n_heads} query and {cfg.n_kv_heads} KV heads of dim {cfg.head_dim}: "
                 "only the new token's q and k rotate, and the count does not grow with the cache")


@pytest.mark.kata("rope_decode_flops")
@given(cfg=flop_configs(), batch=st.integers(1, 3), data=st.data())
def test_rope_decode_flops_with_partial_rotary_match_the_counted_rotations(cfg, batch, data):
    r = data.draw(st.integers(1, cfg.head_dim // 2).map(lambda h: 2 * h), label="rotary_dim")
    got = rope.rope_decode_flops(cfg, batch, r)
    q = torch.zeros(batch, cfg.n_heads, 1, cfg.head_dim)
    k = torch.zeros(batch, cfg.n_kv_heads, 1, cfg.head_dim)
    measured = cfg.n_layers * (rope_flops_of_rotation(q, r) + rope_flops_of_rotation(k, r))
    expect_equal(call_str("rope_decode_flops", cfg, batch, r), got, measured,
                 f"multiplies and adds counted while kvref.rope rotates {r} of {cfg.head_dim} dimensions of the new "
                 f"q [{batch}, {cfg.n_heads}, 1, {cfg.head_dim}] and k [{batch}, {cfg.n_kv_heads}, 1, {cfg.head_dim}] "
                 f"in each of {plural(cfg.n_layers, 'layer')}")


@pytest.mark.kata("rope_decode_flops")
def test_rope_decode_flops_of_llama_3_8b_are_a_rounding_error_next_to_its_matmuls():
    cfg = preset("llama-3-8b")
    got = rope.rope_decode_flops(cfg, 1)
    q, k = torch.zeros(1, cfg.n_heads, 1, cfg.head_dim), torch.zeros(1, cfg.n_kv_heads, 1, cfg.head_dim)
    q_ops, k_ops = rope_flops_of_rotation(q, cfg.head_dim), rope_flops_of_rotation(k, cfg.head_dim)
    measured = cfg.n_layers * (q_ops + k_ops)
    expect_equal(call_str("rope_decode_flops", cfg, 1), got, measured,
                 f"Llama-3-8B, one token: kvref.opcount counted {q_ops:,} multiplies and adds rotating one layer's q "
                 f"{list(q.shape)} and {k_ops:,} rotating its k {list(k.shape)}, in each of {cfg.n_layers} layers "
                 f"(about {measured / (2 * cfg.n_params):.0e} of the 2 x {cfg.n_params / 1e9:.1f}e9 FLOPs of its matmuls)"
                 .replace("e-0", "e-"))


# --- alibi_slopes --------------------------------------------------------------------------------

@pytest.mark.kata("alibi_slopes")
@given(n_heads=st.integers(1, 128))
@example(n_heads=12)
@example(n_heads=6)
def test_alibi_slopes_equal_blooms_for_power_of_two_and_other_head_counts(n_heads):
    got = alibi.alibi_slopes(n_heads)
    call = call_str("alibi_slopes", n_heads)
    want = alibi_slopes(n_heads).tolist()  # kvref.alibi: BLOOM's build_alibi_tensor within 2^-24 · n_heads
    expect(isinstance(got, list) and len(got) == n_heads and all(isinstance(s, float) for s in got), call, got,
           f"a list of {n_heads} Python floats")
    for h, (g, w) in enumerate(zip(got, want)):
        expect_real(call + f"[{h}]", g, w, rel=1e-6,
                    why=f"head {h}'s slope, as BLOOM's build_alibi_tensor computes it for {n_heads} heads"
                        + ("" if n_heads & (n_heads - 1) == 0 else
                           f": not a power of two, so {2 ** int(math.log2(n_heads))} heads' slopes, then every other "
                           f"slope of {2 ** (int(math.log2(n_heads)) + 1)} heads'"))


@pytest.mark.kata("alibi_slopes")
def test_alibi_slopes_of_8_and_12_heads_are_the_papers():
    """Press et al. 2022, §3: 8 heads 1/2 .. 1/256; 12 heads add 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (not 2^(-8h/12))."""
    for n, want in [(8, [2.0 ** -i for i in range(1, 9)]),
                    (12, [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)])]:
        got = alibi.alibi_slopes(n)
        expect(isinstance(got, list) and len(got) == n, call_str("alibi_slopes", n), got, f"a list of {n} floats")
        for h in range(n):
            expect_real(call_str("alibi_slopes", n) + f"[{h}]", got[h], want[h], rel=1e-9,
                        why=f"the ALiBi paper's slope for head {h} of {n}")


# --- alibi_cached_decode -------------------------------------------------------------------------

@pytest.mark.kata("alibi_cached_decode")
@given(H=st.sampled_from([1, 2, 4, 6, 8, 12]), D=st.sampled_from([4, 8]), start=st.integers(0, 5000),
       window=st.integers(1, 6), steps=st.integers(1, 5), seed=st.integers(0, 99))
@example(H=12, D=8, start=3, window=4, steps=5, seed=0)
@example(H=8, D=4, start=0, window=100, steps=4, seed=1)
def test_alibi_cached_decode_over_a_shifting_window_equals_attention_recomputed_from_positions(H, D, start, window,
                                                                                          steps, seed):
    B = 2
    N = start + steps
    first = start - min(start, window)
    q, k, v = (rand(B, H, N - first, D, seed=seed + i) for i in range(3))  # positions first .. N - 1
    slopes = alibi_slopes(H)
    k_cache, v_cache = k[:, :, :start - first].clone(), v[:, :, :start - first].clone()
    for p in range(start, N):
        j = p - first  # the new token's row in q, k, v
        call = call_str("alibi_cached_decode", q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], k_cache, v_cache,
                        slopes)
        out, k_cache, v_cache = alibi.alibi_cached_decode(q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1],
                                                          k_cache, v_cache, slopes)
        lo = max(first, p - window)  # the window's oldest position still cached
        positions = torch.arange(lo, p + 1)
        expect_tensor(call, k_cache, (B, H, p + 1 - lo, D), layout="returned k_cache [B, H, T + 1, D]")
        expect_tensor_equal(call, k_cache, k[:, :, lo - first:j + 1], AXES)
        expect_tensor_equal(call, v_cache, v[:, :, lo - first:j + 1], AXES)
        want = alibi_attention(q[:, :, j:j + 1], k[:, :, lo - first:j + 1], v[:, :, lo - first:j + 1], slopes,
                               torch.tensor([p]), positions)
        expect_close(call, out, want, AXES, atol=1e-5, rtol=1e-5,
                     why=f"ALiBi attention of the query at position {p} over positions {lo}..{p} (window of "
                         f"{window} + the new token), bias -slope·(query position - key position), recomputed "
                         f"from absolute positions; the cache holds raw keys, and sliding the window changes none")
        if k_cache.shape[2] > window:
            k_cache, v_cache = k_cache[:, :, 1:], v_cache[:, :, 1:]


@pytest.mark.kata("alibi_cached_decode")
@given(seed=st.integers(0, 50))
def test_alibi_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32(seed):
    B, H, D, T, pos = 2, 8, 64, 48, 100
    q, k, v = bf16_decode_problem(B, H, D, T, seed)
    slopes = alibi_slopes(H)
    call = call_str("alibi_cached_decode", q, k[:, :, T:], v[:, :, T:], k[:, :, :T], v[:, :, :T], slopes)
    out, k_cache, _ = alibi.alibi_cached_decode(q, k[:, :, T:], v[:, :, T:], k[:, :, :T].clone(), v[:, :, :T].clone(),
                                                slopes)
    expect(out.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16, call, (out.dtype, k_cache.dtype),
           "bf16 out and a bf16 cache: the inputs' dtype (compute in fp32, round once at the end)")
    want = alibi_attention(q.double(), k.double(), v.double(), slopes.double(), torch.tensor([pos]),
                           torch.arange(pos - T, pos + 1))

    def fp32_right():
        q32, k32, v32 = q.float(), k.float(), v.float()
        out32 = alibi.alibi_cached_decode(q32, k32[:, :, T:], v32[:, :, T:], k32[:, :, :T].clone(),
                                          v32[:, :, :T].clone(), slopes)[0]
        return fp32_close(out32, want, 1e-4 * float(want.abs().max()), 1e-4)  # want: float64 from these inputs

    expect_close_in_bf16(call, out, want, atol=2 ** -7 * float(want.abs().max()), rtol=0,
                         why="ALiBi attention computed in float64 from the bf16 inputs, the output rounded to bf16",
                         precision="every score is near 50, where bf16's spacing is 0.25, so the scores, the bias "
                                   "and the softmax must run in fp32 and only the output be rounded to bf16",
                         fp32_right=fp32_right)
