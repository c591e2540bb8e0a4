"""The kata contract: every kata test fails on its stub as a TODO and passes on its solution;
every stub mirrors its solution; every card has graded hints and interviewer notes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from checks.conftest import ROOT, inprocess_pytest, run_suite, selected_by_k
from kvkata import manifest

CARDS = manifest.cards()
CARD_IDS = [c.id for c in CARDS]
FOLLOW_UP_KINDS = {"numerical", "architectural", "distributed"}


def card_tests(run, card):
    """A card's tests: from a run (nodeid -> row), or from the in-process collection (nodeid -> Collected)."""
    if isinstance(run, dict):
        return {nodeid: c for nodeid, c in run.items() if c.card == card.id}
    return {nodeid: row for nodeid, row in run.tests.items() if row["card"] == card.id}


# --- fails on the stubs, as TODOs; passes on the solutions --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_test_fails_on_its_stub_as_a_todo(learner_run, card):
    tests = card_tests(learner_run, card)
    assert len(tests) >= 5, f"{card.id} has {len(tests)} kata tests; a card needs at least five"
    not_todo = {n: r["outcome"] for n, r in tests.items() if r["outcome"] != "todo"}
    assert not not_todo, f"these {card.id} tests did not fail as a TODO on the stubs: {not_todo}"


def _gpu_only_skip(nodeid: str, row: dict) -> bool:
    """A GPU-only test (its name says `on_a_cuda_device`) may skip in solutions mode where there is no CUDA
    device; it still fails as a TODO on the stub, because it first runs the kata on the CPU."""
    import torch

    return row["outcome"] == "skipped" and "on_a_cuda_device" in nodeid and not torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_test_passes_on_its_solution(interviewer_run, learner_run, card):
    tests = card_tests(interviewer_run, card)
    failed = {n: r["outcome"] for n, r in tests.items() if r["outcome"] != "passed" and not _gpu_only_skip(n, r)}
    assert not failed, f"these {card.id} tests do not pass on the solutions: {failed}"
    assert set(tests) == set(card_tests(learner_run, card)), "both modes must run the same tests"


@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_every_kata_has_tests_and_every_test_names_its_card(kata_collection, card):
    tests = card_tests(kata_collection, card)
    tested = {c.kata for c in tests.values()}
    assert tested == {k.name for k in card.katas}, f"{card.id}: katas without tests: {set(k.name for k in card.katas) - tested}"
    assert all(card.id in nodeid for nodeid in tests), "a kata test's id must contain its card id"


def test_every_test_in_the_suite_belongs_to_a_kata(kata_collection):
    orphans = [n for n, c in kata_collection.items() if c.kata is None]
    assert not orphans, f"tests without @pytest.mark.kata(...) or outside a card directory: {orphans}"


@pytest.mark.slow
def test_the_runs_attribute_every_test_to_the_card_and_kata_the_collection_does(kata_collection, interviewer_run,
                                                                               learner_run):
    """What the fast tier proves from one in-process collection holds for the real runs: the same tests,
    each in the same card and kata as kvkata's plugin reports it."""
    want = {n: (c.card, c.kata) for n, c in kata_collection.items()}
    for run in (interviewer_run, learner_run):
        assert {n: (r["card"], r["kata"]) for n, r in run.tests.items()} == want


# --- -k and --kata select exactly: proved from one collection, spot-checked in real runs -----

def _collected(*args: str, cwd: Path = ROOT) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *args],
                          cwd=cwd, capture_output=True, text=True)
    return [ln for ln in proc.stdout.splitlines() if "::" in ln]


def _kata_tests(collection, kata) -> set[str]:
    return {n for n, c in collection.items() if (c.card, c.kata) == (kata.card, kata.name)}


def _selected_by_kata_option(collection, name: str) -> set[str]:
    """What `--kata NAME` keeps: the tests whose kata is NAME (kvkata's plugin matches the name alone,
    in any card; the real runs below check the plugin against this)."""
    return {n for n, c in collection.items() if c.kata == name}


@pytest.mark.parametrize("card", CARDS, ids=CARD_IDS)
def test_dash_k_selects_exactly_the_cards_tests(card, kata_collection):
    ids = selected_by_k(kata_collection, card.id)
    assert ids and all(f"/{card.dir}/" in i for i in ids), ids
    assert ids == set(card_tests(kata_collection, card))


