"""The kata tests judge behaviour, not one design: correct alternatives pass, plausible wrong answers fail.

Each check runs a card's tests in solutions mode, in this process (pytest.main, with kvkata's plugin
and the learners' hypothesis profile), with the solution module swapped in sys.modules: by a
correct alternative from checks/alternatives/ (every test of the card must pass), or by the
solution with one plausible wrong answer edited in (the tests written to catch that answer must
fail). Nothing is copied and no process is started: the real tree is never touched.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, Run, inprocess_pytest

ALTERNATIVES = Path(__file__).resolve().parent / "alternatives"
CARD00_SOLUTION = Path("solutions/card00_cache_contract/cache.py")
CARD00_TESTS = ROOT / "katas/card00_cache_contract/test_card00_cache_contract.py"


def card_test_names(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


SOLUTION_MODULE = "solutions.card00_cache_contract.cache"
TESTS_MODULE = "katas.card00_cache_contract.test_card00_cache_contract"


def run_card00(monkeypatch, tmp_path: Path, source: str, *args: str) -> Run:
    """card00's tests in solutions mode, in this process, against `source` as the solution's cache.py."""
    path = tmp_path / "cache.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(SOLUTION_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, SOLUTION_MODULE, module)
    spec.loader.exec_module(module)
    # The test module afresh, so that its hypothesis tests take the learners' profile as they import.
    monkeypatch.delitem(sys.modules, TESTS_MODULE, raising=False)
    report = tmp_path / "run.json"
    code, output = inprocess_pytest(str(CARD00_TESTS.parent), "--solutions", f"--kvkata-json={report}", *args,
                                    env={"HYPOTHESIS_PROFILE": "kata"})
    assert getattr(sys.modules.get(SOLUTION_MODULE), "__file__", None) == str(path), "the swap did not hold"
    tests = json.loads(report.read_text())["tests"] if report.exists() else {}
    return Run(code, output, tests)


def outcomes(run) -> dict[str, str]:
    """Test function name -> outcome (a hypothesis test is one test)."""
    return {nodeid.split("::")[-1].split("[")[0]: result["outcome"] for nodeid, result in run.tests.items()}


# --- correct alternatives pass ---------------------------------------------------------------

def test_a_list_backed_growing_cache_and_an_index_copy_static_cache_pass_every_card00_test(monkeypatch, tmp_path):
    run = run_card00(monkeypatch, tmp_path, (ALTERNATIVES / "card00_cache.py").read_text(), "-k", "card00")
    got = outcomes(run)
    assert set(got) == card_test_names(CARD00_TESTS), run.output[-3000:]
    not_passed = {name: outcome for name, outcome in got.items() if outcome != "passed"}
    assert run.returncode == 0 and not not_passed, f"{not_passed}\n{run.output[-3000:]}"


# --- plausible wrong answers fail ------------------------------------------------------------

@dataclass(frozen=True)
class Wrong:
    """The solution with `old` replaced by `new`; each test in `caught_by` must fail."""
    id: str
    old: str
    new: str
    caught_by: tuple[str, ...]


CARD00_WRONG = [
    Wrong("softmax-without-the-row-max",
          "return torch.softmax(scores, dim=-1) @ v",
          "return (scores.exp() / scores.exp().sum(dim=-1, keepdim=True)) @ v",
          ("test_attend_stays_exact_when_scores_reach_the_hundreds",)),
    Wrong("softmax-over-the-queries",
          "return torch.softmax(scores, dim=-1) @ v",
          "return torch.softmax(scores, dim=-2).nan_to_num() @ v",
          ("test_attend_over_a_whole_prompt_matches_causal_sdpa", "test_attend_a_chunk_of_queries_sits_at_the_last_positions")),
    Wrong("no-1/sqrt(D)",
          "scores = q @ k.transpose(-2, -1) / math.sqrt(D)",
          "scores = q @ k.transpose(-2, -1)",
          ("test_attend_over_a_whole_prompt_matches_causal_sdpa", "test_attend_one_decode_query_reads_every_cached_position")),
    Wrong("scale-by-sqrt(H*D)",
          "scores = q @ k.transpose(-2, -1) / math.sqrt(D)",
          "scores = q @ k.transpose(-2, -1) / math.sqrt(H * D)",
          ("test_attend_over_a_whole_prompt_matches_causal_sdpa", "test_attend_one_decode_query_reads_every_cached_position")),
    Wrong("plain-tril-for-a-chunk",
          "q_pos = torch.arange(T - S, T, device=q.device)[:, None]",
          "q_pos = torch.arange(S, device=q.device)[:, None]",
          ("test_attend_a_chunk_of_queries_sits_at_the_last_positions", "test_attend_one_decode_query_reads_every_cached_position")),
    Wrong("repeat-instead-of-repeat_interleave",
          "return x.repeat_interleave(G, dim=1)",
          "return x.repeat(1, G, 1, 1)",
          ("test_repeat_kv_gives_query_head_h_the_kv_head_h_over_G",
           "test_attention_over_repeated_kv_matches_sdpa_with_enable_gqa")),
    Wrong("growing-cache-length-from-the-wrong-axis",
          "return 0 if self.k is None else self.k.shape[2]",
          "return 0 if self.k is None else self.k.shape[-1]",
          ("test_growing_cache_update_returns_everything_cached_in_order",
           "test_growing_cache_grows_by_one_position_per_generated_token_in_every_layer")),
    Wrong("static-cache-running-max",
          "self.seq_len = int(input_pos.max()) + 1",
          "self.seq_len = max(self.seq_len, int(input_pos.max()) + 1)",
          ("test_static_cache_rewriting_earlier_positions_rolls_back_to_the_last_one_written",
           "test_static_cache_rolled_back_in_a_model_gives_the_logits_of_the_new_sequence")),
    Wrong("static-cache-seq_len-plus-S",
          "self.seq_len = int(input_pos.max()) + 1",
          "self.seq_len += input_pos.numel()",
          ("test_static_cache_rewriting_earlier_positions_rolls_back_to_the_last_one_written",
           "test_static_cache_rolled_back_in_a_model_gives_the_logits_of_the_new_sequence")),
    Wrong("static-cache-appends-whatever-input_pos-says",
          "self.k[:, :, input_pos] = k_new",
          "input_pos = torch.arange(self.seq_len, self.seq_len + k_new.shape[2])\n        self.k[:, :, input_pos] = k_new",
          ("test_static_cache_rewriting_earlier_positions_rolls_back_to_the_last_one_written",
           "test_static_cache_rolled_back_in_a_model_gives_the_logits_of_the_new_sequence")),
    Wrong("static-cache-skips-positions-already-written",
          "self.k[:, :, input_pos] = k_new  # (B, Hkv, S, D) into positions input_pos\n        self.v[:, :, input_pos] = v_new",
          "fresh = input_pos >= self.seq_len\n        self.k[:, :, input_pos[fresh]] = k_new[:, :, fresh]\n"
          "        self.v[:, :, input_pos[fresh]] = v_new[:, :, fresh]",
          ("test_static_cache_rewriting_earlier_positions_rolls_back_to_the_last_one_written",
           "test_static_cache_rolled_back_in_a_model_gives_the_logits_of_the_new_sequence")),
    Wrong("static-cache-returns-the-whole-buffer",
          "return self.k[:, :, : self.seq_len], self.v[:, :, : self.seq_len]",
          "return self.k, self.v",
          ("test_static_cache_writes_by_position_into_one_allocation",
           "test_static_and_growing_caches_give_identical_logits")),
    Wrong("static-cache-ignores-the-dtype",
          "self.k = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)",
          "self.k = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim)",
          ("test_static_cache_writes_by_position_into_one_allocation",)),
    Wrong("prefill-returns-the-first-position",
          "return model(ids, input_pos, caches)[:, -1]\n\n\ndef decode_step",
          "return model(ids, input_pos, caches)[:, 0]\n\n\ndef decode_step",
          ("test_prefill_writes_every_prompt_position_and_returns_the_last_logits",)),
    Wrong("prefill-positions-from-1",
          "input_pos = torch.arange(ids.shape[1], device=ids.device)",
          "input_pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)",
          ("test_prefill_writes_every_prompt_position_and_returns_the_last_logits",)),
    Wrong("decode-at-T-minus-1",
          "input_pos = torch.tensor([caches[0].seq_len], device=ids.device)",
          "input_pos = torch.tensor([caches[0].seq_len - 1], device=ids.device)",
          ("test_cached_decode_matches_full_recompute", "test_decode_step_appends_exactly_one_position_per_layer")),
    Wrong("decode-at-T-plus-1",
          "input_pos = torch.tensor([caches[0].seq_len], device=ids.device)",
          "input_pos = torch.tensor([caches[0].seq_len + 1], device=ids.device)",
          ("test_cached_decode_matches_full_recompute", "test_decode_step_appends_exactly_one_position_per_layer")),
]


@pytest.mark.parametrize("wrong", CARD00_WRONG, ids=[w.id for w in CARD00_WRONG])
def test_a_plausible_wrong_card00_answer_fails_the_tests_written_to_catch_it(monkeypatch, tmp_path, wrong):
    text = (ROOT / CARD00_SOLUTION).read_text()
    assert text.count(wrong.old) == 1, f"the solution no longer contains {wrong.old!r}: update this check"
    assert set(wrong.caught_by) <= card_test_names(CARD00_TESTS), "a test named here no longer exists"
    run = run_card00(monkeypatch, tmp_path, text.replace(wrong.old, wrong.new),
                     "-k", f"card00 and ({' or '.join(wrong.caught_by)})")
    got = outcomes(run)
    survived = {name: got.get(name, "not run") for name in wrong.caught_by if got.get(name) != "failed"}
    assert not survived, f"{wrong.id} was not caught: {survived}\n{run.output[-3000:]}"
