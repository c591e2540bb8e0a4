"""A correct kernel written another way: no tl.dot, natural exp, scores by broadcasting.

GQA-packed like the solution (each tile loaded once for the [BLOCK_G, D] block of queries), but
the two products are broadcast multiplies and sums, and the online softmax runs in base e. Every
card09 kernel test must pass it.
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
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_g = offs_g < G
    heads = kv_head * G + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None],
                other=0.0).to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
    for i in range(0, n_tiles):
        offs_t = start + i * BLOCK_N + offs_n
        mask_t = offs_t < end
        k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :],
                    mask=mask_t[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * stride_vb + kv_head * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :],
                    mask=mask_t[:, None], other=0.0).to(tl.float32)
        x = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * sm_scale  # [BLOCK_G, BLOCK_N]
        x = tl.where(mask_t[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        p = tl.exp(x - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    empty = l == 0
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    tl.store(part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :],
             acc / tl.where(empty, 1.0, l)[:, None], mask=mask_g[:, None])
    tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=mask_g)