@pytest.mark.parametrize("kata", manifest.all_katas(), ids=lambda k: f"{k.card}-{k.name}")
def test_dash_k_with_a_kata_name_selects_all_and_only_that_katas_tests(kata, kata_collection):
    want = _kata_tests(kata_collection, kata)
    assert want, f"{kata.card} {kata.name} has no tests"
    assert selected_by_k(kata_collection, kata.name) == want, f"pytest -k {kata.name} must select exactly its tests"
    assert _selected_by_kata_option(kata_collection, kata.name) == want, f"--kata {kata.name} would select other katas' tests"


def _spot_checks():
    """A few real selections (two cards, two kata names, --kata twice), for the slow tier."""
    card07, card12 = manifest.card("card07"), manifest.card("card12")
    kata_a, kata_b = CARDS[0].katas[-1], card07.katas[0]
    return [pytest.param(("-k", card07.id), ("card", card07.id), id="-k card07"),
            pytest.param(("-k", card12.id), ("card", card12.id), id="-k card12"),
            pytest.param(("-k", kata_a.name), ("kata", kata_a), id=f"-k {kata_a.name}"),
            pytest.param(("-k", kata_b.name), ("kata", kata_b), id=f"-k {kata_b.name}"),
            pytest.param(("--kata", kata_a.name), ("kata", kata_a), id=f"--kata {kata_a.name}"),
            pytest.param(("--kata", kata_b.name), ("kata", kata_b), id=f"--kata {kata_b.name}")]


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", _spot_checks())
def test_a_real_pytest_selects_what_the_in_process_proof_says(args, expect, kata_collection):
    """A fresh pytest (with whatever collection pruning the plugin does) selects exactly what the
    in-process evaluation over one full collection says, and that is the card's or kata's tests."""
    real = set(_collected(*args))
    kind, what = expect
    if kind == "card":
        want = set(card_tests(kata_collection, manifest.card(what)))
    else:
        want = _kata_tests(kata_collection, what)
    proof = selected_by_k(kata_collection, args[1]) if args[0] == "-k" else _selected_by_kata_option(kata_collection, args[1])
    assert want and proof == want
    assert real == want, f"pytest {' '.join(args)}: extra {sorted(real - want)[:5]}, missing {sorted(want - real)[:5]}"


def test_no_test_name_holds_another_katas_name(kata_collection):
    """-k is a substring match: a test whose name holds another kata's name would be selected with it."""
    clashes = []
    for nodeid, c in kata_collection.items():
        name = nodeid.split("::")[-1].split("[")[0].lower()
        others = [k.name for k in manifest.all_katas() if k.name != c.kata and k.name.lower() in name]
        if others:
            clashes.append(f"{nodeid} (kata {c.kata}) holds {others}")
    assert not clashes, clashes


# --- what a learner sees -------------------------------------------------------------------

@pytest.mark.slow
def test_learner_run_ends_on_one_todo_line_per_kata_and_the_board(learner_run):
    assert learner_run.returncode == 1, learner_run.output[-3000:]
    assert "kvkata: learner mode" in learner_run.output
    assert "Traceback" not in learner_run.output and "raise NotImplementedError" not in learner_run.output
    todo_lines = [ln for ln in learner_run.output.splitlines() if ln.startswith("TODO ")]
    for card in CARDS:
        for kata in card.katas:
            mine = [ln for ln in todo_lines if ln.startswith(f"TODO {card.id} {kata.name}: ")]
            assert len(mine) == 1, f"{card.id} {kata.name}: {len(mine)} TODO lines, want exactly one per kata"
            assert re.fullmatch(rf"TODO {card.id} {kata.name}: edit katas/{card.dir}/\w+\.py::\S+  "
                                rf"\(stuck\? kvkata hint {kata.name}\)", mine[0]), mine[0]
    assert len(todo_lines) == sum(len(c.katas) for c in CARDS)
    tail = learner_run.output[learner_run.output.index("TODO card00"):]
    assert "kvkata progress" in tail and "next: fill in" in tail, "the board comes after the TODO lines"


