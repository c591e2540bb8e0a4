"""card09: the Triton kernel kata.

Every test launches your kernel through kvref.decode_launch (grid (B, Hkv, num_splits)); on a
machine without CUDA it runs under Triton's CPU interpreter. Correctness is checked against
PyTorch's scaled_dot_product_attention (the merged output) and against the definition in float64
(each split's partial). IO-awareness is measured, not assumed: under the interpreter every
`tl.load` is counted, lane by lane, and attributed to K or V by address.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import Mismatch, Shown, call_str, expect, expect_close
from kvref.decode_launch import count_loads, decode_with_kernel, launch_split_kernel, split_len_for

impl = kvkata.load("card09_io_awareness.kernel")
# A kernel that divides 0 by 0 makes numpy warn inside Triton's interpreter, once per test: the failure
# already says where a NaN is and what was expected there.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Each example interprets a few dozen programs: about 0.07 to 0.3 s on the CPU. The draws scale with the
# profile (the learner's default 15 -> 6, ci's 30 -> 12, deep's 500 -> 60, under the kata timeout); the
# @example inputs, each built to catch one plausible wrong kernel (checks/test_triton_kata.py), always run.
INTERPRETED = settings(max_examples=max(1, min(settings().max_examples * 2 // 5, 60)))


def problem(B, Hkv, G, D, T, seq_lens, dtype=torch.float32, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=g) * q_scale
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    return (q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE))


def sdpa(q, k, v, seq_lens, scale=None):
    """PyTorch's attention of each sequence's one query over its first seq_lens[b] positions, float64."""
    B, H, D = q.shape
    T = k.shape[2]
    mask = (torch.arange(T, device=q.device) < seq_lens.view(B, 1).long()).view(B, 1, 1, T)
    return F.scaled_dot_product_attention(q.double().unsqueeze(2), k.double(), v.double(), attn_mask=mask,
                                          enable_gqa=True, scale=scale)[:, :, 0]


def likely_cause(out, q, k, v, seq_lens):
    """For a wrong `out`: the plausible mistake it matches, in words ("" if none does)."""
    B, H, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    got = out.double()
    if not torch.isfinite(got).all():
        return ""
    modulo = [h % Hkv for h in range(H)]  # query head h reading KV head h % Hkv instead of h // G
    wrong = [
        (lambda: sdpa(q, k, v, seq_lens, scale=1.0),
         "scores not multiplied by sm_scale (it matches attention with scale 1)"),
        (lambda: sdpa(q, k[:, modulo], v[:, modulo], seq_lens),
         "query head h reading KV head h % Hkv (it matches that); heads kv_head * G .. kv_head * G + G - 1 share KV head kv_head"),
        (lambda: sdpa(q, k, v, torch.full_like(seq_lens, T)),
         "seq_lens ignored (it matches attention over all T positions): stop each sequence at seq_lens[b]"),
    ]
    for want, words in wrong:
        if torch.allclose(got, want(), atol=1e-3, rtol=1e-3):
            return f". Your output looks like {words}"
    if CUDA and q.dtype == torch.float32 and (got - sdpa(q, k, v, seq_lens)).abs().max() < 2e-2:
        return (". On a GPU, errors near 1e-3 in float32 are tl.dot's default TF32 (a 10-bit mantissa): "
                "pass input_precision=\"ieee\"")
    return ""


def definition_partials(q, k, v, seq_lens, num_splits, split_len):
    """(part_out [B, H, N, D], part_lse [B, H, N]) from the kata's definition, in float64."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, num_splits, D, dtype=torch.float64)
    lse = torch.full((B, H, num_splits), -math.inf, dtype=torch.float64)
    for b in range(B):
        for s in range(num_splits):
            lo, hi = s * split_len, min((s + 1) * split_len, int(seq_lens[b]))
            if hi <= lo:
                continue
            kk = k[b, :, lo:hi].double().cpu().repeat_interleave(G, dim=0)  # (H, n, D)
            vv = v[b, :, lo:hi].double().cpu().repeat_interleave(G, dim=0)
            x = torch.einsum("hd,hnd->hn", q[b].double().cpu(), kk) / math.sqrt(D)
            lse[b, :, s] = torch.logsumexp(x, dim=-1)
            out[b, :, s] = torch.einsum("hn,hnd->hd", torch.softmax(x, dim=-1), vv)
    return out, lse


