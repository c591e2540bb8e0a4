"""The kata contract: every kata test fails on its stub as a TODO and passes on its solution;
every stub mirrors its solution; every card has graded hints and interviewer notes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from checks.conftest import ROOT, run_suite
from kvkata import manifest

CARDS = manifest.cards()
CARD_IDS = [c.id for c in CARDS]
FOLLOW_UP_KINDS = {"numerical", "architectural", "distributed"}


def card_tests(run, card):
    return {nodeid: row for nodeid, row in run.tests.items() if row["card"] == card.id}


# --- fails on the stubs, as TODOs; passes on the solutions --------------------------------

@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_test_fails_on_its_stub_as_a_todo(learner_run, card):
    tests = card_tests(learner_run, card)
    assert len(tests) >= 5, f"{card.id} has {len(tests)} kata tests; a card needs at least five"
    not_todo = {n: r["outcome"] for n, r in tests.items() if r["outcome"] != "todo"}
    assert not not_todo, f"these {card.id} tests did not fail as a TODO on the stubs: {not_todo}"


@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_test_passes_on_its_solution(interviewer_run, learner_run, card):
    tests = card_tests(interviewer_run, card)
    failed = {n: r["outcome"] for n, r in tests.items() if r["outcome"] != "passed"}
    assert not failed, f"these {card.id} tests do not pass on the solutions: {failed}"
    assert set(tests) == set(card_tests(learner_run, card)), "both modes must run the same tests"


@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_has_tests_and_every_test_names_its_card(interviewer_run, card):
    tests = card_tests(interviewer_run, card)
    tested = {r["kata"] for r in tests.values()}
    assert tested == {k.name for k in card.katas}, f"{card.id}: katas without tests: {set(k.name for k in card.katas) - tested}"
    assert all(card.id in nodeid for nodeid in tests), "a kata test's id must contain its card id"


def test_every_test_in_the_suite_belongs_to_a_kata(interviewer_run):
    orphans = [n for n, r in interviewer_run.tests.items() if r["kata"] is None]
    assert not orphans, f"tests without @pytest.mark.kata(...) or outside a card directory: {orphans}"


@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_dash_k_selects_exactly_the_cards_tests(card):
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-k", card.id],
                          cwd=ROOT, capture_output=True, text=True)
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert ids and all(f"/{card.dir}/" in i for i in ids), ids
    all_ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=ROOT,
                             capture_output=True, text=True).stdout.splitlines()
    assert len(ids) == sum(f"/{card.dir}/" in i for i in all_ids)


# --- what a learner sees -------------------------------------------------------------------

def test_learner_run_exits_nonzero_with_one_line_todos_and_a_board(learner_run):
    assert learner_run.returncode == 1, learner_run.output[-3000:]
    assert "kvkata: learner mode" in learner_run.output
    assert "Traceback" not in learner_run.output and "raise NotImplementedError" not in learner_run.output
    for card in CARDS:
        assert re.search(rf"TODO {card.id} \w+: edit katas/{card.dir}/\w+\.py::\S+  \(stuck\? kvkata hint {card.id}\)",
                         learner_run.output), f"no one-line TODO for {card.id}"
    assert "kvkata progress" in learner_run.output and "next: fill in" in learner_run.output


def test_interviewer_mode_passes_and_prints_every_cards_notes(interviewer_run):
    assert interviewer_run.returncode == 0, interviewer_run.output[-3000:]
    assert "kvkata: interviewer mode" in interviewer_run.output
    for card in CARDS:
        assert f"interviewer notes: {card.id}" in interviewer_run.output
        assert "Red flags:" in interviewer_run.output


def test_the_environment_variable_chooses_the_mode_like_the_flag():
    for mode in ("learner", "solutions", "interviewer"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only"], cwd=ROOT, capture_output=True,
                              text=True, env={**__import__("os").environ, "KVKATA_MODE": mode})
        assert f"kvkata: {mode} mode" in proc.stdout


# --- stubs mirror solutions ----------------------------------------------------------------

def _shape(path: Path) -> dict[str, tuple]:
    """Every public definition's signature, decorators and docstring, by qualified name."""
    tree = ast.parse(path.read_text())
    found = {"<module>": ("module", ast.get_docstring(tree))}

    def visit(body, prefix=""):
        for node in body:
            if isinstance(node, ast.ClassDef):
                found[prefix + node.name] = ("class", [ast.unparse(b) for b in node.bases], ast.get_docstring(node))
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[prefix + node.name] = ("def", ast.unparse(node.args), ast.unparse(node.returns) if node.returns else None,
                                             [ast.unparse(d) for d in node.decorator_list], ast.get_docstring(node))

    visit(tree.body)
    return found


