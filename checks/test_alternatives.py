"""The kata tests judge behaviour, not one design: correct alternatives pass, plausible wrong answers fail.

Each check runs a card's tests in solutions mode, in this process (pytest.main, with kvkata's plugin
and the learners' hypothesis profile), with one solution module swapped in sys.modules:
- by a correct alternative from checks/alternatives/: every test of the card must pass. A module
  that `REPLACES` a solution stands alone; one that `EXTENDS` it holds only the definitions it
  writes differently, run after the solution's (so the solution's other functions call them too);
- by the solution with one plausible wrong answer edited in, from the card's registry in
  checks/wrong_answers/: the tests written to catch that answer must fail.
Nothing is copied and no process is started: the real tree is never touched.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Run, inprocess_pytest

ALTERNATIVES = Path(__file__).resolve().parent / "alternatives"
REGISTRIES = sorted((Path(__file__).resolve().parent / "wrong_answers").glob("card*.py"))


def card_dir(solution: str) -> str:
    """"solutions/card00_cache_contract/cache.py" -> "card00_cache_contract"."""
    return Path(solution).parts[1]


def card_test_names(card: str) -> set[str]:
    """Every test function of a card (all its test modules)."""
    return {node.name for path in (ROOT / "katas" / card).glob("test_*.py") for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def run_card(monkeypatch, tmp_path: Path, solution: str, source: str, *args: str) -> Run:
    """A card's tests in solutions mode, in this process, with `source` as the solution module `solution`."""
    card = card_dir(solution)
    module_name = ".".join(Path(solution).with_suffix("").parts)
    path = tmp_path / Path(solution).name
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    # The card's test modules afresh, so that their hypothesis tests take the learners' profile as they import.
    for name in [n for n in sys.modules if n.startswith(f"katas.{card}.test_")]:
        monkeypatch.delitem(sys.modules, name)
    report = tmp_path / "run.json"
    code, output = inprocess_pytest(str(ROOT / "katas" / card), "--solutions", f"--kvkata-json={report}", *args,
                                    env={"HYPOTHESIS_PROFILE": "kata"})
    assert getattr(sys.modules.get(module_name), "__file__", None) == str(path), "the swap did not hold"
    tests = json.loads(report.read_text())["tests"] if report.exists() else {}
    return Run(code, output, tests)


def outcomes(run) -> dict[str, str]:
    """Test function name -> outcome (a hypothesis test is one test; a parametrized test's worst case)."""
    got: dict[str, str] = {}
    for nodeid, result in run.tests.items():
        name = nodeid.split("::")[-1].split("[")[0]
        if got.get(name) != "failed":
            got[name] = result["outcome"]
    return got


# --- correct alternatives pass ---------------------------------------------------------------

def _declared(path: Path, name: str) -> str | None:
    """The string a module assigns to `name` at its top level (REPLACES, EXTENDS), if it does."""
    return next((node.value.value for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]), None)


def alternatives() -> list[tuple[str, Path]]:
    """(the solution module replaced or extended, the alternative) for every alternative that says which."""
    found = []
    for path in sorted(ALTERNATIVES.glob("card*.py")):
        solution = _declared(path, "REPLACES") or _declared(path, "EXTENDS")
        if solution is not None:
            found.append((solution, path))
    return found


def alternative_source(solution: str, alternative: Path) -> str:
    """The module the alternative stands for: itself, or (EXTENDS) the solution with its definitions after."""
    text = alternative.read_text()
    if _declared(alternative, "EXTENDS") is None:
        return text
    own = text.replace("from __future__ import annotations\n", "")  # the solution's first line already says it
    return (ROOT / solution).read_text() + f"\n\n# --- {alternative.name}: its own definitions, over the solution's ---\n" + own


@pytest.mark.parametrize("solution,alternative", [a for a in alternatives() if _declared(a[1], "EXTENDS")],
                         ids=lambda x: Path(x).stem)