def shape_str(B, Hkv, G, D, T, seq_lens, num_splits, block_n, dtype):
    return (f"q [{B}, {Hkv * G}, {D}], k/v [{B}, {Hkv}, {T}, {D}] {str(dtype).removeprefix('torch.')}, "
            f"seq_lens={list(seq_lens)}, num_splits={num_splits}, BLOCK_N={block_n} (G={G})")


def run(B, Hkv, G, D, T, seq_lens, num_splits, block_n=16, dtype=torch.float32, **kw):
    q, k, v, sl = problem(B, Hkv, G, D, T, seq_lens, dtype, **kw)
    out, part_out, part_lse = decode_with_kernel(impl.gqa_decode_kernel, q, k, v, sl, num_splits=num_splits,
                                                 block_n=block_n)
    return (q, k, v, sl), out, part_out, part_lse


@st.composite
def problems(draw, max_T=80):
    B = draw(st.integers(1, 3), label="B")
    Hkv = draw(st.integers(1, 3), label="Hkv")
    G = draw(st.sampled_from([1, 2, 3, 4, 8]), label="G")
    D = draw(st.sampled_from([16, 32, 64]), label="D")
    T = draw(st.integers(1, max_T), label="T")
    seq_lens = draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="seq_lens")
    num_splits = draw(st.integers(1, 5), label="num_splits")
    block_n = draw(st.sampled_from([16, 32]), label="block_n")
    return B, Hkv, G, D, T, seq_lens, num_splits, block_n


EXAMPLE = (2, 2, 4, 32, 70, [70, 9], 3, 16)  # the second sequence fills one tile of split 0; splits 1, 2 empty


@INTERPRETED
@pytest.mark.kata("gqa_decode_kernel")
@given(p=problems())
@example(p=EXAMPLE)
@example(p=(1, 1, 1, 16, 1, [1], 1, 16))
def test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32(p):
    B, Hkv, G, D, T, seq_lens, num_splits, block_n = p
    (q, k, v, sl), out, _, _ = run(*p)
    want = sdpa(q, k, v, sl)
    cause = "" if torch.allclose(out.double(), want, atol=1e-5, rtol=1e-4) else likely_cause(out, q, k, v, sl)
    expect_close(call_str("gqa_decode_kernel", Shown(shape_str(*p, torch.float32))) + ", merged by kvref -> out",
                 out, want, ("batch", "head", "dim"), atol=1e-5, rtol=1e-4,
                 why="PyTorch's scaled_dot_product_attention (float64) of each query head over the first seq_lens[b] "
                     "positions of KV head h // G" + cause)


@INTERPRETED
@pytest.mark.kata("gqa_decode_kernel")
@given(p=problems())
@example(p=EXAMPLE)
def test_gqa_decode_kernel_writes_every_splits_normalised_output_and_natural_log_sum_exp(p):
    B, Hkv, G, D, T, seq_lens, num_splits, block_n = p
    (q, k, v, sl), _, part_out, part_lse = run(*p)
    split_len = split_len_for(T, num_splits, block_n)
    want_out, want_lse = definition_partials(q, k, v, sl, num_splits, split_len)
    call = call_str("gqa_decode_kernel", Shown(shape_str(*p, torch.float32))) + f", split_len={split_len}"
    never = torch.isnan(part_lse.cpu())
    if never.any():
        b, h, s = (int(i) for i in never.nonzero()[0])
        raise Mismatch(f"called {call}: part_lse[{b}, {h}, {s}] was never written (still the launcher's NaN). "
                       f"Every program writes all G of its query heads, and an empty split writes -inf and zeros")
    got_lse, got_out = part_lse.double().cpu(), part_out.double().cpu()
    finite = torch.isfinite(want_lse)
    base2 = torch.allclose(got_lse[finite], want_lse[finite] / math.log(2), atol=1e-4, rtol=1e-4)
    expect_close(call + " -> part_lse", got_lse.where(finite, 0.0), want_lse.where(finite, 0.0),
                 ("batch", "head", "split"), atol=1e-4, rtol=1e-5,
                 why="log(sum_t exp(x_t)) over the split's positions, natural log" +
                     (" (yours is the base-2 log-sum-exp: divide by log2(e) = 1.4427, or multiply by ln 2)" if base2 else ""))
    expect(bool((got_lse[~finite] == -math.inf).all()), call + " -> part_lse", got_lse,
           f"-inf for every empty split ({int((~finite).sum())} of them: splits starting at or past seq_lens[b])")
    expect_close(call + " -> part_out", got_out, want_out, ("batch", "head", "split", "dim"), atol=1e-5, rtol=1e-4,
                 why="the split's softmax-normalised output, sum_t exp(x_t - lse) v_t; zeros for an empty split")


