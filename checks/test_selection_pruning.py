"""`pytest -k EXPR` and `--kata NAME` skip importing the kata test modules they cannot select from
(kvkata.selection): the skipping never drops a test that pytest would have selected.

One in-process collection of every kata test, with pruning off, gives each test the names `-k` matches
(pytest's own KeywordMatcher) and its kata; then, for every card id, every kata name and a few compound
expressions, no module the pruner skips holds a test the expression selects. Card ids and kata names
must also skip every other card's modules: that is what makes `pytest -k card12` fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.mark import KeywordMatcher
from _pytest.mark.expression import Expression

import kvkata
import kvkata.plugin
from kvkata import manifest, selection

ROOT = Path(__file__).resolve().parent.parent
CARDS = manifest.cards()
KATAS = manifest.all_katas()
# Expressions a learner or a maintainer types, and ones that touch every kind of name a test has:
# directories, files, parametrize ids, markers, hypothesis's function attributes, extra keywords.
COMPOUND = ["card0 and not cache", "not card07", "rope or alibi", "card07 or card09", "card1", "katas",
            "not katas", "test_card0", "kata", "hypothesis", "not hypothesis", "timeout", "usefixtures",
            "parametrize", "seed", "[0]", "bound", "latency-bound or card03", "card12 and not seed",
            "(card02 or card11) and not energy", "decode_step or card13", "is_hypothesis_test",
            "explicit_examples", "not (card00 or card01 or card02)", "gloo", "paging and not card03"]


@dataclass
class Collected:
    config: pytest.Config
    tests: dict[str, tuple[Path, KeywordMatcher, str | None]]  # nodeid -> (module, -k's names, kata)


class _Recorder:
    def __init__(self) -> None:
        self.config = None
        self.tests = {}

    def pytest_configure(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:  # after the plugin added the kata names as keywords
            marker = item.get_closest_marker("kata")
            self.tests[item.nodeid] = (item.path, KeywordMatcher.from_item(item), marker.args[0] if marker else None)


def _collect(*args: str, prune: bool) -> _Recorder:
    """Collect the kata tests in this process, the plugin's module state put back afterwards."""
    recorder = _Recorder()
    saved_config, saved_mode = kvkata.plugin._config, kvkata.mode()
    with pytest.MonkeyPatch.context() as mp:
        if prune:
            mp.delenv("KVKATA_NO_PRUNE", raising=False)
        else:
            mp.setenv("KVKATA_NO_PRUNE", "1")
        mp.delenv("PYTEST_ADDOPTS", raising=False)
        mp.delenv("KVKATA_MODE", raising=False)
        try:
            code = pytest.main(["--collect-only", "-q", "-p", "no:randomly", f"--rootdir={ROOT}",
                                "-c", str(ROOT / "pyproject.toml"), str(ROOT / "katas"), *args], plugins=[recorder])
        finally:
            kvkata.plugin._config = saved_config
            kvkata.set_mode(saved_mode)
    assert code in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), f"collection failed: {code}"
    return recorder


@pytest.fixture(scope="module")
def collected() -> Collected:
    recorder = _collect(prune=False)
    assert len({path for path, _, _ in recorder.tests.values()}) >= len(CARDS), "every card's tests collected"
    return Collected(recorder.config, recorder.tests)


REAL_STORED, REAL_STORE = selection._stored, selection._store


