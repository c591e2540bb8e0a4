"""
Spoiler for card09 (the kernel and merge katas): flash-decoding, one token's attention over a long KV cache, in Triton
======================================================================================================================

In decode every sequence brings one new query token per head and attends to its whole cache.
Per KV head that is ``4 · G · T · D`` FLOPs against ``2 · T · D · bytes`` of K and V read,
``2G / bytes`` FLOP per byte whatever T and D are: decode attention is memory-bound, so the
only goal of a decode kernel is to stream the cache once, at the speed of the memory.

Two things stand in the way.

* **GQA.** With ``G = H / Hkv`` query heads per KV head, a kernel that gives each query head
  its own program reads every K and V tile G times. Here one program owns one KV head and
  *all* G query heads that read it: it loads a ``[BLOCK_N, D]`` tile of K once and scores it
  against a ``[BLOCK_G, D]`` block of queries in one ``tl.dot`` (``BLOCK_G`` is G padded to
  at least 16, the smallest tile ``tl.dot`` and the tensor cores accept; the padding rows are
  zeros and are never stored).
* **Too few programs.** At batch 1 with 8 KV heads, one program per (sequence, KV head) puts
  8 programs on a GPU with 132 SMs. Flash-decoding (Dao et al., 2023) also splits the
  sequence: program ``(b, kv_head, split)`` runs an online softmax over its own slice of the
  cache and writes a *partial* result, the slice's normalised output and its log-sum-exp.
  The partial softmaxes of every split are merged::

      lse   = logsumexp_s(lse_s)
      out   = sum_s exp(lse_s - lse) * out_s

  which is exact, because each ``out_s`` is the softmax-weighted mean over its slice and
  ``exp(lse_s - lse)`` is the share of the total softmax mass that slice holds. The merge is
  no second kernel: each program counts itself in on an atomic counter per (sequence, KV
  head), and the last to arrive merges that head's splits. With one split there is no
  scratch and no merge: the program stores the output itself.

How many splits: enough programs to fill whole waves of the GPU, where a wave is the number
of programs resident at once (SMs x programs per SM, which the compiled kernel's registers
and shared memory decide). The K/V loads are software-pipelined (``num_stages=4``: three
buffers per operand), so a program asks for its next tile while it computes on this one.

Sequences in a batch have different lengths (``seq_lens``, each ``1..T``); positions at or
past a sequence's length are masked out. Each sequence's length is cut into ``num_splits``
slices of whole ``BLOCK_N`` tiles, so a short sequence leaves its last splits empty. An
empty split writes ``lse = -inf`` and a zero output; the merge gives it weight
``exp2(-inf - m) = 0``. No ``-inf - -inf`` is ever formed: inside the loop every tile holds
at least one valid key, and the merge's maximum is finite because every sequence has at
least one token.

The softmax runs in base 2 (``exp2``, the hardware instruction): scores are multiplied by
``scale · log2(e)`` and the scratch holds log-sum-exps in base 2. Everything the softmax
touches (scores, running max, running sum, accumulator, scratch) is fp32 whatever the input
dtype; only the probabilities fed to the second ``tl.dot`` are rounded to the cache dtype,
as FlashAttention does, so that ``P @ V`` runs on the tensor cores.

Head dims 16..256 are supported. ``tl.arange`` needs a power of two, so the kernels work on
``BLOCK_D = next_power_of_2(D)`` columns and mask the rest: D = 80 or 96 costs padded lanes,
not correctness.

Laid out as in the Triton tutorials: a PyTorch reference (the spec), the kernel, then
the wrapper that checks shapes, allocates and launches.
"""

from __future__ import annotations  # keeps `x: tl.constexpr` importable without triton

import contextlib
import math

import torch

from kvref.validate import check_tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the reference must import and run without triton
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None