@INTERPRETED
@pytest.mark.kata("gqa_decode_kernel")
@given(p=problems(max_T=64), seed=st.integers(0, 9))
@example(p=EXAMPLE, seed=1)
def test_gqa_decode_kernel_in_float16_accumulates_in_float32(p, seed):
    (q, k, v, sl), out, part_out, part_lse = run(*p, dtype=torch.float16, seed=seed)
    call = call_str("gqa_decode_kernel", Shown(shape_str(*p, torch.float16)))
    expect(out.dtype == torch.float16 and part_out.dtype == torch.float32, call, out.dtype,
           "the launcher's dtypes: float32 partials, merged to q's dtype")
    want = sdpa(q, k, v, sl)
    why = ("attention over the float16 inputs computed in float64; the kernel may round only the probabilities fed "
           "to P·V to float16 (as FlashAttention does), everything it sums stays float32")
    if not torch.allclose(out.double(), want, atol=2e-3, rtol=2e-3):  # float16 is the cause only if float32 passes
        q32, k32, v32 = q.float(), k.float(), v.float()
        out32 = decode_with_kernel(impl.gqa_decode_kernel, q32, k32, v32, sl, num_splits=p[6], block_n=p[7])[0]
        if not torch.allclose(out32.double(), sdpa(q32, k32, v32, sl), atol=1e-5, rtol=1e-4):
            why = ("attention over the float16 inputs computed in float64. The same call with these inputs in float32 "
                   "fails too, so float16 precision is not the cause" + likely_cause(out32, q32, k32, v32, sl))
    expect_close(call + ", merged by kvref -> out", out, want, ("batch", "head", "dim"), atol=2e-3, rtol=2e-3, why=why)


@pytest.mark.kata("gqa_decode_kernel")
def test_gqa_decode_kernel_keeps_a_running_maximum_when_later_tiles_score_hundreds_higher():
    # One KV head, 4 query heads, 64 positions in 4 tiles of 16: tile j's scores are about 120 * j,
    # so the last tile scores ~360 above the first. exp(89) overflows float32: a softmax without
    # a maximum, or one that keeps the first tile's maximum, turns into inf and NaN.
    B, Hkv, G, D, T = 1, 1, 4, 16, 64
    g = torch.Generator().manual_seed(3)
    q = torch.zeros(B, G, D)
    q[0, :, 0] = torch.tensor([4.0, 3.6, 4.4, 3.2])  # four heads, slightly different scales
    k = torch.randn(B, Hkv, T, D, generator=g)
    tile = torch.arange(T).div(16, rounding_mode="floor").float()
    k[0, 0, :, 0] = 120.0 * tile * math.sqrt(D) / 4.0 + torch.randn(T, generator=g)  # head 0 scores ~120 * tile
    v = torch.randn(B, Hkv, T, D, generator=g)
    q, k, v, sl = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.tensor([T], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 2):
        out, _, part_lse = decode_with_kernel(impl.gqa_decode_kernel, q, k, v, sl, num_splits=num_splits, block_n=16)
        call = call_str("gqa_decode_kernel", "scores rising by ~120 per tile of 16, to ~400 in the last",
                        f"num_splits={num_splits}")
        expect(bool(torch.isfinite(out).all()), call, out,
               "finite outputs: subtract a running maximum, and rescale what was summed (exp(m_old - m_new)) "
               "whenever a tile raises it")
        expect_close(call + " -> out", out, sdpa(q, k, v, sl), ("batch", "head", "dim"), atol=1e-4, rtol=1e-4,
                     why="PyTorch's scaled_dot_product_attention in float64")


