"""Maintainers' checks for kvref.triton_decode: the flash-decoding kernel against its spec.

Layout as in the Triton tutorials: build inputs, run the reference and the kernel, compare.
Without CUDA the kernel runs in Triton's CPU interpreter, so shapes stay small and example
counts modest; with CUDA the same tests run compiled on the GPU.

Tolerances (atol = rtol, against fp32 math on the same already-rounded inputs) are a few
units of roundoff u of the input dtype, from three sources: the output is rounded to the
dtype (u), the reference's output is too when compared with it (u), and the kernel rounds
each softmax probability to the dtype before its P @ V tensor-core product (at most u
relative per weight, and the weights sum to 1). Measured worst cases over 150 random
shapes were 1.3u for fp16 and 1.7u for bf16.
  fp32  u = 6e-8   tol 1e-5: only the summation order differs (split merge, tile sums)
  fp16  u = 4.9e-4 tol 2e-3 (about 4u)
  bf16  u = 3.9e-3 tol 2e-2 (about 5u)
"""

import importlib.util
import math
import os
import sys

import torch

if not torch.cuda.is_available():
    # triton.jit decides when a kernel is decorated, that is when kvref.triton_decode is first
    # imported, whether it compiles for a GPU or runs in the numpy interpreter; without CUDA
    # only the interpreter can run it, so ask for it before that import. setdefault leaves an
    # explicit TRITON_INTERPRET=0 (or 1) from the caller alone.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvref import triton_decode
from kvref.triton_decode import (
    BLOCK_N,
    MAX_SPLITS,
    WAVE_FILL,
    decode_attention,
    decode_attention_ref,
    programs_per_sm,
    splits_for_waves,
)

TOLERANCE = {  # dtype -> atol = rtol, see the module docstring
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}

def examples(at_ci: int) -> int:
    """The example count that follows the loaded hypothesis profile: `at_ci` under "ci" (the counts these
    checks were sized for under the interpreter), scaled by the profile's max_examples otherwise
    ("kata" half of it, "deep" about 17 times)."""
    try:
        ci = settings.get_profile("ci").max_examples
    except Exception:  # noqa: BLE001 - the root conftest registers "ci"; without it, the default profile
        ci = settings.default.max_examples
    return max(1, round(at_ci * settings.default.max_examples / ci))


BATCH = st.integers(1, 3)
KV_HEADS = st.integers(1, 3)
GROUP = st.integers(1, 4)  # query heads per KV head
CACHE_LEN = st.one_of(  # T: one token, the tile edges, and anything up to three tiles
    st.sampled_from([1, BLOCK_N - 1, BLOCK_N, BLOCK_N + 1]),
    st.integers(1, 3 * BLOCK_N),
)
HEAD_DIM = st.sampled_from([16, 32, 64, 128])
DTYPE = st.sampled_from(list(TOLERANCE))
NUM_SPLITS = st.one_of(st.none(), st.integers(1, 8))  # None: the wrapper's own choice
SCALE = st.one_of(st.none(), st.floats(0.05, 1.0))
SEED = st.integers(0, 2**16)


@pytest.fixture(scope="module")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, Hkv, G, T, D, dtype, device, seed, seq_lens=None):
    """q [B, H, D], k_cache and v_cache [B, Hkv, T, D], seq_lens [B] (all T unless given)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(device, dtype)
    k_cache = torch.randn(B, Hkv, T, D, generator=gen).to(device, dtype)
    v_cache = torch.randn(B, Hkv, T, D, generator=gen).to(device, dtype)
    seq_lens = torch.tensor([T] * B if seq_lens is None else seq_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seq_lens


def draw_inputs(data, device):
    """Labelled draws of a small ragged GQA decode problem; returns the inputs and the dtype."""
    B = data.draw(BATCH, label="B")
    Hkv = data.draw(KV_HEADS, label="Hkv")
    G = data.draw(GROUP, label="G")
    T = data.draw(CACHE_LEN, label="T")
    D = data.draw(HEAD_DIM, label="D")
    dtype = data.draw(DTYPE, label="dtype")
    seq_lens = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="seq_lens")
    seed = data.draw(SEED, label="seed")
    return make_inputs(B, Hkv, G, T, D, dtype, device, seed, seq_lens), dtype


def sdpa_decode(q, k_cache, v_cache, seq_lens, scale=None):
    """PyTorch's own attention in fp32, as an independent second spec: [B, H, D]."""
    B, H, D = q.shape
    T = k_cache.shape[2]
    valid = torch.arange(T, device=q.device) < seq_lens.view(B, 1)  # (B, T)
    out = F.scaled_dot_product_attention(
        q.float().view(B, H, 1, D),  # (B, H, 1, D): one query token
        k_cache.float(),
        v_cache.float(),
        attn_mask=valid.view(B, 1, 1, T),  # True = attend
        scale=scale,
        enable_gqa=True,  # query head h reads KV head h // (H // Hkv), as the kernel does
    )
    return out.view(B, H, D)


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what} ({dtype}): {m}"
    )


