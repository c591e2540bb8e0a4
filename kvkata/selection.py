"""Which kata test modules a run cannot select from, so that pytest never imports them.

`pytest -k card12` used to import all fifteen cards' test modules (torch models, kvref, triton)
only to deselect them. The plugin's `pytest_ignore_collect` asks `Pruner.skips(path)` first, and a
module is skipped only when no test in it can be selected:

- `--kata NAME`: the module's card has no kata NAME (the manifest says which card has which kata);
- `-k EXPR`: pytest matches each identifier of EXPR, case-insensitively, as a substring of one of
  the test's names (`_pytest.mark.KeywordMatcher`): the directories and the file between the
  rootdir and the test, the function's name with its parametrize id, its markers, the attributes
  set on the function, and its extra keywords (the plugin adds the kata's name). An identifier is
  True for a module when every test there has a name that holds it (a directory or the file),
  False when no name any of its tests may have holds it, and unknown otherwise; the module is
  skipped when EXPR is False under every choice of the unknown identifiers.

The names a module's tests may have are read from its source with `ast`, never by importing it:
`def test*` names, the ids of literal `@pytest.mark.parametrize` lists (made by pytest's own
IdMaker), `@pytest.mark.X` markers (or module constants bound to one), and the manifest's kata
names for the card. Markers and function attributes that plugins add anywhere are possible for
every module: every registered marker name (`config.getini("markers")`) and the attributes that
hypothesis's decorators set (found by decorating a probe function). Anything else a module does
that could give its tests other names (another decorator, a test class, an imported `test*`,
`pytest_generate_tests`, a conftest.py in the card) makes every name possible, and the module is
never skipped for an identifier it cannot rule in. KVKATA_NO_PRUNE=1 turns all this off.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json
import os
from collections.abc import Callable
import functools
from functools import cache
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

from kvkata import manifest

# The hypothesis decorators a kata test may carry; the attributes they set are found by a probe.
HYPOTHESIS_DECORATORS = ("given", "example", "settings", "seed")
# Past this many identifiers of unknown value, trying every choice costs more than importing.
MAX_UNKNOWN = 10


class _Unknown(Exception):
    """The identifier's value is not known for this module: try both."""

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.ident = ident


class _Undecidable(Exception):
    """The expression uses what the pruner does not model (call parameters): never skip."""


def pruning_enabled() -> bool:
    return os.environ.get("KVKATA_NO_PRUNE", "") in ("", "0")


# --- what a module's tests may be called, from its source ------------------------------------

def _mark_name(node: ast.expr) -> str | None:
    """X for `pytest.mark.X`, `mark.X`, `pytest.mark.X(...)` or `pytest.mark.X.with_args(...)`."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute) and node.attr == "with_args":
        node = node.value
    if isinstance(node, ast.Attribute):
        parent = node.value
        if (isinstance(parent, ast.Attribute) and parent.attr == "mark") or \
                (isinstance(parent, ast.Name) and parent.id == "mark"):
            return node.attr
    return None


def _hypothesis_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Local names bound to hypothesis's decorators, and to the hypothesis module itself."""
    decorators, modules = set(), set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "hypothesis":
            decorators |= {a.asname or a.name for a in node.names if a.name in HYPOTHESIS_DECORATORS}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "hypothesis"}
    return decorators, modules


def _is_hypothesis_decorator(node: ast.expr, decorators: set[str], modules: set[str]) -> bool:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id in decorators
    return (isinstance(node, ast.Attribute) and node.attr in HYPOTHESIS_DECORATORS
            and isinstance(node.value, ast.Name) and node.value.id in modules)


