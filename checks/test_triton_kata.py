"""card09's kernel kata judges what a kernel does, not how it is written.

The kata's tests are run here in this process, with the kernel they test swapped: correct
kernels written other ways must pass every test; a correct kernel that reads K and V once per
query head must fail the IO-awareness test, and only it, with a message that says so; and
plausible wrong kernels (the solution with one mistake edited in) must fail the tests written
for that mistake. Also: the byte counter itself, against loads whose sizes are known.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from conftest import ROOT  # noqa: E402
from kvkata.check import Mismatch  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvref.decode_launch import count_loads, launch_split_kernel, split_len_for  # noqa: E402

ALTERNATIVES = Path(__file__).resolve().parent / "alternatives"
SOLUTION = ROOT / "solutions" / "card09_io_awareness" / "kernel.py"
TESTS_PATH = ROOT / "katas" / "card09_io_awareness" / "test_card09_kernel.py"

if not str(ROOT) in sys.path:
    sys.path.insert(0, str(ROOT))


def _module_from(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton.jit reads the source through the module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kata_tests():
    return _module_from(TESTS_PATH, "card09_kernel_tests_under_check")


def kata_test_functions(tests) -> dict[str, object]:
    return {name: fn for name, fn in vars(tests).items() if name.startswith("test_") and callable(fn)}


def run_all(tests, kernel_module, monkeypatch) -> dict[str, str]:
    """Each kata test against `kernel_module`: 'passed', 'skipped', or the failure's message."""
    monkeypatch.setattr(tests, "impl", kernel_module)
    results = {}
    for name, fn in kata_test_functions(tests).items():
        # A parametrized test runs once per value (one level of parametrize, one argument, as the kata tests use).
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        assert len(marks) <= 1 and (not marks or "," not in marks[0].args[0]), f"{name}: parametrize this check cannot run"
        calls = [{marks[0].args[0]: v} for v in marks[0].args[1]] if marks else [{}]
        try:
            for kwargs in calls:
                fn(**kwargs)
            results[name] = "passed"
        except pytest.skip.Exception:
            results[name] = "skipped"
        except (Mismatch, AssertionError, Exception) as exc:  # noqa: BLE001 - what the learner would see
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def variant(tmp_path: Path, old: str, new: str, name: str) -> types.ModuleType:
    """The solution's kernel with one edit."""
    source = SOLUTION.read_text()
    assert source.count(old) == 1, f"{old!r} must occur once in the solution"
    path = tmp_path / f"{name}.py"
    path.write_text(source.replace(old, new))
    return _module_from(path, name)


IO_TEST = "test_gqa_decode_kernel_reads_k_and_v_once_for_all_g_query_heads"
CUDA_TEST = "test_gqa_decode_kernel_on_a_cuda_device_streams_the_cache_at_half_the_copy_bandwidth"


def passed_or_skipped_without_cuda(name, result):
    return result == "passed" or (name == CUDA_TEST and result == "skipped" and not torch.cuda.is_available())


def test_the_solution_and_a_broadcasting_kernel_pass_every_kernel_test(kata_tests, monkeypatch):
    for module in (_module_from(SOLUTION, "card09_solution_kernel"),
                   _module_from(ALTERNATIVES / "card09_broadcast_kernel.py", "card09_broadcast_kernel")):
        results = run_all(kata_tests, module, monkeypatch)
        assert len(results) == len(kata_test_functions(kata_tests)) >= 8
        bad = {n: r for n, r in results.items() if not passed_or_skipped_without_cuda(n, r)}
        assert not bad, f"{module.__name__}: {bad}"


def test_a_kernel_that_streams_k_and_v_once_per_query_head_fails_io_awareness_and_only_that(kata_tests, monkeypatch):
    module = _module_from(ALTERNATIVES / "card09_per_head_kernel.py", "card09_per_head_kernel")
    results = run_all(kata_tests, module, monkeypatch)
    io = results.pop(IO_TEST)
    assert io.startswith("Mismatch"), io
    assert "4.00x the cache" in io and "reads it G times" in io and "bytes of K loaded" in io, io
    bad = {n: r for n, r in results.items() if not passed_or_skipped_without_cuda(n, r)}
    assert not bad, f"the per-head kernel's values are right; only IO-awareness may fail it: {bad}"


WRONG = [
    # (id, old, new, the test that must fail, words its message must hold)
    ("base-2 lse", "(m + tl.log2(tl.where(has_keys, l, 1.0))) * 0.6931471805599453",
     "(m + tl.log2(tl.where(has_keys, l, 1.0)))",
     "test_gqa_decode_kernel_writes_every_splits_normalised_output_and_natural_log_sum_exp", "base-2 log-sum-exp"),
    ("empty split left unwritten", "    tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=mask_g)",
     "    tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=mask_g & has_keys)",
     "test_gqa_decode_kernel_writes_every_splits_normalised_output_and_natural_log_sum_exp", "never written"),
    ("first tile's max kept", "        m_new = tl.maximum(m, tl.max(x, axis=1))  # finite",
     "        m_new = tl.where(m == float('-inf'), tl.max(x, axis=1), m)  # finite",
     "test_gqa_decode_kernel_keeps_a_running_maximum_when_later_tiles_score_hundreds_higher", "running maximum"),
    ("no rescale of the sums", "        alpha = tl.exp2(m - m_new)  # rescales",
     "        alpha = tl.exp2(m - m)  # rescales", "test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32",
     "scaled_dot_product_attention"),
    ("padding rows stored", "             mask=mask_g[:, None])", "             mask=offs_g[:, None] < BLOCK_G)",
     "test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32", "outside every tensor"),
    ("padding rows loaded", "                mask=mask_g[:, None], other=0.0)  # [BLOCK_G, D]",
     "                mask=offs_g[:, None] < BLOCK_G, other=0.0)  # [BLOCK_G, D]",
     "test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32", "padding query rows"),
    ("seq_len ignored", "    end = tl.minimum(start + split_len, seq_len)", "    end = start + split_len",
     "test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32", "outside every tensor"),
    ("query head h reads KV head h % Hkv", "    heads = kv_head * G + offs_g", "    heads = kv_head + offs_g * tl.num_programs(1)",
     "test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32", "wrong values"),
    ("no softmax scale", "    qk_scale = sm_scale * 1.4426950408889634", "    qk_scale = 1.4426950408889634",
     "test_gqa_decode_kernel_matches_sdpa_over_ragged_sequences_in_float32", "wrong values"),
]