# %%
# The spec itself


@settings(max_examples=examples(100), deadline=None)
@given(data=st.data())
def test_reference_matches_sdpa_with_a_ragged_mask_in_fp32(data, device):
    (q, k_cache, v_cache, seq_lens), _ = draw_inputs(data, device)
    q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    scale = data.draw(SCALE, label="scale")
    expected = sdpa_decode(q, k_cache, v_cache, seq_lens, scale)
    actual = decode_attention_ref(q, k_cache, v_cache, seq_lens, scale)
    assert_close(actual, expected, torch.float32, "decode_attention_ref vs SDPA")


# %%
# The kernel against the spec


@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_kernel_matches_reference_for_ragged_gqa_batches(data, device):
    (q, k_cache, v_cache, seq_lens), dtype = draw_inputs(data, device)
    scale = data.draw(SCALE, label="scale")
    num_splits = data.draw(NUM_SPLITS, label="num_splits")
    expected = decode_attention_ref(q, k_cache, v_cache, seq_lens, scale)
    actual = decode_attention(q, k_cache, v_cache, seq_lens, scale, num_splits=num_splits)
    assert actual.dtype == dtype and actual.shape == q.shape
    assert_close(actual, expected, dtype, f"decode_attention(num_splits={num_splits}) vs reference")


@settings(max_examples=examples(25), deadline=None)
@given(data=st.data())
def test_kernel_matches_sdpa_for_ragged_gqa_batches(data, device):
    (q, k_cache, v_cache, seq_lens), dtype = draw_inputs(data, device)
    expected = sdpa_decode(q, k_cache, v_cache, seq_lens)
    actual = decode_attention(q, k_cache, v_cache, seq_lens)
    assert_close(actual, expected, dtype, "decode_attention vs SDPA")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda dtype: str(dtype).removeprefix("torch."))
def test_a_single_cached_token_is_returned_exactly(dtype, device):
    # softmax over one key is 1, so every head must return its KV head's value bit for bit.
    q, k_cache, v_cache, seq_lens = make_inputs(2, 2, 3, 1, 32, dtype, device, seed=0)
    actual = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=4)
    expected = v_cache[:, :, 0, :].repeat_interleave(3, dim=1)  # (B, H, D)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("num_splits", [2, 7, MAX_SPLITS])
def test_splits_past_the_end_of_every_sequence_change_nothing(num_splits, device):
    # T fits in one tile, so every split but the first is empty; their weight must be exactly
    # 0, leaving the one-split result (stored directly, no merge) bit for bit.
    T = BLOCK_N - 3
    q, k_cache, v_cache, seq_lens = make_inputs(2, 2, 2, T, 64, torch.float32, device, seed=1, seq_lens=[T, 3])
    one_split = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=1)
    many_splits = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=num_splits)
    assert torch.equal(many_splits, one_split)
    assert_close(many_splits, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float32, "vs reference")


def test_every_output_and_scratch_element_is_written(device, monkeypatch):
    # NaN wherever the kernel should write: an element left unwritten, or a partial result
    # the merge reads without its split having written it, shows up as NaN in the output.
    def nan_scratch(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(triton_decode, "_scratch", nan_scratch)
    # G = 3 and D = 80 leave padding rows and columns; seq_len 1 leaves 7 of 8 splits empty.
    q, k_cache, v_cache, seq_lens = make_inputs(2, 2, 3, 130, 80, torch.float16, device, seed=2, seq_lens=[1, 130])
    out = torch.full_like(q, float("nan"))
    actual = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=8, out=out)
    assert actual is out
    assert not actual.isnan().any(), f"unwritten (NaN) at {actual.isnan().nonzero().tolist()[:5]}"
    assert_close(actual, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float16, "vs reference")