CACHE_LAYOUT = "[B, Hkv, T, D]"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
BLOCK_N = 32  # keys per tile: 32 x 128 x bf16 = 8 KiB of K (and of V) per copy; 3 tiles in flight
MIN_BLOCK_G = 16  # tl.dot needs every tile dimension >= 16
MAX_SPLITS = 64  # the merge loads all partials of a head at once (MERGE_ELEMENTS / D = 64 at D = 128)
NUM_WARPS = 4
NUM_STAGES = 4  # Triton 3.x: num_stages - 1 = 3 shared-memory buffers per loaded operand
MERGE_ELEMENTS = 8192  # fp32 partials the merge loads per step: 64 registers a thread at 4 warps
WAVE_FILL = 0.9  # choose_num_splits: the last wave of programs at least this full
DEFAULT_PROGRAMS_PER_SM = 3  # H100, bf16, D = 128, G = 4: 62,464 B of shared memory; see choose_num_splits
INTERPRETER_SPLITS = 2  # the CPU interpreter runs programs one at a time: splits only cost time


def _jit(fn):
    """`triton.jit` when triton is installed; otherwise leave the kernel as a plain function."""
    return triton.jit(fn) if triton is not None else fn


# %%
# The spec
# --------


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Decode attention in plain PyTorch, fp32 throughout: the spec the kernel is tested against.

    q        [B, H, D]        one new query token per sequence and head
    k_cache  [B, Hkv, T, D]   v_cache the same; query head h reads KV head h // (H // Hkv)
    seq_lens [B]              valid cache length of each sequence, 1..T
    returns  [B, H, D]        in q's dtype
    """
    B, H, Hkv, T, D = _check_inputs(q, k_cache, v_cache, seq_lens)
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    qg = q.float().reshape(B, Hkv, G, D)  # (B, Hkv, G, D): heads h = kv * G + g share kv
    scores = torch.einsum("bkgd,bktd->bkgt", qg, k_cache.float()) * scale  # (B, Hkv, G, T)
    valid = torch.arange(T, device=q.device) < seq_lens.view(B, 1)  # (B, T)
    scores = scores.masked_fill(~valid.view(B, 1, 1, T), float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, Hkv, G, T)
    out = torch.einsum("bkgt,bktd->bkgd", probs, v_cache.float())  # (B, Hkv, G, D)
    return out.reshape(B, H, D).to(q.dtype)


# %%
# The kernel: one program per (sequence, KV head, split), the merge fused into the last one
# ------------------------------------------------------------------------------------------


@_jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_VIA_FP32: tl.constexpr):
    """a @ b accumulated in fp32.

    DOT_VIA_FP32 is for the CPU interpreter only: it stores bfloat16 as uint16 and its tl.dot
    multiplies those bit patterns (triton-lang/triton#11584, "not supported yet"), so there the
    tiles are widened first; the widening is exact, the result the same as on a GPU.
    """
    if DOT_VIA_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@_jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, out_ptr,  # q [B, H, D], k/v [B, Hkv, T, D], seq_lens [B], out [B, H, D]
    part_out_ptr, part_lse_ptr, arrivals_ptr,  # fp32 scratch [B, H, S, D], [B, H, S]; int32 [B, Hkv], all 0
    qk_scale,  # softmax scale * log2(e): scores come out in base 2, ready for exp2
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,  # part_out's last stride is 1 (we allocate it)
    stride_lb, stride_lh,  # part_lse's last stride is 1
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,  # head dim
    BLOCK_G: tl.constexpr,  # G padded to a power of two >= 16
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    ONE_SPLIT: tl.constexpr,  # one split: normalise and store the output, no scratch, no merge
    BLOCK_S: tl.constexpr,  # the split count padded to a power of two (the merge's lse row)
    MERGE_S: tl.constexpr,  # most splits the merge reads at once: [MERGE_S, BLOCK_D] fp32 of partials
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: TF32 would cost ~1e-3 relative
    DOT_VIA_FP32: tl.constexpr,  # bfloat16 under the CPU interpreter, see _dot
):
    pid_b = tl.program_id(0)
    pid_kh = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # This split's share of [0, seq_len) in whole tiles, so only the sequence's last tile is
    # ragged. Splits are cut per sequence: a short sequence in a long batch spreads its few
    # tiles over the first splits and leaves the rest empty.
    seq_len = tl.load(seq_lens_ptr + pid_b)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    split_start = pid_s * tiles_per_split * BLOCK_N
    split_end = tl.minimum(split_start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    mask_gd = mask_g[:, None] & mask_d[None, :]
    offs_h = pid_kh * G + offs_g  # the query heads that read this KV head

    # Batch and head offsets in int64: a [64, 32, 128k, 128] cache has more than 2**31 elements.
    q_ptrs = q_ptr + pid_b.to(tl.int64) * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd
    k_base = k_ptr + pid_b.to(tl.int64) * stride_kb + pid_kh.to(tl.int64) * stride_kh
    v_base = v_ptr + pid_b.to(tl.int64) * stride_vb + pid_kh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of p * v

    # NUM_STAGES = 4 gives every load in this loop three shared-memory buffers: the compiler
    # issues the copies (cp.async) of tiles j+1 and j+2 before it waits for tile j, so two
    # tiles are on their way while this one is computed on.
    for start_n in range(split_start, split_end, BLOCK_N):
        offs_t = start_n + offs_n
        mask_t = offs_t < split_end
        # D is the contiguous axis: each row of the tile is one coalesced read. K and V are
        # read once, so they should not push q, the partials and the counters out of L2.
        kv_mask = mask_t[:, None] & mask_d[None, :]
        k_ptrs = k_base + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0, eviction_policy="evict_first")
        # q is loaded in the loop, from an address the compiler cannot prove loop-invariant
        # (start_n >= 0, so the offset is 0). Loaded before the loop, q has to reach shared
        # memory (the dot's operand) before the pipelined K/V copies are issued, so every
        # program would wait for q's round trip before asking for its first tile. Here q is
        # one more asynchronous copy beside K and V (G real rows), served from L2 after the
        # first tile. Padding rows are zero, so their scores are finite and never stored.
        q = tl.load(q_ptrs + tl.minimum(start_n, 0), mask=mask_gd, other=0.0)  # [BLOCK_G, BLOCK_D]

        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_VIA_FP32) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(mask_t[None, :], s, float("-inf"))
        # Every tile holds at least one valid key, so m_new is finite and the first tile's
        # exp2(-inf - m_new) is a clean 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_VIA_FP32)
        m_i = m_new

    if ONE_SPLIT:  # the program saw the whole sequence (>= 1 token, so l_i > 0)
        o_ptrs = out_ptr + pid_b.to(tl.int64) * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_gd)
    else:
        # An empty split (start past seq_len) never entered the loop: l_i = 0. It writes a zero
        # output and lse = -inf, so the merge gives it weight 0; dividing by 1 avoids 0 / 0.
        has_keys = l_i > 0
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part_ptrs = part_out_ptr + pid_b.to(tl.int64) * stride_pb + pid_s * stride_ps + offs_h[:, None] * stride_ph
        tl.store(part_ptrs + offs_d[None, :], acc / tl.where(has_keys, l_i, 1.0)[:, None], mask=mask_gd)
        l_base = part_lse_ptr + pid_b.to(tl.int64) * stride_lb + pid_s
        tl.store(l_base + offs_h * stride_lh, lse, mask=mask_g)

        # The last of the head's splits to finish merges them all: no second kernel. Every
        # thread's stores come before the barrier; the atomic's release (gpu scope, cumulative)
        # publishes them with the count, and its acquire makes the last program see the others'.
        tl.debug_barrier()
        counter = arrivals_ptr + pid_b * tl.num_programs(1) + pid_kh
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, pid_b, pid_kh, num_splits,
                          stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                          stride_ob, stride_oh, stride_od,
                          G, D, BLOCK_S, MERGE_S, BLOCK_D)
            tl.store(counter, 0)  # ready for the next call on this stream


@_jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, out_ptr, pid_b, pid_kh, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[h] = sum_s exp2(lse_s - lse) * out_s for the G query heads of one KV head.

    The partials were just written by other programs: they are read with .cg (from L2, past
    this SM's L1, which is not coherent with the other SMs' stores).
    """
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, MERGE_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    b = pid_b.to(tl.int64)
    for g in tl.static_range(G):
        h = pid_kh * G + g
        lse_ptrs = part_lse_ptr + b * stride_lb + h * stride_lh
        lse = tl.load(lse_ptrs + offs_s, mask=offs_s < num_splits, other=float("-inf"), cache_modifier=".cg")
        # Finite: the first split of a sequence of >= 1 token holds a key.
        lse_max = tl.max(lse, axis=0)
        weight = tl.exp2(lse - lse_max)  # [BLOCK_S]; empty and padding splits weigh exactly 0
        part_ptrs = part_out_ptr + b * stride_pb + h * stride_ph
        if BLOCK_S <= MERGE_S:  # every split in one load: one L2 round trip per head
            part = tl.load(
                part_ptrs + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=(offs_s < num_splits)[:, None] & mask_d[None, :],
                other=0.0,
                cache_modifier=".cg",
            )  # [BLOCK_S, BLOCK_D]
            acc = tl.sum(weight[:, None] * part, axis=0)
        else:  # too many for the registers: MERGE_S splits a step
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for s0 in range(0, num_splits, MERGE_S):
                offs = s0 + offs_c
                mask = offs < num_splits
                weight_c = tl.exp2(tl.load(lse_ptrs + offs, mask=mask, other=float("-inf"), cache_modifier=".cg") - lse_max)
                part = tl.load(
                    part_ptrs + offs[:, None] * stride_ps + offs_d[None, :],
                    mask=mask[:, None] & mask_d[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )  # [MERGE_S, BLOCK_D]
                acc += tl.sum(weight_c[:, None] * part, axis=0)
        total = tl.sum(weight, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
                 (acc / total).to(out_ptr.dtype.element_ty), mask=mask_d)


# %%
# The wrapper: check, allocate, launch
# ------------------------------------


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    check_seq_lens: bool = True,
) -> torch.Tensor:
    """Decode attention with the flash-decoding Triton kernel; same contract as decode_attention_ref.

    q [B, H, D], k_cache / v_cache [B, Hkv, T, D] (any strides), seq_lens [B] integers in 1..T.
    scale       softmax scale, default 1 / sqrt(D).
    num_splits  pieces each sequence is cut into (1..MAX_SPLITS); default from the problem size
                and how many programs of the compiled kernel fit on an SM (choose_num_splits).
    out         optional [B, H, D] tensor of q's dtype to write into (returned).
    check_seq_lens  False skips the one host sync (reading min/max of seq_lens), so the call can
                be captured in a CUDA graph; lengths outside 1..T then read outside the cache.

    Calls on one device and stream share a small int32 counter buffer (the splits of a head
    count themselves in; the last resets it). Make the first call outside CUDA-graph capture.
    """
    if triton is None:
        raise ImportError(
            "decode_attention needs triton (pip install triton); decode_attention_ref runs without it"
        ) from _TRITON_IMPORT_ERROR
    B, H, Hkv, T, D = _check_inputs(q, k_cache, v_cache, seq_lens, check_values=check_seq_lens)
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"tensors are on {q.device}; Triton runs them there only under TRITON_INTERPRET=1, "
            "set before kvref.triton_decode is first imported (or use decode_attention_ref)"
        )
    G = H // Hkv
    if num_splits is None:
        seen = _PROGRAMS_PER_SM_SEEN.get(_occupancy_key(q, D, G))
        num_splits = choose_num_splits(B, Hkv, T, q.device, programs_per_sm=seen)
    if not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in 1..{MAX_SPLITS}, got {num_splits!r}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, shape=tuple(q.shape), dtype=q.dtype, device=q.device, layout="[B, H, D]")
    if B == 0:
        return out  # an empty batch: nothing to launch (a grid of size 0 is an error)

    scale = D**-0.5 if scale is None else float(scale)
    if num_splits == 1:  # the kernel writes `out` directly: no scratch (the pointers go unused)
        part_out, part_lse = out, out[:, :, 0]
    else:
        part_out = _scratch((B, H, num_splits, D), q.device)
        part_lse = _scratch((B, H, num_splits), q.device)

    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        kernel = _launch(q, k_cache, v_cache, seq_lens, out, part_out, part_lse, scale, G, D, num_splits)
    if q.device.type == "cuda" and getattr(kernel, "n_regs", None):
        props = torch.cuda.get_device_properties(q.device)
        _PROGRAMS_PER_SM_SEEN[_occupancy_key(q, D, G)] = programs_per_sm(
            kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps,
            regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),  # not in every torch build
            smem_per_sm=props.shared_memory_per_multiprocessor,
            max_threads_per_sm=props.max_threads_per_multi_processor,
        )
    return out