# --- pinned (issue 21): the launch's sm_scale, and float32 accumulation over many tiles ------------

@pytest.mark.kata("gqa_decode_kernel")
@pytest.mark.parametrize("scale", [0.05, 1.3])
def test_gqa_decode_kernel_scales_scores_by_the_sm_scale_it_is_given(scale):
    """The launcher passes sm_scale (1 / sqrt(D) by default; a model may use another, e.g. Gemma's
    query_pre_attn_scalar or a softcap): a kernel that computes 1 / sqrt(D) itself passes every other test."""
    p = (2, 2, 3, 32, 40, [40, 17], 2, 16)
    B, Hkv, G, D, T, seq_lens, num_splits, block_n = p
    q, k, v, sl = problem(B, Hkv, G, D, T, seq_lens, seed=5)
    out, part_out, part_lse = decode_with_kernel(impl.gqa_decode_kernel, q, k, v, sl, num_splits=num_splits,
                                                 block_n=block_n, scale=scale)
    want = sdpa(q, k, v, sl, scale=scale)
    cause = ""
    if not torch.allclose(out.double(), want, atol=1e-5, rtol=1e-4):
        if torch.allclose(out.double(), sdpa(q, k, v, sl), atol=1e-4, rtol=1e-4):
            cause = f". Yours matches 1 / sqrt(D) = {D ** -0.5:.4g}: multiply the scores by the sm_scale argument"
        else:
            cause = likely_cause(out, q, k, v, sl)
    expect_close(call_str("gqa_decode_kernel", Shown(shape_str(*p, torch.float32)), f"sm_scale={scale}")
                 + ", merged by kvref -> out", out, want, ("batch", "head", "dim"), atol=1e-5, rtol=1e-4,
                 why=f"PyTorch's scaled_dot_product_attention (float64) with scale={scale}" + cause)


def emulated_split(q, k, v, block_n, acc_dtype=torch.float32, score_dtype=torch.float32):
    """One split's output computed tile by tile as a kernel does, from float16 inputs ([1, G, D], [1, 1, T, D]):
    float32 scores (or rounded to `score_dtype`), p rounded to float16 for P·V, the output sum kept in `acc_dtype`."""
    D, T = q.shape[-1], k.shape[2]
    qf = q[0].float()
    m, l = torch.full((q.shape[1],), -math.inf), torch.zeros(q.shape[1])
    acc = torch.zeros(q.shape[1], D, dtype=acc_dtype)
    for n0 in range(0, T, block_n):
        x = (qf @ k[0, 0, n0:n0 + block_n].float().T * D ** -0.5).to(score_dtype).float()  # (G, BLOCK_N)
        m_new = torch.maximum(m, x.max(1).values)
        alpha, p = torch.exp(m - m_new), torch.exp(x - m_new[:, None])
        l = l * alpha + p.sum(1)
        acc = (acc.float() * alpha[:, None] + p.half().float() @ v[0, 0, n0:n0 + block_n].float()).to(acc_dtype)
        m = m_new
    return (acc.float() / l[:, None]).double()  # (G, D)