@pytest.mark.parametrize("D", [48, 80, 256])
def test_head_dims_that_are_not_a_power_of_two_or_large_are_padded_and_masked(D, device):
    q, k_cache, v_cache, seq_lens = make_inputs(1, 2, 2, 70, D, torch.float32, device, seed=3, seq_lens=[70])
    actual = decode_attention(q, k_cache, v_cache, seq_lens)
    assert_close(actual, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float32, f"D = {D}")


def test_cache_views_with_spare_capacity_are_read_through_their_strides(device):
    q, big_k, big_v, _ = make_inputs(2, 2, 2, 100, 32, torch.float32, device, seed=4)
    seq_lens = torch.tensor([60, 33], dtype=torch.int64, device=device)
    k_cache, v_cache = big_k[:, :, :70], big_v[:, :, :70]  # capacity 100, T = 70: not contiguous
    expected = decode_attention_ref(q, k_cache.contiguous(), v_cache.contiguous(), seq_lens)
    assert_close(decode_attention(q, k_cache, v_cache, seq_lens), expected, torch.float32, "sliced cache")
    # A [B, T, Hkv, D] token-major cache seen as [B, Hkv, T, D].
    k_tokens, v_tokens = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    actual = decode_attention(q, k_tokens.transpose(1, 2), v_tokens.transpose(1, 2), seq_lens)
    assert_close(actual, expected, torch.float32, "token-major cache")


@pytest.mark.parametrize("num_splits", [1, 2])
def test_a_later_tile_with_larger_scores_rescales_what_was_summed_before(num_splits, device):
    # Keys grow along the sequence, so each tile of a split raises the running max and the
    # sums kept under the old max must be scaled down by exp2(m_old - m_new).
    T = 4 * BLOCK_N + 5
    q, k_cache, v_cache, seq_lens = make_inputs(2, 2, 2, T, 32, torch.float32, device, seed=5, seq_lens=[T, T - 9])
    ramp = torch.linspace(0.5, 3.0, T, device=device).view(1, 1, T, 1)  # (1, 1, T, 1)
    k_cache = k_cache * ramp
    actual = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=num_splits)
    assert_close(actual, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float32, "growing scores")


def test_large_scores_do_not_overflow_the_softmax(device):
    # Scores near 1e3: exp would overflow fp32 without the running max.
    q, k_cache, v_cache, seq_lens = make_inputs(1, 1, 4, 130, 64, torch.float32, device, seed=5, seq_lens=[129])
    q = q * 40
    actual = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=1)
    assert_close(actual, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float32, "large scores")


def test_one_split_stores_the_output_itself_without_scratch(device, monkeypatch):
    def no_scratch(shape, device):
        raise AssertionError(f"one split allocated scratch {shape}: it should store the output directly")

    monkeypatch.setattr(triton_decode, "_scratch", no_scratch)
    T = 3 * BLOCK_N + 7
    q, k_cache, v_cache, seq_lens = make_inputs(2, 2, 3, T, 32, torch.float16, device, seed=8, seq_lens=[T, 5])
    actual = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=1)
    assert_close(actual, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float16, "one split")


def test_the_most_splits_are_merged_by_the_last_program_of_each_head(device):
    # MAX_SPLITS splits of one tile each: every split holds keys, and the program that arrives
    # last on its head's counter merges all of them (the merge reads every split in one load).
    T = MAX_SPLITS * BLOCK_N
    q, k_cache, v_cache, seq_lens = make_inputs(1, 2, 2, T, 16, torch.float32, device, seed=9, seq_lens=[T])
    actual = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=MAX_SPLITS)
    assert_close(actual, decode_attention_ref(q, k_cache, v_cache, seq_lens), torch.float32, "MAX_SPLITS splits")