def test_an_extending_alternative_writes_something_and_its_definitions_win(solution, alternative):
    own = {node.name for node in ast.parse(alternative.read_text()).body
           if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    solved = {node.name for node in ast.parse((ROOT / solution).read_text()).body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert own & solved, f"{alternative.name} redefines none of the solution's katas: it checks nothing"
    first_own_line = (ROOT / solution).read_text().count("\n") + 2
    namespace: dict = {"__name__": "alternative_under_check"}
    exec(compile(alternative_source(solution, alternative), str(alternative), "exec"), namespace)
    for name in own:
        value = namespace[name]
        codes = [value.__code__] if hasattr(value, "__code__") else \
            [f.__code__ for f in vars(value).values() if hasattr(f, "__code__")]  # a class: its methods
        assert codes and all(c.co_firstlineno > first_own_line for c in codes), f"{name} is still the solution's"


@pytest.mark.parametrize("solution,alternative", alternatives(), ids=lambda x: Path(x).stem)
def test_a_correct_alternative_passes_every_test_of_its_card(monkeypatch, tmp_path, solution, alternative):
    card = card_dir(solution)
    run = run_card(monkeypatch, tmp_path, solution, alternative_source(solution, alternative), "-k", card[:6])
    got = outcomes(run)
    assert set(got) == card_test_names(card), run.output[-3000:]
    # A skip is allowed only where the solution skips too (a GPU-only check on a machine without one).
    skipped = {name for name, outcome in got.items() if outcome == "skipped"}
    if skipped:
        (tmp_path / "solution").mkdir()
        reference = outcomes(run_card(monkeypatch, tmp_path / "solution", solution, (ROOT / solution).read_text(),
                                      "-k", f"{card[:6]} and ({' or '.join(sorted(skipped))})"))
        skipped = {name for name in skipped if reference.get(name) == "skipped"}
    not_passed = {name: outcome for name, outcome in got.items() if outcome != "passed" and name not in skipped}
    assert run.returncode == 0 and not not_passed, f"{not_passed}\n{run.output[-3000:]}"


# --- plausible wrong answers fail ------------------------------------------------------------

def wrong_answers() -> list:
    params = []
    for path in REGISTRIES:
        registry = importlib.import_module(f"wrong_answers.{path.stem}")
        for wrong in registry.WRONG:
            params.append(pytest.param(wrong.module or registry.SOLUTION, wrong, id=f"{path.stem}-{wrong.id}"))
    return params


@pytest.mark.slow  # hundreds of in-process runs of a card's tests: about 0.2 s each
@pytest.mark.parametrize("solution,wrong", wrong_answers())
def test_a_plausible_wrong_answer_fails_the_tests_written_to_catch_it(monkeypatch, tmp_path, solution, wrong):
    text = (ROOT / solution).read_text()
    assert text.count(wrong.old) == 1, f"{solution} no longer contains {wrong.old!r} exactly once: update the registry"
    card = card_dir(solution)
    assert set(wrong.caught_by) <= card_test_names(card), "a test named in the registry no longer exists"
    run = run_card(monkeypatch, tmp_path, solution, text.replace(wrong.old, wrong.new),
                   "-k", f"{card[:6]} and ({' or '.join(wrong.caught_by)})")
    got = outcomes(run)
    survived = {name: got.get(name, "not run") for name in wrong.caught_by if got.get(name) != "failed"}
    assert not survived, f"{wrong.id} was not caught: {survived}\n{run.output[-3000:]}"


def test_every_registry_names_a_solution_module_and_unique_ids():
    assert REGISTRIES, "no registry of wrong answers found"
    for path in REGISTRIES:
        registry = importlib.import_module(f"wrong_answers.{path.stem}")
        assert (ROOT / registry.SOLUTION).is_file(), f"{path.name}: {registry.SOLUTION} does not exist"
        assert card_dir(registry.SOLUTION).startswith(path.stem), f"{path.name} edits another card's solution"
        ids = [w.id for w in registry.WRONG]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate ids"
        assert all(w.caught_by for w in registry.WRONG), f"{path.name}: a wrong answer names no test to catch it"