def _parametrize_ids(call: ast.expr, config: pytest.Config | None, func: str) -> list[str] | None:
    """The ids pytest gives a literal `@pytest.mark.parametrize(...)`, or None if not literal."""
    from _pytest.mark.structures import ParameterSet
    from _pytest.python import IdMaker

    if not isinstance(call, ast.Call) or len(call.args) != 2:
        return None
    kwargs = {k.arg: k.value for k in call.keywords}
    if set(kwargs) - {"ids", "indirect", "scope"}:
        return None
    try:
        ids = ast.literal_eval(kwargs["ids"]) if "ids" in kwargs else None
    except ValueError:
        return None
    try:
        argnames = ast.literal_eval(call.args[0])
        argvalues = ast.literal_eval(call.args[1])
    except ValueError:
        # Values that are not literals (torch.bfloat16) with literal, distinct, plain ids: pytest uses the ids as given.
        values = call.args[1]
        if (isinstance(ids, (list, tuple)) and isinstance(values, ast.List | ast.Tuple) and len(values.elts) == len(ids)
                and all(isinstance(i, str) and i.isascii() and i.isprintable() for i in ids) and len(set(ids)) == len(ids)):
            return list(ids)
        return None
    if isinstance(argnames, str):
        argnames = [n.strip() for n in argnames.split(",") if n.strip()]
    if not argvalues or not isinstance(argvalues, (list, tuple)) or (ids is not None and not isinstance(ids, (list, tuple))):
        return None
    sets = [ParameterSet.extract_from(v, force_tuple=len(argnames) == 1) for v in argvalues]
    kwargs = dict(argnames=argnames, parametersets=sets, idfn=None, ids=ids, config=config, nodeid=None)
    if "func_name" in inspect.signature(IdMaker).parameters:  # pytest 8 names the function in its messages
        kwargs["func_name"] = func
    try:
        made = IdMaker(**kwargs).make_unique_parameterset_ids()
    except Exception:  # noqa: BLE001 - whatever pytest would make of it, the pruner does not know
        return None
    return made if all(isinstance(i, str) for i in made) else None


class _Opaque(Exception):
    """The module does something that may name its tests in a way the pruner does not read."""


def _marker(node: ast.expr) -> set[str]:
    """The -k names one marker expression gives a test: its name, and for kata(NAME) the kata's name."""
    name = _mark_name(node)
    if name is None:
        raise _Opaque
    if name == "kata":  # the plugin adds the kata's name as a keyword
        if not (isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            raise _Opaque
        return {name, node.args[0].value}
    return {name}


def _names_in_source(source: str, config: pytest.Config | None) -> frozenset[str] | None:
    """The names a test of this module may have beyond its path and the generic ones; None: any name."""
    try:
        return frozenset(n.lower() for n in _read_names(ast.parse(source), config))
    except (SyntaxError, _Opaque):
        return None


def _read_names(tree: ast.Module, config: pytest.Config | None) -> set[str]:
    decorators, modules = _hypothesis_names(tree)
    constants: dict[str, set[str]] = {}  # module constants bound to a marker: GLOO_TIMEOUT = pytest.mark.timeout(120)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if _mark_name(node.value) not in (None, "parametrize"):
                constants[node.targets[0].id] = _marker(node.value)
            elif isinstance(node.value, ast.Call) and _is_hypothesis_decorator(node.value, decorators, modules):
                decorators.add(node.targets[0].id)  # MEASURED = settings(max_examples=...)
    if any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "pytest_generate_tests"
           for n in ast.walk(tree)):
        raise _Opaque

    def is_test(name: str) -> bool:
        return name.startswith("test")  # pytest's python_functions; the Pruner checks it is the default

    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            raise _Opaque  # a test class: its name and its methods, not read
        if isinstance(node, ast.Import | ast.ImportFrom) and any(is_test((a.asname or a.name).split(".")[0])
                                                                  for a in node.names):
            raise _Opaque  # an imported test function, decorated elsewhere
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name) and sub.id == "pytestmark" and isinstance(node, ast.Assign):
                        value = node.value
                        for mark in value.elts if isinstance(value, ast.List | ast.Tuple) else [value]:
                            if _mark_name(mark) == "parametrize":
                                raise _Opaque
                            names |= _marker(mark)
                    elif isinstance(sub, ast.Name) and (is_test(sub.id) or sub.id == "pytestmark"):
                        raise _Opaque  # a test bound by assignment
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and is_test(sub.value.id):
                        names.add(sub.attr)  # test_x.attr = ...: a function attribute -k matches
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not is_test(node.name):
            continue
        id_lists = []
        for dec in node.decorator_list:
            if _mark_name(dec) == "parametrize":
                ids = _parametrize_ids(dec, config, node.name)
                if ids is None:
                    raise _Opaque
                id_lists.append(ids)
                names.add("parametrize")
            elif isinstance(dec, ast.Name) and dec.id in constants:
                names |= constants[dec.id]
            elif not _is_hypothesis_decorator(dec, decorators, modules):
                names |= _marker(dec)  # a marker, or _Opaque: a decorator that may name the test otherwise
        names.add(node.name)
        names.update(f"{node.name}[{ids}]" for ids in _combined(id_lists))
    return names