@pytest.mark.kata("gqa_decode_kernel")
def test_gqa_decode_kernel_in_float16_keeps_scores_and_sums_in_float32_over_many_tiles():
    """Two float16 sequences of 512 positions, 16 tiles of 32 each. Sequence 0's values share an offset of 32,
    so the output sum grows to ~16,000, where float16's spacing is 16: a sum kept in float16 drifts.
    Sequence 1's scores share an offset of 200 (q·k/sqrt(D) ~ 200 + a few), where float16's spacing is 0.125:
    scores rounded to float16 move every weight by up to 6%. The tolerance of each sits between the errors
    of the two emulated kernels, float32 and float16, computed here."""
    B, Hkv, G, D, T, block_n = 2, 1, 2, 16, 512, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, G, D, generator=g) * 0.5
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    v[0] += 32.0  # a common offset in the values
    q[1, :, 0], k[1, :, :, 0] = 40.0, 20.0  # a common offset in the scores: 40 · 20 / sqrt(16) = 200
    q, k, v = q.half().to(DEVICE), k.half().to(DEVICE), v.half().to(DEVICE)
    sl = torch.full((B,), T, dtype=torch.int32, device=DEVICE)
    _, part_out, _ = decode_with_kernel(impl.gqa_decode_kernel, q, k, v, sl, num_splits=1, block_n=block_n)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    call = call_str("gqa_decode_kernel", Shown(shape_str(B, Hkv, G, D, T, [T, T], 1, block_n, torch.float16)))
    for b, wrong, what in ((0, dict(acc_dtype=torch.float16), "values offset by 32: the output sum (acc) kept in "
                            "float16"), (1, dict(score_dtype=torch.float16), "scores offset by 200: scores rounded "
                                         "to float16 before the softmax")):
        exact = sdpa(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(), sl[b:b + 1].cpu())[0]  # (G, D)
        err32 = (emulated_split(q[b:b + 1], k[b:b + 1], v[b:b + 1], block_n) - exact).abs().max().item()
        err16 = (emulated_split(q[b:b + 1], k[b:b + 1], v[b:b + 1], block_n, **wrong) - exact).abs().max().item()
        assert err16 > 30 * err32, (f"kvkata maintainers: sequence {b} no longer tells float16 from float32 "
                                    f"({err16:.2e} vs {err32:.2e})")
        tol = math.sqrt(err32 * err16)  # the geometric mean: a factor sqrt(err16 / err32) from each
        expect_close(f"{call}, sequence {b} ({what.split(':')[0]}) -> part_out", part_out[b, :, 0].cpu(), exact,
                     ("head", "dim"), atol=tol, rtol=0,
                     why=f"attention in float64 from the float16 inputs, within {tol:.2g}: emulated, a kernel with "
                         f"float32 scores and sums is {err32:.1e} off, one with {what.split(': ')[1]} {err16:.1e}. "
                         "Keep m, l, acc and the scores in float32 (tl.dot accumulates in float32 by default)")


# --- IO-awareness: the bytes of K and V your kernel loads ----------------------------------------

IO_CASES = [  # (B, Hkv, G, D, T, seq_lens, num_splits, block_n)
    (2, 2, 4, 16, 128, [128, 61], 2, 16),
    (1, 1, 8, 32, 96, [96], 1, 32),
    (1, 2, 2, 16, 160, [150], 3, 16),
]


def count_kernel_loads(case):
    """(K bytes, V bytes, valid bytes of each) loaded by the kernel under the interpreter, per case."""
    B, Hkv, G, D, T, seq_lens, num_splits, block_n = case
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, Hkv * G, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    with count_loads(k=k, v=v) as counted:
        launch_split_kernel(impl.gqa_decode_kernel, q, k, v, sl, num_splits=num_splits, block_n=block_n)
    return counted.bytes["k"], counted.bytes["v"]


