"""card09: the Triton kata, a flash-decoding kernel that reads the cache once for all G query heads.

Decode attention does a handful of FLOPs per byte of K and V it reads, in proportion to G (the
first kata of this card counts them), so a decode kernel has one job: stream the cache once, at
the speed of the memory. This
kata is the body of such a kernel, in Triton (https://triton-lang.org). `kvref.decode_launch`
allocates, launches and merges; you write what one program does.

The launch (kvref/decode_launch.py, `launch_split_kernel`; read it, it is not a spoiler):

    gqa_decode_kernel[(B, Hkv, num_splits)](q, k_cache, v_cache, seq_lens, part_out, part_lse,
                                            sm_scale, split_len, <strides>, G=, D=, BLOCK_G=, BLOCK_N=)

    q         [B, H, D]        one new query token per sequence and query head
    k_cache   [B, Hkv, T, D]   v_cache the same; query head h reads KV head h // G, G = H / Hkv
    seq_lens  [B] int32        sequence b's valid positions are 0 .. seq_lens[b] - 1 (1 <= seq_lens[b] <= T)
    part_out  [B, H, num_splits, D] float32, all NaN on entry
    part_lse  [B, H, num_splits]    float32, all NaN on entry

The head dim is contiguous in every tensor (stride 1: the launcher checks), so the strides you
are given are those of the other axes. D is a power of two in 16..256. On the CPU the kernel runs
under Triton's interpreter (`kvkata`'s tests do that on any machine; float32 and float16); on a
CUDA device it is compiled, and one test measures its bandwidth there.

Flash-Decoding (Dao, Haziza, Massa, Sizov 2023): program (b, kv_head, s) owns positions
[s * split_len, (s + 1) * split_len) of sequence b, cut at seq_lens[b] (split_len is a multiple
of BLOCK_N; a short sequence leaves its last splits empty). It runs an online softmax over its
positions and writes a partial result per query head; kvref merges the partials of all splits
with the log-sum-exp merge (the merge_split_partials kata). IO-awareness: the test counts, under
the interpreter, every byte your loads read from K and V. The budget is the cache's valid bytes
plus one BLOCK_N tile per program: a kernel that reads each K/V tile once per query head reads
the cache G times and fails.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gqa_decode_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    sm_scale, split_len,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: sequence b = program_id(0), KV head program_id(1), split s = program_id(2).

    For each query head h = kv_head * G + g (g < G) that reads this KV head, over the split's
    positions t in [s * split_len, min((s + 1) * split_len, seq_lens[b])):
      scores    x_t = sm_scale * (q[b, h] . k_cache[b, kv_head, t])
      part_lse[b, h, s]    = log(sum_t exp(x_t))                      natural log, float32
      part_out[b, h, s, :] = sum_t exp(x_t - lse) * v_cache[b, kv_head, t, :]   float32
    A split with no positions writes part_lse = -inf and part_out = 0.

    Load each [BLOCK_N, D] tile of K and V once and use it for all G query heads: hold the G
    queries as a [BLOCK_G, D] block (BLOCK_G is G padded to a power of two >= 16, the smallest
    tile tl.dot takes; mask rows g >= G on load and store). Scores can reach the hundreds:
    keep a running maximum. Accumulate in float32 whatever the inputs' dtype. On float32 inputs
    pass input_precision="ieee" to tl.dot: on a GPU its default is TF32 (a 10-bit mantissa,
    errors near 1e-3, which the float32 tests' 1e-5 reject); the CPU interpreter is exact either way.
    """
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: a long batch's cache passes 2**31 elements
    kv_head = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)  # start >= end: an empty split, the loop never runs

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_g = offs_g < G  # rows G..BLOCK_G-1 are padding: zero queries, never stored
    heads = kv_head * G + offs_g  # the query heads that read this KV head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None], other=0.0)  # [BLOCK_G, D]
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh

    # Online softmax in base 2 (exp2 is the hardware instruction): x * log2(e) = scores in base 2.
    qk_scale = sm_scale * 1.4426950408889634
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of the base-2 scores
    l = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)  # running sum of exp2(score - m) * v
    for n0 in range(start, end, BLOCK_N):
        offs_t = n0 + offs_n
        mask_t = offs_t < end
        # One tile of K and one of V, loaded once for all G query heads.
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :], mask=mask_t[:, None], other=0.0)
        v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :], mask=mask_t[:, None], other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_G, BLOCK_N], fp32
        x = tl.where(mask_t[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))  # finite: every tile holds a valid position
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max (0 on the first tile)
        p = tl.exp2(x - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    has_keys = l > 0
    lse = tl.where(has_keys, (m + tl.log2(tl.where(has_keys, l, 1.0))) * 0.6931471805599453, float("-inf"))
    out = acc / tl.where(has_keys, l, 1.0)[:, None]  # an empty split: 0 / 1 = 0
    tl.store(part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :], out,
             mask=mask_g[:, None])
    tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=mask_g)