def test_the_arrival_counters_are_back_at_zero_after_every_call(device):
    # The last split of each head resets its counter; a counter left at k would make the next
    # call merge after only num_splits - k arrivals, reading partials not yet written.
    q, k_cache, v_cache, seq_lens = make_inputs(3, 2, 2, 100, 16, torch.float32, device, seed=10, seq_lens=[100, 1, 64])
    first = decode_attention(q, k_cache, v_cache, seq_lens, num_splits=3)
    counters = triton_decode._arrivals(3 * 2, q.device)
    assert not counters.any(), f"counters left at {counters[:6].tolist()}"
    assert torch.equal(decode_attention(q, k_cache, v_cache, seq_lens, num_splits=3), first)


# %%
# How many splits


@pytest.mark.parametrize(
    "regs, smem, num_warps, expected",
    [
        (112, 62464, 4, 3),  # the bf16 kernel compiled for sm_90a: shared memory decides
        (72, 41984, 4, 5),  # 41 KiB + 1 KiB reserved: 233472 // 43008 = 5
        (168, 1024, 4, 3),  # 168 registers round to 5376 per warp: 65536 // 21504 = 3
        (32, 0, 4, 16),  # 2048 threads per SM: 16 programs of 128 threads
        (16, 0, 1, 32),  # and never more than 32 resident blocks
    ],
)
def test_programs_per_sm_follow_the_h100_limits(regs, smem, num_warps, expected):
    got = programs_per_sm(regs, smem, num_warps)
    assert got == expected, f"programs_per_sm({regs}, {smem}, {num_warps}) returned {got}, expected {expected}"


@pytest.mark.parametrize(
    "B, Hkv, T, expected",
    [
        (1, 8, 16384, 47),  # 512 tiles of 32 keys: 47 splits of 11 tiles, 376 of 396 slots
        (1, 8, 4096, 43),  # 128 tiles: 43 splits of 3 tiles (the last of 2), 344 of 396
        (64, 8, 4096, 3),  # 1536 programs: 3.88 waves of 396
        (1, 8, 40, 2),  # 2 tiles: no more than 2 splits, whatever the GPU
    ],
)
def test_the_split_count_fills_whole_waves_of_an_h100(B, Hkv, T, expected):
    got = splits_for_waves(B, Hkv, T, sms=132, programs_per_sm=3)
    assert got == expected, f"splits_for_waves({B}, {Hkv}, {T}, sms=132, programs_per_sm=3) returned {got}, expected {expected}"


