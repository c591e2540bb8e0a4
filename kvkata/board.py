"""The progress board and the rendering of interviewer notes.

The board shows every kata's saved result (kvkata.progress: what its last run said, and whether its
stub changed since), with what the run just finished adds; it never runs anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvkata import manifest, progress
from kvkata.text import COLUMNS, wrap  # noqa: F401 (board.wrap: the CLI wraps with it)


@dataclass
class KataStatus:
    kata: manifest.Kata
    total: int = 0  # tests the kata has (collected before -k or --kata deselected any)
    outcomes: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if not self.outcomes:
            return "not run"
        if "broken" in self.outcomes:
            return "does not import"
        if all(o == "todo" for o in self.outcomes):
            return "todo"
        if any(o not in ("passed", "skipped") for o in self.outcomes) or "passed" not in self.outcomes:
            return "failing"
        # Solved only when every one of the kata's tests ran in this run and passed.
        return "solved" if len(self.outcomes) >= self.total else "partial"


@dataclass
class RunState:
    """One run's outcomes: by test, the selected tests' katas, each kata's size, the cards that do not import."""
    results: dict[str, str]
    katas: dict[str, manifest.Kata]
    totals: dict[tuple[str, str], int]
    broken: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)  # nodeid -> seconds (setup + call + teardown)
    work: dict[str, dict] = field(default_factory=dict)  # nodeid -> {"cpu", "processes"} with KVKATA_COUNT_WORK=1

    def to_json(self) -> dict:
        tests = {n: {"outcome": o, "card": self.katas[n].card if n in self.katas else None,
                     "kata": self.katas[n].name if n in self.katas else None,
                     "duration": self.durations.get(n), **self.work.get(n, {})} for n, o in self.results.items()}
        totals = {f"{card} {name}": n for (card, name), n in self.totals.items()}
        return {"tests": tests, "totals": totals, "broken": self.broken}

    @classmethod
    def from_json(cls, data: dict) -> "RunState":
        lookup = {(k.card, k.name): k for k in manifest.all_katas()}
        katas = {n: lookup[(r["card"], r["kata"])] for n, r in data["tests"].items() if (r["card"], r["kata"]) in lookup}
        totals = {tuple(key.split(" ", 1)): n for key, n in data.get("totals", {}).items()}
        return cls({n: r["outcome"] for n, r in data["tests"].items()}, katas, totals, data.get("broken", {}))


def tally(state: RunState) -> list[tuple[manifest.Card, list[KataStatus]]]:
    """Group this run's outcomes by card and kata, in manifest order."""
    table = []
    for card in manifest.cards():
        statuses = {k.name: KataStatus(k, state.totals.get((card.id, k.name), 0)) for k in card.katas}
        for nodeid, outcome in state.results.items():
            kata = state.katas.get(nodeid)
            if kata is not None and kata.card == card.id:
                statuses[kata.name].outcomes.append(outcome)
        table.append((card, list(statuses.values())))
    return table


def settled(state: RunState) -> dict[str, tuple[str, int, str]]:
    """The katas this run settled, as kvkata.progress records them: key -> (outcome, tests, note).

    Solved when all the kata's tests ran and passed, failing when one failed (or its module does not
    import), todo when every test met the stub; a kata partly run (all passing) settles nothing.
    """
    out = {}
    for _, statuses in tally(state):
        for s in statuses:
            if s.state in ("solved", "failing", "todo"):
                out[progress.key(s.kata)] = (s.state, s.total, "")
            elif s.state == "does not import":
                out[progress.key(s.kata)] = ("failing", s.total, "does not import")
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


MARKS = {"solved": "#", "failing": "x", "todo": "-", "not run": ".", "stale": "~"}
LEGEND = ["marks: # solved   x failing   - still the stub   . not run yet",
          "       ~ stale: edited since its last run"]
BAR = 39  # the overall bar's width, in characters


def _width() -> int:
    """The title column: wide enough for every title, unless a row would then pass COLUMNS."""
    most = max(len(c.katas) for c in manifest.cards())
    tail = len(f" [{'.' * most}] {most}/{most} katas solved")
    return min(max(len(c.title) for c in manifest.cards()), COLUMNS - len("  card00  ") - tail)