@pytest.mark.slow
def test_interviewer_mode_passes_and_prints_every_cards_notes(interviewer_run):
    assert interviewer_run.returncode == 0, interviewer_run.output[-3000:]
    assert "kvkata: interviewer mode" in interviewer_run.output
    sections = interviewer_run.output.split("interviewer notes: ")[1:]
    assert sorted(s[:6] for s in sections) == sorted(card.id for card in CARDS), "one notes section per card"
    for section in sections:  # each card's notes: its rubric and its red flags, not only somebody's
        assert "Red flags (and the katas whose failures point to them):" in section, section[:300]
        assert "strong:" in section and "weak:" in section, section[:300]


def test_the_environment_variable_chooses_the_mode_like_the_flag():
    # In this process: the plugin reads KVKATA_MODE when pytest configures it, as a fresh process would.
    for mode in ("learner", "solutions", "interviewer"):
        code, output = inprocess_pytest(str(ROOT / "katas" / CARDS[0].dir), "--collect-only", env={"KVKATA_MODE": mode})
        assert code == 0 and f"kvkata: {mode} mode" in output, output[-2000:]


STUB_FIRST_SECONDS = 1.0


@pytest.mark.slow
def test_on_fresh_stubs_no_kata_test_takes_more_than_a_second(learner_run):
    """The stub is called first: a stub fails before any process launch, model build or FLOP count.

    Measured as work, not wall time (a loaded machine would make wall time flaky): each test's CPU
    time in the test process (setup, call and teardown; a module fixture's setup counts for the first
    test that needs it) stays under a second, and no test starts a process (a gloo launch, a pytest
    run) before its stub raised. Wall times are in the message, for information only."""
    tests = learner_run.tests
    assert tests and all("cpu" in r and "processes" in r for r in tests.values()), \
        "the --kvkata-json report must give each test's CPU time and processes started (KVKATA_COUNT_WORK=1)"
    heavy = {n: round(r["cpu"], 2) for n, r in tests.items() if r["cpu"] > STUB_FIRST_SECONDS}
    launches = {n: r["processes"] for n, r in tests.items() if r["processes"]}
    walls = sorted(((round(r.get("duration") or 0, 2), n) for n in tests for r in [tests[n]]), reverse=True)[:5]
    assert not heavy and not launches, (
        f"on the stubs, {len(heavy)} kata tests use more than {STUB_FIRST_SECONDS:g} s of CPU {heavy} and "
        f"{len(launches)} start processes {launches}: call the learner's code before any expensive setup "
        f"(slowest wall times, for information: {walls})")


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
def test_every_card_has_interviewer_notes(card, kata_collection):
    notes = card.notes()
    assert len(notes["questions"]) >= 2
    assert len(notes["derivation"].strip()) > 200
    assert len(notes["follow_ups"]) >= 3
    assert {f["kind"] for f in notes["follow_ups"]} >= FOLLOW_UP_KINDS
    assert all(f["question"].strip() and f["expect"].strip() for f in notes["follow_ups"])
    assert len(notes["red_flags"]) >= 2
    test_names = {nodeid.split("::")[-1].split("[")[0] for nodeid in card_tests(kata_collection, card)}
    assert set(notes["probes"]) == test_names, "the notes must say what each test probes, and only real tests"


# --- broken, hanging, measuring and mistyped katas --------------------------------------

def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _stub(project: Path, card_index: int) -> Path:
    card = CARDS[card_index]
    return project / "katas" / card.dir / f"{card.katas[0].module}.py"


@pytest.mark.slow
def test_a_stub_that_does_not_import_fails_only_its_own_card(project_copy):
    broken, other = CARDS[1], CARDS[0]
    _stub(project_copy, 1).write_text(_stub(project_copy, 1).read_text() + "\ndef broken(:\n")
    run = run_suite("-k", f"{other.id} or {broken.id}", cwd=project_copy)
    assert run.returncode == 1, run.output[-2000:]
    assert "Interrupted" not in run.output
    mine = {n: r["outcome"] for n, r in run.tests.items() if r["card"] == other.id}
    assert mine and set(mine.values()) == {"todo"}, f"{other.id} must run whatever state {broken.id} is in"
    theirs = {n: r["outcome"] for n, r in run.tests.items() if r["card"] == broken.id}
    assert theirs and set(theirs.values()) == {"broken"}
    line = f"katas/{broken.dir}/{broken.katas[0].module}.py does not import: SyntaxError at katas/{broken.dir}/"
    assert line in run.output and "`def broken(:`" in run.output and "never falls back" in run.output
    assert "Traceback" not in run.output
    assert re.search(rf"{broken.id}\s+{re.escape(broken.title)}\s+does not import", run.output)