def _kata_modules():
    for card in CARDS:
        for module in sorted({k.module for k in card.katas}):
            yield pytest.param(card, module, id=f"{card.id}-{module}")


@pytest.mark.parametrize("card,module", list(_kata_modules()))
def test_every_stub_mirrors_its_solution(card, module):
    stub = ROOT / "katas" / card.dir / f"{module}.py"
    solution = ROOT / "solutions" / card.dir / f"{module}.py"
    assert _shape(stub) == _shape(solution)


@pytest.mark.parametrize("card,module", list(_kata_modules()))
def test_every_stub_body_is_only_a_docstring_and_a_todo(card, module):
    tree = ast.parse((ROOT / "katas" / card.dir / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{node.name}: a stub body must only raise"
            exc = body[0].exc
            assert isinstance(exc, ast.Call) and ast.unparse(exc.func) == "NotImplementedError", node.name
            message = exc.args[0].value if exc.args and isinstance(exc.args[0], ast.Constant) else ""
            assert re.search(r"\(about \d+ lines?\)|\(1 line\)", message), \
                f"{node.name}: the TODO should say what is missing and roughly how long the answer is"


# --- hints and notes -----------------------------------------------------------------------

@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_has_graded_hints(card):
    hints = card.hints()
    assert set(hints) == {k.name for k in card.katas}
    for name, levels in hints.items():
        assert len(levels) >= 2 and all(isinstance(h, str) and len(h) > 20 for h in levels), name


@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_card_has_interviewer_notes(card, interviewer_run):
    notes = card.notes()
    assert len(notes["questions"]) >= 2
    assert len(notes["derivation"].strip()) > 200
    assert len(notes["follow_ups"]) >= 3
    assert {f["kind"] for f in notes["follow_ups"]} >= FOLLOW_UP_KINDS
    assert all(f["question"].strip() and f["expect"].strip() for f in notes["follow_ups"])
    assert len(notes["red_flags"]) >= 2
    test_names = {nodeid.split("::")[-1].split("[")[0] for nodeid in card_tests(interviewer_run, card)}
    assert set(notes["probes"]) == test_names, "the notes must say what each test probes, and only real tests"


# --- broken and hanging katas --------------------------------------------------------------

def test_a_broken_kata_module_is_an_error_that_names_it_and_never_falls_back(project_copy):
    card = CARDS[0]
    stub = project_copy / "katas" / card.dir / f"{card.katas[0].module}.py"
    stub.write_text(stub.read_text() + "\nthis is not python\n")
    run = run_suite("-k", card.id, cwd=project_copy)
    assert run.returncode not in (0, 1, 5), run.output[-2000:]
    assert f"katas/{card.dir}/{card.katas[0].module}.py" in run.output
    assert "never falls back" in run.output
    assert not any(r["outcome"] == "passed" for r in run.tests.values())


def test_a_missing_kata_module_is_an_error_that_names_it(project_copy):
    card = CARDS[0]
    (project_copy / "katas" / card.dir / f"{card.katas[0].module}.py").unlink()
    run = run_suite("-k", card.id, cwd=project_copy)
    assert run.returncode not in (0, 1, 5)
    assert f"katas/{card.dir}/{card.katas[0].module}.py" in run.output and "No module named" in run.output


def test_a_hanging_kata_is_stopped_by_a_timeout_that_names_it(project_copy):
    stub = project_copy / "katas" / "card00_cache_contract" / "cache.py"
    text = stub.read_text()
    stub.write_text(text.replace('raise NotImplementedError("prefill:', 'while True:\n        pass\n    raise NotImplementedError("prefill:'))
    run = run_suite("-k", "test_prefill_writes", "-o", "timeout=3", cwd=project_copy)
    assert run.returncode == 1
    assert "TIMEOUT card00 prefill: stopped after 3" in run.output and "while running prefill" in run.output


def test_a_wrong_answer_says_what_was_called_returned_and_expected_and_where(project_copy):
    stub = project_copy / "katas" / "card00_cache_contract" / "cache.py"
    text = stub.read_text()
    # A plausible wrong answer: repeat (a b a b) instead of repeat_interleave (a a b b).
    stub.write_text(text.replace(
        'raise NotImplementedError("repeat_kv:',
        'return x.repeat(1, n_heads // x.shape[1], 1, 1)\n    raise NotImplementedError("repeat_kv:'))
    run = run_suite("-k", "test_repeat_kv_gives", cwd=project_copy)
    assert run.returncode == 1
    assert "called repeat_kv(float32[" in run.output
    assert re.search(r"first at \[batch=\d+, position=\d+, dim=\d+\]: got \S+, expected \S+; largest error \S+ \(tolerance",
                     run.output), run.output[-2000:]
    assert "Traceback" not in run.output