def shorten(text: str, width: int) -> str:
    """`text` cut at a word to fit `width`, with "..." saying it was cut."""
    if len(text) <= width:
        return text
    cut = text[: width - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,:;") + "..."


def overall(status: dict[str, str]) -> str:
    """One line: how many of all the katas are solved, as a bar."""
    total, solved = len(status), sum(s == "solved" for s in status.values())
    filled = round(BAR * solved / total) if total else 0
    return f"  overall  [{'#' * filled}{'.' * (BAR - filled)}] {solved}/{total} katas solved"


def render(state: RunState | None = None, record: dict | None = None, status: dict[str, str] | None = None) -> list[str]:
    """The whole board: every card, from the saved progress (`record`, as merged with this run).

    `state`, the run just finished (if any), adds what only it knows: a card that does not import,
    a kata that passed only in part, tests skipped, and which kata to work on next.
    """
    status = progress.statuses(record) if status is None else status
    broken = state.broken if state is not None else {}
    lines, width = [overall(status)], _width()
    for card in manifest.cards():
        marks = [status[progress.key(k)] for k in card.katas]
        solved = marks.count("solved")
        title = shorten(card.title, width)
        if card.id in broken:
            lines.append(f"  {card.id}  {title:<{width}} does not import: see above")
            continue
        bar = "".join(MARKS[m] for m in marks)
        lines.append(f"  {card.id}  {title:<{width}} [{bar}] {solved}/{_plural(len(marks), 'kata')} solved")
    lines += _this_run(state) if state is not None else []
    lines += ["  " + line for line in LEGEND]
    lines += _next_lines(state, status)
    return lines


def _this_run(state: RunState) -> list[str]:
    lines = []
    for _, statuses in tally(state):
        for s in statuses:
            skipped = s.outcomes.count("skipped")
            if s.state == "solved" and skipped:
                lines += wrap(f"{s.kata.card} {s.kata.name}: solved here; {_plural(skipped, 'test')} skipped and "
                              "counted as passed (a GPU-only check without a CUDA device; pytest -rs says why)",
                              "  ", "    ")
            if s.state == "partial":
                lines += wrap(f"{s.kata.card} {s.kata.name}: {len(s.outcomes)} of {_plural(s.total, 'test')} ran "
                              f"and passed; solved once all of them pass in one run (pytest -k {s.kata.name})",
                              "  ", "    ")
    return lines


def _next_lines(state: RunState | None, status: dict[str, str]) -> list[str]:
    """What to do next: a card of this run that does not import, else this run's first unsolved kata,
    else the first unsolved kata of all. Two lines: the kata and its file, then the commands."""
    if state is not None and state.broken:
        card = next(c for c in manifest.cards() if c.id in state.broken)
        return [f"  next: make katas/{card.dir}/ import again (pytest -k {card.id})"]
    ran = {(k.card, k.name) for k in state.katas.values()} if state is not None else set()
    pending = [k for k in manifest.all_katas() if status[progress.key(k)] != "solved"]
    kata = next((k for k in pending if (k.card, k.name) in ran), pending[0] if pending else None)
    if kata is None:
        return ["  every kata is solved."]
    verb = {"failing": "fix", "stale": "rerun", "todo": "fill in", "not run": "fill in"}[status[progress.key(kata)]]
    return wrap(f"next: {verb} {kata.card} {kata.name} in katas/{kata.dir}/{kata.module}.py", "  ", "        ") + \
        wrap(f"(pytest -k {kata.name}; stuck? kvkata hint {kata.name})", "        ", "        ")


def render_list(status: dict[str, str]) -> list[str]:
    """`kvkata list`: every card (and its folder) and kata (and its file) with its saved status, aligned."""
    name_w = max(len(k.name) for k in manifest.all_katas())
    lines = []
    for card in manifest.cards():
        head = f"{card.id}  {card.title}  katas/{card.dir}/"
        lines += [head] if len(head) <= COLUMNS else [f"{card.id}  {card.title}", f"        katas/{card.dir}/"]
        for k in card.katas:
            st = status[progress.key(k)]
            lines.append(f"  {MARKS[st]} {k.name:<{name_w}}  {st:<8}  {k.module}.py")
    lines += [overall(status)] + ["  " + line for line in LEGEND]
    return lines


def reflow(text: str, indent: str = "  ") -> list[str]:
    """Notes' prose rewrapped to COLUMNS, paragraph by paragraph; an indented line (a formula, a
    table row) is kept as written, since wrapping it would break what it lines up."""
    out: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            out.extend(wrap(" ".join(prose), indent, indent))
            prose.clear()

    for line in text.strip().splitlines():
        if not line.strip():
            flush()
            out.append("")
        elif line[0].isspace():
            flush()
            out.append(indent + line.rstrip())
        else:
            prose.append(line.strip())
    flush()
    return out


def render_notes(card: manifest.Card) -> list[str]:
    from kvkata import interview  # the agenda and the rubric
    notes = card.notes()
    out = [f"{card.id}: {card.title}", "", f"Agenda ({interview.MINUTES} minutes; the candidate's sheet: "
           f"kvkata interview {card.id} --sheet):"] + interview.agenda_lines(card)
    out += ["", "Questions to ask, the answer to expect, and the rubric:"]
    for q in interview.questions(card):
        out += wrap(q.text, f"  {q.number}. ", "     ") + interview.rubric_lines(q)
    out += ["", "The derivation to expect:"] + reflow(notes["derivation"])
    out += ["", "Follow-ups:"]
    for f in notes["follow_ups"]:
        out += wrap(f["question"], f"  [{f['kind']}] ", "      ") + wrap(f["expect"], "      expect: ", "              ")
    out += ["", "Red flags (and the katas whose failures point to them):"]
    for r, katas in zip(notes["red_flags"], notes.get("red_flag_katas", [()] * len(notes["red_flags"]))):
        out += wrap(r, "  - ", "    ") + (wrap(f"({', '.join(katas)})", "      ", "       ") if katas else [])
    out += ["", "Which tests probe what:"]
    for t, what in notes["probes"].items():
        out += wrap(f"{t}: {what}", "  ", "      ")
    if notes.get("sources"):
        out += ["", "Sources:"]
        for src in notes["sources"]:
            out += wrap(src, "  - ", "    ")
    return out