def count_in_an_interpreter_process(cases):
    """On a CUDA machine triton was imported compiled; count under the interpreter in a child process."""
    code = ("import json, os, sys; os.environ['TRITON_INTERPRET'] = '1'; os.environ['KVKATA_MODE'] = sys.argv[1]\n"
            "sys.path.insert(0, sys.argv[2]); import importlib\n"
            "t = importlib.import_module('katas.card09_io_awareness.test_card09_kernel')\n"
            "print(json.dumps([t.count_kernel_loads(c) for c in json.loads(sys.argv[3])]))")
    proc = subprocess.run([sys.executable, "-c", code, kvkata.mode(), str(kvkata.ROOT), json.dumps(cases)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"counting under the interpreter in a child process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.kata("gqa_decode_kernel")
def test_gqa_decode_kernel_reads_k_and_v_once_for_all_g_query_heads():
    if CUDA:
        launch_split_kernel(impl.gqa_decode_kernel, *problem(1, 1, 1, 16, 16, [16]), num_splits=1)  # a stub raises here
        counts = count_in_an_interpreter_process(IO_CASES)
    else:
        counts = [count_kernel_loads(case) for case in IO_CASES]
    for case, (k_bytes, v_bytes) in zip(IO_CASES, counts):
        B, Hkv, G, D, T, seq_lens, num_splits, block_n = case
        itemsize = 4
        valid = sum(seq_lens) * Hkv * D * itemsize  # each of K and V
        tile_slack = B * Hkv * num_splits * block_n * D * itemsize  # one tile per program
        call = call_str("gqa_decode_kernel", Shown(shape_str(*case, torch.float32)))
        for name, got in (("K", k_bytes), ("V", v_bytes)):
            ratio = got / valid
            hint = (f" That is {ratio:.2f}x the cache: with G = {G} query heads per KV head, a kernel that loads each "
                    f"tile once per query head reads it G times. Load the tile once and score all G heads against it "
                    f"([BLOCK_G, D] queries x [D, BLOCK_N] keys)." if ratio > 1.5 else "")
            expect(got <= valid + tile_slack, call, f"{got:,} bytes of {name} loaded",
                   f"at most the {valid:,} valid bytes of {name} (sum(seq_lens) x Hkv x D x 4 B) plus one BLOCK_N "
                   f"tile per program ({tile_slack:,} B), counted lane by lane under Triton's interpreter." + hint)
            expect(got >= valid, call, f"{got:,} bytes of {name} loaded",
                   f"every valid position read: {valid:,} bytes of {name}")


# --- on a GPU: the bandwidth ---------------------------------------------------------------------

BANDWIDTH_FRACTION = 0.5  # of the device's copy bandwidth, measured in the same run


@pytest.mark.kata("gqa_decode_kernel")
def test_gqa_decode_kernel_on_a_cuda_device_streams_the_cache_at_half_the_copy_bandwidth():
    # First a small problem on whatever runs here (the interpreter without CUDA): a stub raises.
    p = (1, 2, 4, 32, 40, [32], 2, 16)
    (q, k, v, sl), out, _, _ = run(*p)
    want = sdpa(q, k, v, sl)
    cause = "" if torch.allclose(out.double(), want, atol=1e-5, rtol=1e-4) else likely_cause(out, q, k, v, sl)
    expect_close(call_str("gqa_decode_kernel", Shown(shape_str(*p, torch.float32))) + " -> out", out, want,
                 ("batch", "head", "dim"), atol=1e-5, rtol=1e-4,
                 why="PyTorch's scaled_dot_product_attention (float64). Before any bandwidth is measured, a small "
                     "run's values must be right; this kata's other tests say more about what is wrong" + cause)
    if not CUDA:
        pytest.skip("no CUDA device: the bandwidth of the compiled kernel is measured only on a GPU (the tests above "
                    "check its values and count its bytes under the interpreter)")
    # Llama-3-8B's attention shape at a long context: B = 1, 32 query heads over 8 KV heads, D = 128, 128k positions.
    B, H, Hkv, D, T = 1, 32, 8, 128, 131072
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    sl = torch.full((B,), T, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    num_splits = min(64, -(-2 * sms // (B * Hkv)))  # two programs per SM

    def timed(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[reps // 2]

    t_kernel = timed(lambda: launch_split_kernel(impl.gqa_decode_kernel, q, k, v, sl, num_splits=num_splits, block_n=64))
    dst = torch.empty_like(k)
    t_copy = timed(lambda: dst.copy_(k))
    kernel_bw = (k.nbytes + v.nbytes) / t_kernel
    copy_bw = 2 * k.nbytes / t_copy  # a copy reads and writes every byte
    expect(kernel_bw >= BANDWIDTH_FRACTION * copy_bw, call_str("gqa_decode_kernel", "B=1, H=32, Hkv=8, D=128, T=131072 "
           f"fp16 on {torch.cuda.get_device_name()}", f"num_splits={num_splits}", "BLOCK_N=64"),
           f"{kernel_bw / 1e9:,.0f} GB/s of K and V ({t_kernel * 1e6:.0f} us)",
           f"at least {BANDWIDTH_FRACTION:.0%} of the copy bandwidth measured now, {copy_bw / 1e9:,.0f} GB/s")