@pytest.mark.slow
def test_kvkata_shows_a_card_that_does_not_import_and_exits_nonzero(project_copy):
    broken = CARDS[1]
    _stub(project_copy, 1).write_text(_stub(project_copy, 1).read_text() + "\ndef broken(:\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-m", "kvkata.cli", "board", "-k", broken.id], cwd=project_copy,
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(project_copy)})
    assert proc.returncode != 0
    assert f"{broken.id} does not import: katas/{broken.dir}/" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_missing_kata_module_fails_its_card_naming_the_file(project_copy):
    card = CARDS[0]
    _stub(project_copy, 0).unlink()
    run = run_suite("-k", card.id, cwd=project_copy)
    assert run.returncode == 1
    assert f"katas/{card.dir}/{card.katas[0].module}.py does not import" in run.output
    assert "No module named" in run.output
    assert not any(r["outcome"] == "passed" for r in run.tests.values())


@pytest.mark.slow
def test_a_hanging_kata_costs_one_timeout(project_copy):
    _edit(project_copy / "katas" / "card00_cache_contract" / "cache.py", 'raise NotImplementedError("prefill:',
          'while True:\n        pass\n    raise NotImplementedError("prefill:')
    run = run_suite("-k", "card00 and prefill", "-o", "timeout=3", cwd=project_copy)
    assert run.returncode == 1
    # Count report lines, not mentions: on CI (the CI variable set) pytest's short summary repeats
    # each failure's whole message after "FAILED ... - ".
    lines = run.output.splitlines()
    assert sum(line.startswith("TIMEOUT card00 prefill: stopped after 3") for line in lines) == 1, run.output[-3000:]
    assert "while running prefill" in run.output
    prefill = [n for n, r in run.tests.items() if r["kata"] == "prefill"]
    if len(prefill) > 1:
        assert sum(line.startswith("NOT RUN card00 prefill: an earlier test of this kata hung")
                   for line in lines) == len(prefill) - 1


@pytest.mark.slow
def test_a_formula_kata_that_measures_instead_of_deriving_is_refused(project_copy):
    formula = next(k for k in manifest.all_katas() if k.formula)
    stub = project_copy / "katas" / formula.dir / f"{formula.module}.py"
    _edit(stub, f'raise NotImplementedError("{formula.name}:',
          'import kvref.measure\n    kvref.measure.ShapeOnlyCache(0)\n    raise NotImplementedError("x:')
    run = run_suite("--kata", formula.name, cwd=project_copy)
    assert run.returncode == 1
    assert f"REFUSED {formula.card} {formula.name} asks for a closed form" in run.output, run.output[-2000:]
    assert "called __init__ in kvref/measure.py" in run.output
    _edit(stub, "kvref.measure.ShapeOnlyCache(0)", "__import__('torch').zeros(2)")
    run = run_suite("--kata", formula.name, cwd=project_copy)
    assert "it called torch.zeros" in run.output, run.output[-2000:]
    assert {r["outcome"] for r in run.tests.values()} == {"failed"}


@pytest.mark.slow
def test_a_right_value_of_the_wrong_type_gets_a_learners_message(project_copy):
    card01 = manifest.card("card01")
    stub = project_copy / "katas" / card01.dir / "redundancy.py"
    solution = (project_copy / "solutions" / card01.dir / "redundancy.py").read_text()
    # The worked token_passes, returned as a float: the value is right, the type is not.
    stub.write_text(solution.replace("def token_passes(", "def _token_passes(") +
                    "\n\ndef token_passes(prompt_len, n_new, use_cache):\n"
                    "    return float(_token_passes(prompt_len, n_new, use_cache))\n")
    run = run_suite("--kata", "token_passes", cwd=project_copy)
    assert run.returncode == 1
    assert re.search(r"returned \d+\.0 of type float: return a Python int .*; the value is right", run.output), \
        run.output[-2000:]