@pytest.fixture(scope="module", autouse=True)
def read_every_module_afresh():
    """The pruner keeps what it read in .kvkata/: these checks read the sources themselves, once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "_read", {})
        mp.setattr(selection, "_disk", {})
        mp.setattr(selection, "_stored", lambda rootpath: {})
        mp.setattr(selection, "_store", lambda rootpath: None)
        yield


def _modules(collected: Collected) -> set[Path]:
    return {path for path, _, _ in collected.tests.values()}


def _skipped(collected: Collected, keyword: str = "", katas: tuple[str, ...] = ()) -> set[Path]:
    pruner = selection.Pruner(collected.config, keyword=keyword, katas=list(katas))
    return {path for path in _modules(collected) if pruner.skips(path)}


def _selected_modules(collected: Collected, keyword: str) -> set[Path]:
    expression = Expression.compile(keyword)
    return {path for path, names, _ in collected.tests.values() if expression.evaluate(names)}


def _card_modules(collected: Collected, card: manifest.Card) -> set[Path]:
    return {p for p in _modules(collected) if p.parent.name == card.dir}


@pytest.mark.parametrize("card", CARDS, ids=[c.id for c in CARDS])
def test_dash_k_card_skips_exactly_the_other_cards_modules(collected, card):
    assert _selected_modules(collected, card.id) == _card_modules(collected, card)
    assert _skipped(collected, card.id) == _modules(collected) - _card_modules(collected, card)


@pytest.mark.parametrize("kata", KATAS, ids=[f"{k.card}-{k.name}" for k in KATAS])
def test_dash_k_and_dash_dash_kata_with_a_kata_name_never_skip_its_tests(collected, kata):
    card = manifest.card(kata.card)
    skipped = _skipped(collected, kata.name)
    assert not skipped & _selected_modules(collected, kata.name), f"-k {kata.name} skipped a module it selects from"
    assert skipped == _modules(collected) - _selected_modules(collected, kata.name), \
        f"-k {kata.name} must import only the modules that hold its tests"
    by_kata = _skipped(collected, katas=(kata.name,))
    assert not any(path in by_kata for path, _, name in collected.tests.values() if name == kata.name)
    assert by_kata == _modules(collected) - _card_modules(collected, card)


@pytest.mark.parametrize("keyword", COMPOUND)
def test_dash_k_never_skips_a_module_it_selects_from(collected, keyword):
    assert not _skipped(collected, keyword) & _selected_modules(collected, keyword)


def test_the_compound_expressions_do_skip_what_they_cannot_select(collected):
    """The three-valued reading decides `and`, `or` and `not`, not only a single card id."""
    card07 = _card_modules(collected, manifest.card("card07"))
    assert _skipped(collected, "not card07") == card07
    for keyword in ("card0 and not cache", "rope or alibi", "card12 and not seed", "not (card00 or card01 or card02)"):
        assert _skipped(collected, keyword) == _modules(collected) - _selected_modules(collected, keyword), keyword


def test_names_the_pruner_cannot_rule_out_skip_nothing(collected):
    """Every test may carry a registered marker or a hypothesis attribute: such a name prunes no module."""
    for keyword in ("kata", "hypothesis", "timeout", "explicit_examples", "test_card0 or x"):
        assert _skipped(collected, keyword) == set(), keyword


def test_a_pruned_collection_collects_what_a_full_one_selects(collected):
    """End to end through the plugin's pytest_ignore_collect: the same tests, fewer modules imported."""
    for keyword in ("card0 and not cache", "card12", "rope or alibi"):
        pruned = _collect("-k", keyword, prune=True)
        expression = Expression.compile(keyword)
        want = {n for n, (_, names, _) in collected.tests.items() if expression.evaluate(names)}
        assert set(pruned.tests) == want, keyword
    pruned = _collect("--kata", "decode_step", prune=True)
    assert set(pruned.tests) == {n for n, (_, _, name) in collected.tests.items() if name == "decode_step"}


def test_the_names_kept_in_kvkata_are_the_names_read_from_the_source(collected, tmp_path, monkeypatch):
    """A second pruner reads the names from the cache file the first one wrote, and decides the same."""
    monkeypatch.setattr(selection, "_stored", REAL_STORED)
    monkeypatch.setattr(selection, "_store", REAL_STORE)
    monkeypatch.setattr(selection, "_read", {})
    monkeypatch.setattr(selection, "_disk", {})
    monkeypatch.setattr(selection, "CACHE_FILE", tmp_path / "names.json")  # absolute: under tmp_path
    modules = sorted(_modules(collected))
    first = {p: selection._module_names(p, str(p.relative_to(ROOT)), collected.config) for p in modules}
    assert (tmp_path / "names.json").exists()
    monkeypatch.setattr(selection, "_read", {})
    monkeypatch.setattr(selection, "_disk", {})
    monkeypatch.setattr(selection, "_names_in_source", lambda source, config: pytest.fail("read the source again"))
    assert {p: selection._module_names(p, str(p.relative_to(ROOT)), collected.config) for p in modules} == first
    assert all(names is not None for names in first.values()), "every kata module's names can be read"


def test_kvkata_no_prune_turns_pruning_off(collected, monkeypatch):
    monkeypatch.setenv("KVKATA_NO_PRUNE", "1")
    assert _skipped(collected, "card12") == set()
    monkeypatch.delenv("KVKATA_NO_PRUNE")
    assert _skipped(collected, "card12")


def test_an_expression_pytest_rejects_prunes_nothing(collected):
    """pytest reports a malformed -k itself; the pruner never hides that behind an empty collection."""
    assert _skipped(collected, "card12 and (") == set()
    assert os.environ.get("KVKATA_NO_PRUNE", "") in ("", "0"), "the checks run with pruning on"