@settings(max_examples=examples(60), deadline=None)
@given(B=st.integers(1, 128), Hkv=st.integers(1, 64), T=st.integers(1, 2**17), pps=st.integers(1, 8))
def test_the_split_count_leaves_no_split_empty_and_fills_its_waves_when_it_can(B, Hkv, T, pps):
    splits = splits_for_waves(B, Hkv, T, sms=132, programs_per_sm=pps)
    tiles = -(-T // BLOCK_N)
    assert 1 <= splits <= min(MAX_SPLITS, tiles)
    assert -(-tiles // -(-tiles // splits)) == splits, "a split with no tile: the tiles were cut unevenly"
    waves = B * Hkv * splits / (132 * pps)
    if waves / math.ceil(waves) < WAVE_FILL:  # then no other split count fills better
        for other in range(1, min(MAX_SPLITS, tiles) + 1):
            other_waves = B * Hkv * -(-tiles // -(-tiles // other)) / (132 * pps)
            assert other_waves / math.ceil(other_waves) <= waves / math.ceil(waves) + 1e-12


# %%
# Validation: wrong inputs fail before any launch, naming what was expected


def _bad_inputs(change, device):
    """Valid inputs (B=2, H=8, Hkv=4, T=128, D=64, fp32) with one thing broken by `change`."""
    q, k_cache, v_cache, seq_lens = make_inputs(2, 4, 2, 128, 64, torch.float32, device, seed=6)
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens}
    change(args)
    return args


VALIDATION_CASES = {  # id: (change, extra kwargs, exception, text the message must contain)
    "q_without_head_axis": (lambda a: a.update(q=a["q"][:, 0]), {}, ValueError, "q must be [B, H, D]"),
    "k_cache_with_wrong_head_dim": (
        lambda a: a.update(k_cache=a["k_cache"][..., :32]), {}, ValueError, "k_cache must be [B, Hkv, T, D] = [2, 4, 128, 64]",
    ),
    "k_cache_with_wrong_batch": (
        lambda a: a.update(k_cache=a["k_cache"][:1]), {}, ValueError, "k_cache must be [B, Hkv, T, D] = [2, 4, 128, 64]",
    ),
    "k_cache_without_head_axis": (
        lambda a: a.update(k_cache=a["k_cache"][:, 0]), {}, ValueError, "k_cache must be [B, Hkv, T, D], got shape [2, 128, 64]",
    ),
    "v_cache_shorter_than_k_cache": (
        lambda a: a.update(v_cache=a["v_cache"][:, :, :64]), {}, ValueError, "v_cache must be [B, Hkv, T, D] = [2, 4, 128, 64]",
    ),
    "heads_not_divisible": (lambda a: a.update(q=a["q"][:, :6]), {}, ValueError, "H = 6 must be a multiple of KV heads Hkv = 4"),
    "head_dim_too_small": (
        lambda a: a.update(q=a["q"][..., :8], k_cache=a["k_cache"][..., :8], v_cache=a["v_cache"][..., :8]),
        {}, ValueError, "head dim D must be in 16..256",
    ),
    "cache_dtype_differs": (lambda a: a.update(k_cache=a["k_cache"].half()), {}, TypeError, "k_cache must have dtype torch.float32"),
    "unsupported_dtype": (
        lambda a: a.update(q=a["q"].double(), k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double()),
        {}, TypeError, "float16, bfloat16 or float32",
    ),
    "seq_len_zero": (lambda a: a["seq_lens"].__setitem__(0, 0), {}, ValueError, "seq_lens must lie in 1..T = 1..128"),
    "seq_len_past_cache": (lambda a: a["seq_lens"].__setitem__(1, 129), {}, ValueError, "seq_lens must lie in 1..T = 1..128"),
    "seq_lens_wrong_shape": (lambda a: a.update(seq_lens=a["seq_lens"][:1]), {}, ValueError, "seq_lens must be [B] = [2]"),
    "seq_lens_float": (lambda a: a.update(seq_lens=a["seq_lens"].float()), {}, TypeError, "seq_lens must be an integer tensor"),
    "num_splits_zero": (lambda a: None, {"num_splits": 0}, ValueError, f"num_splits must be an int in 1..{MAX_SPLITS}"),
    "num_splits_too_many": (lambda a: None, {"num_splits": MAX_SPLITS + 1}, ValueError, "num_splits must be an int"),
    "out_wrong_shape": (
        lambda a: None, {"out": torch.empty(2, 8, 32)}, ValueError, "out must be [B, H, D] = [2, 8, 64]",
    ),
}
KERNEL_ONLY = {"num_splits_zero", "num_splits_too_many", "out_wrong_shape"}  # wrapper options


@pytest.mark.parametrize(
    "case, fn",
    [(case, decode_attention) for case in VALIDATION_CASES]
    + [(case, decode_attention_ref) for case in VALIDATION_CASES if case not in KERNEL_ONLY],
    ids=lambda x: x if isinstance(x, str) else {decode_attention: "kernel", decode_attention_ref: "reference"}[x],
)
def test_invalid_inputs_raise_naming_the_expected_shape(case, fn, device):
    change, kwargs, exception, message = VALIDATION_CASES[case]
    if "out" in kwargs:
        kwargs = {"out": kwargs["out"].to(device)}
    args = _bad_inputs(change, device)
    with pytest.raises(exception) as info:
        fn(**args, **kwargs)
    assert message in str(info.value), f"called {fn.__name__} with {case}, raised {info.value!r}, expected {message!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: CUDA")
def test_tensors_on_different_devices_are_refused():
    args = _bad_inputs(lambda a: None, "cuda")
    args["seq_lens"] = args["seq_lens"].cpu()
    with pytest.raises(ValueError, match="seq_lens must be on cuda"):
        decode_attention(**args)


def test_module_imports_without_triton_and_only_the_kernel_says_so(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_decode_without_triton", triton_decode.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q, k_cache, v_cache, seq_lens = make_inputs(1, 1, 2, 5, 16, torch.float32, device, seed=7)
    expected = decode_attention_ref(q, k_cache, v_cache, seq_lens)
    assert torch.equal(module.decode_attention_ref(q, k_cache, v_cache, seq_lens), expected)
    with pytest.raises(ImportError, match="needs triton"):
        module.decode_attention(q, k_cache, v_cache, seq_lens)