@pytest.mark.parametrize("wrong", WRONG, ids=[w[0] for w in WRONG])
def test_a_plausible_wrong_kernel_fails_the_test_written_for_its_mistake(wrong, kata_tests, monkeypatch, tmp_path):
    id_, old, new, caught_by, words = wrong
    module = variant(tmp_path, old, new, "card09_wrong_" + "".join(c if c.isalnum() else "_" for c in id_))
    monkeypatch.setattr(kata_tests, "impl", module)
    with pytest.raises((Mismatch, IndexError)) as info:  # IndexError: a lane outside every tensor, refused
        kata_test_functions(kata_tests)[caught_by]()
    assert words in str(info.value), str(info.value)


# --- the byte counter ----------------------------------------------------------------------------

@triton.jit
def _copy_rows(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    tl.store(dst_ptr + offs, x, mask=offs < n)


def test_count_loads_counts_masked_in_lanes_by_tensor():
    src = torch.arange(100, dtype=torch.float16)
    other = torch.zeros(7, dtype=torch.float32)
    dst = torch.empty(100, dtype=torch.float16)
    with count_loads(src=src, other=other) as counted:
        _copy_rows[(4,)](src, dst, 100, BLOCK=32)  # 4 x 32 lanes, 28 masked off
    assert counted.bytes == {"src": 200, "other": 0} and counted.elements["src"] == 100 and counted.loads == 4
    assert torch.equal(dst, src)
    with count_loads(src=src) as again:
        _copy_rows[(2,)](src, dst, 50, BLOCK=32)
    assert again.bytes == {"src": 100}


def test_the_launcher_refuses_what_the_contract_does_not_cover():
    solution = _module_from(SOLUTION, "card09_solution_kernel_for_errors")
    q, k, v = torch.zeros(1, 4, 24), torch.zeros(1, 2, 8, 24), torch.zeros(1, 2, 8, 24)
    with pytest.raises(ValueError, match="power of two"):
        launch_split_kernel(solution.gqa_decode_kernel, q, k, v, torch.tensor([8]), num_splits=1)
    q, k, v = torch.zeros(1, 4, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="num_splits"):
        launch_split_kernel(solution.gqa_decode_kernel, q, k, v, torch.tensor([8]), num_splits=0)
    with pytest.raises(ValueError, match="seq_lens"):
        launch_split_kernel(solution.gqa_decode_kernel, q, k, v, torch.tensor([9]), num_splits=1)
    with pytest.raises(ValueError, match="contiguous head dim"):
        launch_split_kernel(solution.gqa_decode_kernel, q, k.transpose(2, 3).contiguous().transpose(2, 3), v,
                            torch.tensor([8]), num_splits=1)
    with pytest.raises(TypeError, match="bfloat16"):
        launch_split_kernel(solution.gqa_decode_kernel, q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.tensor([8]),
                            num_splits=1)
    assert split_len_for(70, 3, 16) == 32 and split_len_for(1, 4, 16) == 16 and split_len_for(64, 4, 16) == 16


def test_a_stub_kernel_raises_its_todo_from_its_own_frame():
    stub = _module_from(ROOT / "katas" / "card09_io_awareness" / "kernel.py", "card09_stub_kernel")
    q, k, v = torch.zeros(1, 4, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(NotImplementedError) as info:
        launch_split_kernel(stub.gqa_decode_kernel, q, k, v, torch.tensor([8]), num_splits=1)
    assert info.traceback[-1].path == Path(stub.__file__) and "gqa_decode_kernel" in str(info.value)
    assert math.isfinite(1.0) and inspect.isfunction(stub.gqa_decode_kernel.fn)


@pytest.mark.slow  # the child process is the point
def test_on_a_cuda_machine_the_bytes_are_counted_in_an_interpreter_child_process(kata_tests, monkeypatch):
    # The path a GPU machine takes, taken here: the child imports the kata tests with TRITON_INTERPRET=1.
    monkeypatch.setenv("KVKATA_MODE", "solutions")
    monkeypatch.setattr(kata_tests.kvkata, "mode", lambda: "solutions")
    counts = kata_tests.count_in_an_interpreter_process(kata_tests.IO_CASES[:1])
    B, Hkv, G, D, T, seq_lens, num_splits, block_n = kata_tests.IO_CASES[0]
    valid = sum(seq_lens) * Hkv * D * 4
    assert counts == [[valid, valid]]