@pytest.mark.slow
def test_an_exception_in_the_learners_code_is_reported_in_a_few_lines(project_copy):
    # Off by one: the decode token at T + 1. kvref's cache refuses the gap; its message comes first.
    _edit(project_copy / "katas" / "card00_cache_contract" / "cache.py", 'raise NotImplementedError("decode_step:',
          'return model(ids, torch.tensor([caches[0].seq_len + 1]), caches)[:, -1]\n    raise NotImplementedError("x:')
    run = run_suite("--kata", "decode_step", cwd=project_copy)
    assert run.returncode == 1
    report = run.output[run.output.index("kvref refused what it was given"):]
    assert "your code:" in report and "katas/card00_cache_contract/cache.py:" in report
    assert "site-packages/torch" not in run.output and "Traceback" not in run.output
    assert "tensor([[" not in run.output, "no tensor dumps"
    assert not re.search(r"ModelConfig\([^)]*\n", run.output), "a configuration prints on one line"


@pytest.mark.slow
def test_running_pytest_inside_a_cards_folder_runs_that_card_and_prints_the_board(project_copy):
    card = CARDS[0]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly"], cwd=project_copy / "katas" / card.dir,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "kvkata progress" in proc.stdout and f"TODO {card.id} " in proc.stdout
    assert not any(f"TODO {c.id} " in proc.stdout for c in CARDS if c is not card)


@pytest.mark.slow
def test_the_board_counts_a_kata_solved_only_when_all_its_tests_ran(project_copy):
    card = CARDS[0]
    for module in {k.module for k in card.katas}:
        (project_copy / "katas" / card.dir / f"{module}.py").write_text(
            (project_copy / "solutions" / card.dir / f"{module}.py").read_text())
    kata = card.katas[0]
    tests = [n.split("::")[-1] for n in _collected("--kata", kata.name, cwd=project_copy)]
    assert len(tests) >= 2, f"{kata.name} needs two tests for this check"
    run = run_suite("-k", tests[0], cwd=project_copy)
    assert f"{kata.name}: 1 of {len(tests)} tests ran and passed" in run.output, run.output[-2000:]
    assert re.search(rf"{card.id}\s+.*\[\.+\] 0/{len(card.katas)} katas solved", run.output)
    run = run_suite("--kata", kata.name, cwd=project_copy)
    assert re.search(rf"{card.id}\s+.*\[#\.+\] 1/{len(card.katas)} katas solved", run.output), run.output[-2000:]


@pytest.mark.slow
def test_a_wrong_answer_says_what_was_called_returned_and_expected_and_where(project_copy):
    # A plausible wrong answer: repeat (a b a b) instead of repeat_interleave (a a b b).
    _edit(project_copy / "katas" / "card00_cache_contract" / "cache.py", 'raise NotImplementedError("repeat_kv:',
          'return x.repeat(1, n_heads // x.shape[1], 1, 1)\n    raise NotImplementedError("repeat_kv:')
    run = run_suite("--kata", "repeat_kv", cwd=project_copy)
    assert run.returncode == 1
    assert "called repeat_kv(float32[" in run.output
    assert re.search(r"first at \[batch=\d+, position=\d+, dim=\d+\]: got \S+, expected \S+; largest error \S+ \(tolerance",
                     run.output), run.output[-2000:]
    assert "Traceback" not in run.output


# --- no spoilers on the learner's path -----------------------------------------------------

SPEC_MODULES = {"kvref.config", "kvref.hardware"}  # specs: types and datasheet numbers, no answers
# Instruments: what the tests measure with, run or check arguments with. No card's answers.
INSTRUMENTS = {"kvref/__init__.py", "kvref/model.py", "kvref/measure.py", "kvref/opcount.py", "kvref/strategies.py",
               "kvref/validate.py", "kvref/decode_launch.py", "kvref/weight_quant.py", "kvref/launch.py"}
ANSWERS = manifest.answer_modules()  # kvref module -> the cards it answers, from kvkata/cards.toml


