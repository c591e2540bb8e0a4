"""The mock interview: a candidate's sheet, the interviewer's rubric and agenda, and `--live`.

The notes (solutions/<dir>/notes.toml) keep their keys (`questions`, `derivation`, `follow_ups`,
`red_flags`, `probes`, `sources`) and add two:
- `[[answers]]`, one per question in `questions`' order: `expect` (the answer to expect, 1-3
  sentences), `strong`, `adequate`, `weak` (the rubric, one line each) and `katas` (the katas the
  question probes: `--live` asks it when one of them fails);
- `red_flag_katas`, one list per red flag in `red_flags`' order: the katas (or single tests) whose
  failure points to that red flag.

`--live` runs the card's tests on katas/ and reads each failing test's learner message from the
JSON report. A failure is blamed on the kata whose code is wrong: the kata that owns the deepest
frame of the candidate's code in the message ("your code:"), else a kata the test's kata calls
(in the candidate's own source) whose own tests fail, else the test's own kata.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from kvkata import manifest, runner
from kvkata.paths import ROOT
from kvkata.text import wrap

MINUTES = 45
RUBRIC = ("strong", "adequate", "weak")


@dataclass(frozen=True)
class Question:
    number: int
    text: str
    expect: str
    rubric: dict[str, str]  # "strong" / "adequate" / "weak" -> one line
    katas: tuple[str, ...]


def questions(card: manifest.Card) -> list[Question]:
    notes = card.notes()
    answers = notes.get("answers", [])
    out = []
    for i, text in enumerate(notes["questions"]):
        a = answers[i] if i < len(answers) else {}
        out.append(Question(i + 1, text, a.get("expect", ""), {r: a.get(r, "") for r in RUBRIC},
                            tuple(a.get("katas", ()))))
    return out


# --- the 45-minute agenda --------------------------------------------------------------------

def _split(total: int, n: int) -> list[int]:
    """`total` minutes over n parts, the first parts one minute longer when it does not divide."""
    return [total // n + (i < total % n) for i in range(n)] if n else []


def keyboard_katas(card: manifest.Card) -> list[str]:
    """The two katas the questions probe most (manifest order breaks ties): the live-coding block."""
    counts = {k.name: 0 for k in card.katas}
    for q in questions(card):
        for name in q.katas:
            if name in counts:
                counts[name] += 1
    ranked = sorted(counts, key=lambda name: -counts[name])  # stable: manifest order among equals
    return ranked[:2]


def agenda(card: manifest.Card) -> list[tuple[int, int, str]]:
    """(start minute, minutes, what) for a 45-minute mock, generated from the card's notes:
    3 setup, 17 over the questions, 15 at the keyboard, 7 over the follow-ups, 3 to score."""
    notes = card.notes()
    qs, follow = questions(card), notes["follow_ups"]
    parts = [(3, f"setup: hand over `kvkata interview {card.id} --sheet`; the candidate may use a calculator")]
    for q, m in zip(qs, _split(17, len(qs))):
        parts.append((m, f"question {q.number}: {_clip(q.text, 70)}"))
    katas = keyboard_katas(card)
    parts.append((15, f"at the keyboard: {' and '.join(katas)} in katas/{card.dir}/; then "
                      f"`kvkata interview --live {card.id}` picks what to probe"))
    for f, m in zip(follow, _split(7, len(follow))):
        parts.append((m, f"follow-up [{f['kind']}]: {_clip(f['question'], 60)}"))
    parts.append((3, "score each question against its rubric; the candidate's questions"))
    out, start = [], 0
    for minutes, what in parts:
        out.append((start, minutes, what))
        start += minutes
    assert start == MINUTES, start
    return out


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def agenda_lines(card: manifest.Card) -> list[str]:
    out = []
    for start, m, what in agenda(card):
        out += _wrap(what, f"  {start:>2}-{start + m:<2} min  ", " " * 15)
    return out


# --- the candidate's sheet and the interviewer's rubric -------------------------------------------

def _wrap(text: str, first: str, rest: str) -> list[str]:
    return wrap(text, first, rest)


def sheet(card: manifest.Card) -> list[str]:
    """The questions only, for the candidate: no answers, rubric, derivation or red flags."""
    out = _wrap(f"{card.id}: {card.title} - a {MINUTES}-minute mock interview", "", "  ")
    out += ["", "Questions (answer aloud; numbers with their units; say what you assume):"]
    for q in questions(card):
        out += _wrap(q.text, f"  {q.number}. ", "     ")
    out += ["", "At the keyboard (the stubs in katas/, the tests in the same folder):"]
    for name in keyboard_katas(card):
        kata = next(k for k in card.katas if k.name == name)
        out += [f"  {kata.name}   pytest -k {kata.name}", f"      in {kata.where()}"]
    out += ["", "Then follow-up questions that build on your answers."]
    return out


def rubric_lines(q: Question) -> list[str]:
    out = _wrap(q.expect, "      expect:   ", "                ")
    for level in RUBRIC:
        out += _wrap(q.rubric[level], f"      {level + ':':<9} ", "                ")
    if q.katas:
        out += _wrap(", ".join(q.katas), "      katas:    ", " " * 16)
    return out


# --- --live: blame, red flags, next questions ------------------------------------------------

def _kata_nodes(card: manifest.Card, root: Path) -> dict[str, tuple[str, ast.AST]] | None:
    """{kata name: (the candidate's file, relative to root, its def or class)}; None if a file does not parse."""
    names = {k.name for k in card.katas}
    out = {}
    for module in sorted({k.module for k in card.katas}):
        rel = f"katas/{card.dir}/{module}.py"
        try:
            tree = ast.parse((root / rel).read_text())
        except (OSError, SyntaxError):
            return None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
                out[node.name] = (rel, node)
    return out


def call_graph(card: manifest.Card, root: Path = ROOT) -> dict[str, set[str]]:
    """Kata -> the card's other katas its code (in katas/, the candidate's) calls, directly or not."""
    nodes = _kata_nodes(card, root) or {}
    direct = {}
    for name, (_, node) in nodes.items():
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        direct[name] = (used & set(nodes)) - {name}
    closure = {}
    for name in direct:
        seen, todo = set(), list(direct[name])
        while todo:
            c = todo.pop()
            if c not in seen and c != name:
                seen.add(c)
                todo += direct.get(c, ())
        closure[name] = seen
    return closure


FRAME = re.compile(r"^\s+(katas/\S+\.py):(\d+) in \S+:")


def raising_kata(message: str, card: manifest.Card, root: Path = ROOT) -> str | None:
    """The kata that owns the deepest frame of the candidate's code the message lists, if any."""
    frames = []
    in_code = False
    for line in message.splitlines():
        if line.startswith("your code:"):
            in_code = True
            continue
        m = FRAME.match(line) if in_code else None
        if m:
            frames.append((m.group(1), int(m.group(2))))
        elif in_code:
            in_code = False
    if not frames:
        return None
    path, lineno = frames[-1]
    for name, (rel, node) in (_kata_nodes(card, root) or {}).items():
        if rel == path and node.lineno <= lineno <= node.end_lineno:
            return name
    return None


@dataclass
class Failure:
    test: str          # the test function's name
    kata: str          # the kata the test belongs to
    blame: str         # the kata whose code is wrong
    why: str           # how blame was decided, when it is not the test's own kata
    message: str       # the learner message: called / got / expected


def blame(card: manifest.Card, data: dict, root: Path = ROOT) -> tuple[list[Failure], dict[str, str], list[str]]:
    """From a --kvkata-json report: the failures with their blame, each test's outcome, the passing tests."""
    by_test: dict[str, list[tuple[str, dict]]] = {}
    messages = data.get("messages", {})
    for nodeid, r in data["tests"].items():
        by_test.setdefault(nodeid.split("::")[-1].split("[")[0], []).append((nodeid, r))
    outcome, kata_of, message_of = {}, {}, {}
    for t, runs in by_test.items():
        outs = [r["outcome"] for _, r in runs]
        kata_of[t] = runs[0][1]["kata"]
        outcome[t] = ("failed" if any(o in ("failed", "broken") for o in outs)
                      else "todo" if "todo" in outs else "passed")
        message_of[t] = next((messages[n] for n, r in runs if r["outcome"] in ("failed", "broken") and n in messages), "")
    own_failing = {kata_of[t] for t, o in outcome.items() if o == "failed"}
    calls = call_graph(card, root)
    failures = []
    for t, o in outcome.items():
        if o != "failed":
            continue
        k, msg = kata_of[t], message_of[t]
        raised = raising_kata(msg, card, root)
        if raised and raised != k:
            failures.append(Failure(t, k, raised, f"{raised} raised it, called from {k}", msg))
            continue
        wrong = {c for c in calls.get(k, ()) if c in own_failing}
        deepest = sorted((c for c in wrong if not (calls.get(c, set()) & wrong)),
                         key=[x.name for x in card.katas].index)
        if deepest:
            c = deepest[0]
            failures.append(Failure(t, k, c, f"{k} calls {c}, whose own tests fail", msg))
        else:
            failures.append(Failure(t, k, k, "", msg))
    return failures, outcome, [t for t, o in outcome.items() if o == "passed"]


def pointed_red_flags(card: manifest.Card, failures: list[Failure]) -> list[str]:
    """The red flags mapped (red_flag_katas) to a blamed kata, or to a failing test blamed on its own kata."""
    notes = card.notes()
    hit = {f.blame for f in failures} | {f.test for f in failures if f.blame == f.kata}
    return [flag for flag, names in zip(notes["red_flags"], notes.get("red_flag_katas", []))
            if hit & set(names)]


def next_questions(card: manifest.Card, katas: list[str], n: int = 3) -> list[Question]:
    """The questions tagged with the most of `katas`, in the card's order among equals."""
    wanted = set(katas)
    tagged = [q for q in questions(card) if wanted & set(q.katas)]
    return sorted(tagged, key=lambda q: -len(wanted & set(q.katas)))[:n]


def _message_lines(message: str, limit: int = 8) -> list[str]:
    """The learner message without its last line (which names the test and kata, said above)."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip() and not ln.startswith("(note: ")]  # hypothesis's aside
    if lines and lines[-1].startswith("in "):
        lines = lines[:-1]
    shown = [_clip(ln, 300) for ln in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"... ({len(lines) - limit} more lines: pytest -k {card_test_hint(message)})")
    return ["      | " + ln for ln in shown]


def card_test_hint(message: str) -> str:
    found = re.search(r"^in (test_\w+)", message, re.M)
    return found.group(1) if found else "the test"


def run_card(card: manifest.Card, root: Path = ROOT) -> runner.Result:
    """The card's tests in learner mode, on the code in katas/."""
    return runner.run(["-q", "--tb=no", "--no-header", "--learner", "-k", card.id], cwd=root,
                      env=dict(os.environ, KVKATA_MODE="learner"))


def live(card: manifest.Card, root: Path = ROOT) -> int:
    """Run the card's tests on katas/ (the candidate's code) and say what to probe next."""
    print(f"kvkata: running {card.id}'s tests on the code in katas/{card.dir}/ ...", flush=True)
    result = run_card(card, root)
    data = result.data
    if data is None or not data["tests"]:
        print(result.output[-8000:], file=sys.stderr)
        print("kvkata: the test run did not finish; see pytest's output above.", file=sys.stderr)
        return 2
    notes = card.notes()
    failures, outcome, passing = blame(card, data, root)
    todo = [t for t, o in outcome.items() if o == "todo"]
    print("\n".join(_wrap(f"{card.id}: {card.title}: {len(passing)} tests pass, {len(failures)} fail, "
                          f"{len(todo)} not attempted", "", "  ")))
    blamed = list(dict.fromkeys(f.blame for f in failures))
    if failures:
        print("\nProbe these (each failing test, what it checks, and what the candidate's code gave):")
        for k in blamed:
            kata = next(x for x in card.katas if x.name == k)
            mine = [f for f in failures if f.blame == k]
            print("\n".join(_wrap(f"{k}'s code is wrong ({kata.where()}): {len(mine)} failing "
                                  f"test{'s' * (len(mine) != 1)}", "", "  ")))
            for f in mine:
                print(f"  {f.test}")
                print("\n".join(_wrap(notes["probes"].get(f.test, "(no probe recorded)"), "      probes: ", " " * 14)))
                if f.why:
                    print("\n".join(_wrap(f"blamed on {f.blame}: {f.why}", "      ", "        ")))
                print("\n".join(_message_lines(f.message)))
        flags = pointed_red_flags(card, failures)
        print(f"\nRed flags to listen for: the {len(flags)} of {len(notes['red_flags'])} these failures point to")
        for r in flags:
            print("\n".join(_wrap(r, "  - ", "    ")))
    if todo:
        print("\nNot attempted (ask the question instead):")
        for t in todo:
            print("\n".join(_wrap(f"{t}: {notes['probes'].get(t, '')}", "  ", "      ")))
    todo_katas = list(dict.fromkeys(data["tests"][n]["kata"] for n in data["tests"]
                                    if n.split("::")[-1].split("[")[0] in todo))
    asked = next_questions(card, blamed) if blamed else next_questions(card, todo_katas)
    print("\nNext questions" + (f" (they probe {', '.join(blamed)}):" if blamed else
                                " (on the katas not attempted):" if asked else " (every test passes: the follow-ups):"))
    for q in asked:
        print("\n".join(_wrap(q.text, f"  {q.number}. ", "     ")))
        print("\n".join(_wrap(q.expect, "      expect: ", " " * 14)))
    kinds = ("numerical",) if failures else ("architectural", "distributed")
    for f in notes["follow_ups"]:
        if f["kind"] in kinds:
            print("\n".join(_wrap(f["question"], f"  [{f['kind']}] ", "     ")))
            if not failures:
                print("\n".join(_wrap(f["expect"], "      expect: ", " " * 14)))
    return 0 if not failures and not todo else 1