def _combined(id_lists: list[list[str]]) -> set[str]:
    """Every id a stack of parametrize decorators may give, joined by '-' in either stacking order."""
    if not id_lists:
        return set()
    out = set()
    for order in (id_lists, id_lists[::-1]):
        joined = [""]
        for ids in order:
            joined = [f"{a}-{b}" if a else b for a in joined for b in ids]
        out.update(joined)
    return out


@cache
def _hypothesis_attributes() -> frozenset[str]:
    """The function attributes hypothesis's decorators set, as -k sees them."""
    from hypothesis import example, given, seed, settings
    from hypothesis import strategies as st

    @settings(max_examples=1)
    @seed(0)
    @example(0)
    @given(st.integers())
    def probe(x):  # never run
        pass

    try:
        from _pytest.mark import _is_matchable_function_attribute as matchable
    except ImportError:  # another pytest: every attribute may match
        def matchable(name: str) -> bool:
            return True
    return frozenset(n.lower() for n in probe.__dict__ if matchable(n))


# Parsing the fifteen cards' test modules costs 0.2 to 0.5 s, a third of a `pytest -k cardNN`: what a
# module's tests may be called is kept, per version of the file (mtime and size), in .kvkata/ (never
# tracked by git), and in this process.
CACHE_FILE = Path(".kvkata") / "selection-names.json"
CACHE_FORMAT = 1
_read: dict[tuple[Path, int, int], frozenset[str] | None] = {}
_disk: dict[Path, dict] = {}  # rootpath -> the cache file's entries


def _reader_stamp() -> list[int]:
    """This file's version: names read by another version of the reader are read again."""
    stat = Path(__file__).stat()
    return [stat.st_mtime_ns, stat.st_size]


def _stored(rootpath: Path) -> dict:
    if rootpath not in _disk:
        try:
            data = json.loads((rootpath / CACHE_FILE).read_text())
            ok = data.get("format") == CACHE_FORMAT and data.get("pytest") == pytest.__version__ \
                and data.get("reader") == _reader_stamp()
            _disk[rootpath] = data["modules"] if ok else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            _disk[rootpath] = {}
    return _disk[rootpath]


def _store(rootpath: Path) -> None:
    file = rootpath / CACHE_FILE
    data = {"format": CACHE_FORMAT, "pytest": pytest.__version__, "reader": _reader_stamp(), "modules": _disk[rootpath]}
    try:
        file.parent.mkdir(exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, file)  # whole or not at all, whatever runs beside this one
    except OSError:
        pass  # a read-only checkout: parse again next time


