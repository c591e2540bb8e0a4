"""The ordered manifest of cards and katas, and the hints and notes kept beside them."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvkata.paths import ROOT


@dataclass(frozen=True)
class Kata:
    card: str    # "card00"
    name: str    # the stub's name: a function or a class
    module: str  # module inside the card's directory, e.g. "cache"
    dir: str     # the card's directory, e.g. "card00_cache_contract"
    formula: bool = False  # a closed form: measuring is refused while it runs (kvkata/formula.py)
    allocates: bool = False  # a formula kata whose answer is no size: allocating a real tensor is arithmetic

    def path(self, package: str = "katas") -> Path:
        return ROOT / package / self.dir / f"{self.module}.py"

    def where(self, package: str = "katas") -> str:
        return f"{package}/{self.dir}/{self.module}.py::{self.name}"


@dataclass(frozen=True)
class Card:
    id: str
    dir: str
    title: str
    katas: tuple[Kata, ...]
    answers: tuple[str, ...] = ()  # the kvref modules that hold its answers, e.g. "kvref/cache.py"

    def hints(self) -> dict[str, list[str]]:
        """Graded hints per kata, from katas/<dir>/hints.toml: nudge, method, near-answer."""
        data = tomllib.loads((ROOT / "katas" / self.dir / "hints.toml").read_text())
        return {name: entry["levels"] for name, entry in data.items()}

    def notes(self) -> dict:
        """Interviewer notes, from solutions/<dir>/notes.toml."""
        return tomllib.loads((ROOT / "solutions" / self.dir / "notes.toml").read_text())


@cache
def cards() -> tuple[Card, ...]:
    data = tomllib.loads((Path(__file__).parent / "cards.toml").read_text())
    return tuple(
        Card(c["id"], c["dir"], c["title"],
             tuple(Kata(c["id"], k["name"], k["module"], c["dir"], k.get("formula", False),
                       k.get("allocates", False)) for k in c["katas"]),
             tuple(c.get("answers", ())))
        for c in data["card"]
    )


def card(card_id: str) -> Card:
    for c in cards():
        if c.id == card_id:
            return c
    valid = ", ".join(c.id for c in cards())
    raise KeyError(f"unknown card {card_id!r}; valid cards: {valid}")


def kata_named(card_dir: str, name: str) -> Kata | None:
    """The kata called `name` in the card whose directory is `card_dir`, if there is one."""
    for c in cards():
        if c.dir == card_dir:
            return next((k for k in c.katas if k.name == name), None)
    return None


def all_katas() -> list[Kata]:
    return [k for c in cards() for k in c.katas]


def card_of_path(path: str | Path) -> Card | None:
    """The card whose directory holds `path` (a test, stub or solution file)."""
    parts = Path(path).parts
    for c in cards():
        if c.dir in parts:
            return c
    return None


def answer_modules() -> dict[str, tuple[str, ...]]:
    """Each kvref module that holds answers -> the cards it answers, in card order (from cards.toml)."""
    modules: dict[str, tuple[str, ...]] = {}
    for c in cards():
        for path in c.answers:
            modules[path] = modules.get(path, ()) + (c.id,)
    return modules


def cards_phrase(ids) -> str:
    """("card03", "card13") -> "cards 03 and 13"; ("card00",) -> "card00"."""
    ids = list(ids)
    if len(ids) == 1:
        return ids[0]
    numbers = [i.removeprefix("card") for i in ids]
    return "cards " + ", ".join(numbers[:-1]) + " and " + numbers[-1]


def _docstring_topic(path: str) -> str:
    """The first docstring line of a kvref module, less its "Spoiler for ...:" and "(read it after you pass)"."""
    import ast
    first = (ast.get_docstring(ast.parse((ROOT / path).read_text())) or "").splitlines()[0]
    topic = first.split(": ", 1)[-1].replace("(read it after you pass)", "").rstrip(". ")
    return topic[:1].lower() + topic[1:] if topic[1:2].islower() else topic


def reading_table() -> str:
    """The spoiler rows of README's table of what to read in kvref: one row per set of cards answered."""
    rows: dict[tuple[str, ...], list[str]] = {}
    for path, ids in answer_modules().items():
        rows.setdefault(ids, []).append(path)
    lines = ["| file | what it is for you |", "|---|---|"]
    for ids, paths in rows.items():
        files = ", ".join(f"`{p}`" for p in paths)
        noun = "spoilers" if len(paths) > 1 else "spoiler"
        what = "; ".join(_docstring_topic(p) for p in paths)
        lines.append(f"| {files} | **{noun} for {cards_phrase(ids)}**: {what}. Read after you pass. |")
    return "\n".join(lines)

