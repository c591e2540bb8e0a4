"""Plausible wrong answers to the katas, one registry per card: checks/wrong_answers/cardNN.py.

Each registry names the solution module it edits (`SOLUTION`, relative to the project root) and
lists `WRONG`: what candidates really write, as one edit of the solution (`old` replaced by `new`),
with the tests written to catch it. checks/test_alternatives.py runs the card's tests, in this
process, against each edited solution: every test in `caught_by` must fail. An entry may name
another module of the same card with `module`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wrong:
    """The solution with `old` replaced by `new`; each test in `caught_by` must fail."""
    id: str
    old: str
    new: str
    caught_by: tuple[str, ...]
    module: str | None = None  # another solution module of the card than the registry's SOLUTION