def _module_names(path: Path, rel: str, config: pytest.Config) -> frozenset[str] | None:
    """`_names_in_source` of the module at `path` (`rel` to the rootdir), read once per version of the file."""
    stat = path.stat()
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _read:
        stored = _stored(config.rootpath)
        entry = stored.get(rel)
        if isinstance(entry, dict) and entry.get("stamp") == [stat.st_mtime_ns, stat.st_size]:
            names = entry.get("names")
            _read[key] = None if names is None else frozenset(names)
        else:
            _read[key] = _names_in_source(path.read_text(), config)
            names = None if _read[key] is None else sorted(_read[key])
            stored[rel] = {"stamp": [stat.st_mtime_ns, stat.st_size], "names": names}
            _store(config.rootpath)
    return _read[key]


# --- the decision --------------------------------------------------------------------------

def may_be_true(expression: Expression, value: Callable[[str], bool | None]) -> bool:
    """Whether `expression` is True for some choice of the identifiers whose `value` is None."""
    def search(chosen: dict[str, bool]) -> bool:
        def matcher(ident: str, /, **kwargs) -> bool:
            if kwargs:
                raise _Undecidable(ident)
            key = ident.lower()
            if key in chosen:
                return chosen[key]
            known = value(key)
            if known is None:
                raise _Unknown(key)
            return known

        try:
            return expression.evaluate(matcher)
        except _Unknown as unknown:
            if len(chosen) >= MAX_UNKNOWN:
                return True
            return search({**chosen, unknown.ident: True}) or search({**chosen, unknown.ident: False})

    try:
        return search({})
    except _Undecidable:
        return True


class Pruner:
    """Decides, per kata test module, whether this run's -k and --kata can select any test in it."""

    def __init__(self, config: pytest.Config, keyword: str | None = None, katas: list[str] | None = None) -> None:
        self.config = config
        self.rootpath = config.rootpath
        keyword = (config.option.keyword if keyword is None else keyword).lstrip()
        self.katas = set(config.getoption("kvkata_katas") if katas is None else katas)
        try:
            self.expression = Expression.compile(keyword) if keyword else None
        except SyntaxError:
            self.expression = None  # pytest reports it
        self.active = pruning_enabled() and (self.expression is not None or bool(self.katas)) and \
            list(config.getini("python_functions")) == ["test"] and list(config.getini("python_classes")) == ["Test"]
        self.files = list(config.getini("python_files"))

    @functools.cached_property
    def generic(self) -> frozenset[str]:
        """Names any test may have: every registered marker, hypothesis's marker and function attributes."""
        markers = {line.split(":")[0].split("(")[0].strip().lower() for line in self.config.getini("markers")}
        return frozenset(markers | {"hypothesis"}) | _hypothesis_attributes()

    def skips(self, path: Path) -> bool:
        """Whether no test in the kata test module at `path` can be selected by this run."""
        if not self.active or not path.is_file() or not any(fnmatch.fnmatch(path.name, p) for p in self.files):
            return False
        try:
            parts = path.resolve().relative_to(self.rootpath.resolve()).parts
        except ValueError:
            return False  # outside the rootdir: pytest names its tests differently
        card = next((c for c in manifest.cards() if parts[:-1] == ("katas", c.dir)), None)
        if card is None or any((self.rootpath.joinpath(*parts[:n]) / "conftest.py").exists()
                               for n in range(1, len(parts))):
            return False
        if self.katas and not self.katas & {k.name for k in card.katas}:
            return True
        if self.expression is None:
            return False
        return not may_be_true(self.expression, self._values(path, parts, card))

    def _values(self, path: Path, parts: tuple[str, ...], card: manifest.Card) -> Callable[[str], bool | None]:
        certain = [p.lower() for p in parts]  # every test's directories and file
        source = None

        def value(ident: str) -> bool | None:
            nonlocal source
            if any(ident in n for n in certain):
                return True
            if any(ident in n for n in self.generic):
                return None
            if source is None:
                source = _module_names(path, "/".join(parts), self.config)
            if source is None:
                return None
            return None if any(ident in n for n in source) else False

        return value
