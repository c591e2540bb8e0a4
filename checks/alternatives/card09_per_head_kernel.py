"""A correct kernel that IO-awareness must fail: each query head streams K and V on its own.

The plausible first kernel: the same grid, but a loop over the G query heads outside the loop
over tiles, so every K and V tile is loaded G times (a per-query-head kernel inside a per-KV-head
grid). Its values are right; the byte counter sees G times the cache.
"""

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
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    for g in tl.static_range(G):
        h = kv_head * G + g
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)  # [D]
        m = float("-inf")
        l = 0.0
        acc = tl.zeros([D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_t = n0 + offs_n
            mask_t = offs_t < end
            k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :], mask=mask_t[:, None], other=0.0)
            v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :], mask=mask_t[:, None], other=0.0)
            x = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * sm_scale  # [BLOCK_N]
            x = tl.where(mask_t, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(x - m_new)
            l = l * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m = m_new
        has_keys = l > 0
        lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("-inf"))
        tl.store(part_out_ptr + b * stride_pb + h * stride_ph + s * stride_ps + offs_d, acc / tl.where(has_keys, l, 1.0))
        tl.store(part_lse_ptr + b * stride_lb + h * stride_lh + s, lse)