def _launch(q, k_cache, v_cache, seq_lens, out, part_out, part_lse, scale, G, D, num_splits):
    """One kernel on the current device, grid (B, Hkv, num_splits); returns what triton's launch returns."""
    B, H, _ = q.shape
    Hkv = k_cache.shape[1]
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_S = triton.next_power_of_2(num_splits)
    return _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, out,
        part_out, part_lse, _arrivals(B * Hkv, q.device),
        scale * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *part_out.stride()[:3], *part_lse.stride()[:2],
        G=G, D=D,
        BLOCK_G=max(MIN_BLOCK_G, triton.next_power_of_2(G)),
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        ONE_SPLIT=num_splits == 1,
        BLOCK_S=BLOCK_S,
        MERGE_S=max(1, MERGE_ELEMENTS // BLOCK_D),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_VIA_FP32=_INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )


# %%
# How many splits: whole waves of the programs that fit on the GPU
# -----------------------------------------------------------------


def programs_per_sm(
    regs: int,
    smem: int,
    num_warps: int,
    *,
    regs_per_sm: int = 65536,
    smem_per_sm: int = 228 * 1024,
    max_threads_per_sm: int = 2048,
) -> int:
    """Programs (CTAs) of a compiled kernel resident on one SM at once, from its registers per
    thread, its shared memory and its warps. Defaults: an H100 (compute capability 9.0, CUDA
    occupancy calculator / programming guide table "Technical Specifications per Compute
    Capability"): 64 Ki registers, 228 KiB shared memory, 2048 threads, 32 resident blocks per SM;
    registers are allocated per warp in units of 256, and each block reserves 1 KiB of shared memory."""
    if regs < 1 or smem < 0 or num_warps < 1:
        raise ValueError(f"need regs >= 1, smem >= 0, num_warps >= 1; got {regs}, {smem}, {num_warps}")
    regs_per_warp = -(-regs * 32 // 256) * 256
    limits = (
        regs_per_sm // (regs_per_warp * num_warps),
        smem_per_sm // (smem + 1024),
        max_threads_per_sm // (32 * num_warps),
        32,
    )
    return min(limits)


def splits_for_waves(B: int, Hkv: int, T: int, sms: int, programs_per_sm: int) -> int:
    """Splits per sequence so that B * Hkv * splits busy programs fill whole waves of
    sms * programs_per_sm: the fewest splits that fill at least WAVE_FILL of their last wave,
    else the best fill. Splits are whole BLOCK_N tiles, so only splits that leave no split
    empty are counted. At B = 1, Hkv = 8 on 132 SMs with 3 programs per SM: one wave of 396."""
    tiles = max(1, -(-T // BLOCK_N))
    slots = sms * max(1, programs_per_sm)
    best, best_fill = 1, 0.0
    for splits in sorted({-(-tiles // (-(-tiles // s))) for s in range(1, min(tiles, MAX_SPLITS) + 1)}):
        waves = B * Hkv * splits / slots
        fill = waves / math.ceil(waves)
        if fill >= WAVE_FILL:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


def choose_num_splits(
    B: int, Hkv: int, T: int, device: torch.device | str, *, programs_per_sm: int | None = None
) -> int:
    """The wrapper's default split count: splits_for_waves on the device's SMs. programs_per_sm
    is the compiled kernel's (the wrapper records it after its first launch for a dtype, D and
    G); until then DEFAULT_PROGRAMS_PER_SM, the value checks/test_triton_static.py reads from
    the kernel compiled for an H100 (bf16, D = 128, G = 4). Chosen from T, the bound: no host sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(INTERPRETER_SPLITS, -(-T // BLOCK_N)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return splits_for_waves(B, Hkv, T, sms, programs_per_sm or DEFAULT_PROGRAMS_PER_SM)


def _occupancy_key(q, D, G):
    return (q.device, q.dtype, D, G)


_PROGRAMS_PER_SM_SEEN: dict = {}  # (device, dtype, D, G) -> programs per SM of the compiled kernel
_ARRIVALS: dict = {}  # (device, stream) -> int32 counters, zero between calls


def _arrivals(n, device):
    """n int32 zeros that stay zero between calls (the last split of each head resets its counter)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _ARRIVALS or _ARRIVALS[key].numel() < n:
        _ARRIVALS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def _scratch(shape, device):
    """fp32 scratch for the partial results; every element is written before the merge reads it."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp merge of split partials, in PyTorch: the kernel's ``_merge_splits`` in natural log.

    outs ``[N, B, H, D]`` (each split normalised over its own keys), lses ``[N, B, H]`` natural
    log-sum-exps (``-inf`` for a split with no keys). Returns (out ``[B, H, D]`` float32, lse
    ``[B, H]`` float32). Every (b, h) needs at least one split with keys, else its row is NaN.
    """
    check_tensor("outs", outs, ndim=4, layout="[N, B, H, D]")
    check_tensor("lses", lses, shape=tuple(outs.shape[:3]), layout="[N, B, H]")
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)  # [B, H]; -inf only where every split is empty
    weights = torch.exp(lses - lse)  # [N, B, H]; an empty split weighs exactly 0
    # An empty split's output is not read at all (0 * NaN would be NaN); a split with keys is read as written.
    outs = torch.where((lses > -math.inf).unsqueeze(-1), outs.float(), 0.0)
    out = (weights.unsqueeze(-1) * outs).sum(dim=0)
    return out, lse


def _check_inputs(q, k_cache, v_cache, seq_lens, check_values=True):
    """Raise ValueError / TypeError naming the expected shape; return (B, H, Hkv, T, D)."""
    check_tensor("q", q, ndim=3, layout="[B, H, D]")
    B, H, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    check_tensor("k_cache", k_cache, ndim=4, layout=CACHE_LAYOUT)
    Hkv, T = k_cache.shape[1], k_cache.shape[2]  # the cache's own; B and D must agree with q
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, shape=(B, Hkv, T, D), dtype=q.dtype, device=q.device, layout=CACHE_LAYOUT)
    if H == 0 or Hkv == 0:
        raise ValueError(f"q and k_cache need at least one head, got H = {H} and Hkv = {Hkv}")
    if H % Hkv != 0:
        raise ValueError(f"query heads H = {H} must be a multiple of KV heads Hkv = {Hkv} (GQA)")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {D}")
    check_tensor("seq_lens", seq_lens, shape=(B,), device=q.device, layout="[B]")
    if seq_lens.dtype.is_floating_point or seq_lens.dtype.is_complex or seq_lens.dtype == torch.bool:
        raise TypeError(f"seq_lens must be an integer tensor, got {seq_lens.dtype}")
    if check_values and B > 0:
        lo, hi = (int(x) for x in torch.aminmax(seq_lens))  # the one host sync
        if lo < 1 or hi > T:
            raise ValueError(f"seq_lens must lie in 1..T = 1..{T}, got min {lo} and max {hi}")
    return B, H, Hkv, T, D


# Whether triton.jit handed back its CPU interpreter (TRITON_INTERPRET=1 at import time).
_INTERPRETED = triton is not None and not isinstance(_decode_kernel, triton.runtime.JITFunction)