def _cards_named(text: str) -> set[str]:
    """The card ids a line names: "card00", "card05 and card12", "cards 03 and 13", "cards 01, 02 and 03"."""
    named = set()
    for m in re.finditer(r"\bcards?\s*(\d\d(?:(?:,\s*|,?\s+and\s+)\d\d)*)", text):
        named.update(f"card{n}" for n in re.findall(r"\d\d", m.group(1)))
    return named


def test_cards_named_reads_every_way_the_docs_name_cards():
    assert _cards_named("**spoilers for card00**") == {"card00"}
    assert _cards_named("Spoiler for card05 and card12: x") == {"card05", "card12"}
    assert _cards_named("spoiler for cards 03 and 13: the cards 14") == {"card03", "card13", "card14"}
    assert _cards_named("cards 01, 02 and 03") == {"card01", "card02", "card03"}
    assert _cards_named("the 13 cards, 2 of them") == set()


def test_every_kvref_module_is_a_spec_an_instrument_or_a_cards_answer():
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kvref").rglob("*.py")}
    specs = {m.replace(".", "/") + ".py" for m in SPEC_MODULES}
    assert not (set(ANSWERS) - modules), f"cards.toml names answers that are not in kvref: {sorted(set(ANSWERS) - modules)}"
    assert not (INSTRUMENTS - modules), f"INSTRUMENTS names modules that are not in kvref: {sorted(INSTRUMENTS - modules)}"
    both = (specs | INSTRUMENTS) & set(ANSWERS)
    assert not both, f"{sorted(both)}: a spec or an instrument, yet cards.toml lists it as some card's answers"
    unplaced = modules - specs - INSTRUMENTS - set(ANSWERS)
    assert not unplaced, (f"{sorted(unplaced)}: neither a spec, an instrument (INSTRUMENTS here) nor a card's "
                          "answers (`answers` in kvkata/cards.toml)")


def _readme_reading_rows() -> list[tuple[list[str], str]]:
    """README's table rows that name kvref files: (the backticked kvref paths, the row)."""
    rows = []
    for line in (ROOT / "README.md").read_text().splitlines():
        paths = re.findall(r"`(kvref/[\w/]+\.py)`", line)
        if line.startswith("|") and paths:
            rows.append((paths, line))
    return rows


def test_readmes_reading_table_names_every_answer_module_as_a_spoiler_of_its_cards():
    rows = _readme_reading_rows()
    for path, ids in ANSWERS.items():
        found = [row for paths, row in rows if path in paths]
        assert found, (f"README.md's table of what to read names no `{path}`, which holds answers to "
                       f"{', '.join(ids)}; `python tools/reading_table.py` prints its row")
        for row in found:
            assert "spoiler" in row.lower(), f"README.md: the row of `{path}` does not call it a spoiler: {row}"
            # A row may name several modules: it names the cards of all of them.
            wanted = set().union(*(ANSWERS[p] for p in re.findall(r"`(kvref/[\w/]+\.py)`", row) if p in ANSWERS))
            assert _cards_named(row) == wanted, (f"README.md: the row of `{path}` names cards "
                                                 f"{sorted(_cards_named(row))}; cards.toml says {sorted(wanted)}")


def test_readmes_reading_table_names_only_kvref_modules_that_exist():
    missing = {p for paths, _ in _readme_reading_rows() for p in paths if not (ROOT / p).is_file()}
    assert not missing, f"README.md's table of what to read names kvref files that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("card,module", list(_kata_modules()))
def test_no_stub_imports_kvref_beyond_its_spec_modules(card, module):
    tree = ast.parse((ROOT / "katas" / card.dir / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    kvref = {m for m in imported if m == "kvref" or m.startswith("kvref.")}
    assert kvref <= SPEC_MODULES, f"{card.id} {module}.py imports {sorted(kvref - SPEC_MODULES)}: answers, not specs"


@pytest.mark.parametrize("path,cards", sorted(ANSWERS.items()))
def test_every_kvref_module_that_answers_katas_says_so_first(path, cards):
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text())) or ""
    first = doc.splitlines()[0] if doc else ""
    assert first.startswith("Spoiler") and _cards_named(first) == set(cards), \
        f"{path}: first docstring line {first!r} should say it is a spoiler for {manifest.cards_phrase(cards)}"
