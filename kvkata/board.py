"""The progress board and the rendering of interviewer notes, from data, never from a stored claim."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvkata import manifest


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

    def to_json(self) -> dict:
        tests = {n: {"outcome": o, "card": self.katas[n].card if n in self.katas else None,
                     "kata": self.katas[n].name if n in self.katas else None,
                     "duration": self.durations.get(n)} for n, o in self.results.items()}
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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render(state: RunState) -> list[str]:
    lines, not_run = [], []
    next_up = None
    width = max(40, *(len(c.title) for c in manifest.cards()))  # every bar in one column
    for card, statuses in tally(state):
        run = [s for s in statuses if s.state != "not run"]
        solved = sum(s.state == "solved" for s in statuses)
        if not run:
            not_run.append(card.id)
            continue
        if card.id in state.broken:
            lines.append(f"  {card.id}  {card.title:<{width}} does not import: see above")
            if next_up is None:
                next_up = ("broken", card)
            continue
        bar = "".join("#" if s.state == "solved" else "." for s in statuses)
        lines.append(f"  {card.id}  {card.title:<{width}} [{bar}] {solved}/{_plural(len(statuses), 'kata')} solved")
        for s in statuses:
            skipped = s.outcomes.count("skipped")
            if s.state == "solved" and skipped:
                lines.append(f"          {s.kata.name}: solved here; {_plural(skipped, 'test')} skipped and counted as "
                             f"passed (a GPU-only check without a CUDA device; pytest -rs says why)")
            if s.state == "partial":
                lines.append(f"          {s.kata.name}: {len(s.outcomes)} of {_plural(s.total, 'test')} ran and passed; "
                             f"solved once all of them pass in one run (pytest -k {s.kata.name})")
        if next_up is None:
            pending = next((s for s in statuses if s.state in ("failing", "todo")), None)
            if pending is not None:
                next_up = ("kata", pending)
    if not_run:
        lines.append(f"  not run in this session: {', '.join(not_run)}")
    if next_up is not None and next_up[0] == "broken":
        card = next_up[1]
        lines.append(f"  next: make katas/{card.dir}/ import again (pytest -k {card.id})")
    elif next_up is not None:
        s = next_up[1]
        k = s.kata
        verb = "fix" if s.state == "failing" else "fill in"
        lines.append(f"  next: {verb} {k.card} {k.name} in {k.where()}   (pytest -k {k.name}; kvkata hint {k.card})")
    elif any(s.state == "partial" for _, statuses in tally(state) for s in statuses):
        lines.append("  every test run in this session passes; run the whole kata to count it solved.")
    elif any(s.state != "not run" for _, statuses in tally(state) for s in statuses):
        lines.append("  every kata run in this session passes.")
    return lines


def render_notes(card: manifest.Card) -> list[str]:
    from kvkata import interview  # the agenda and the rubric
    notes = card.notes()
    out = [f"{card.id}: {card.title}", "", f"Agenda ({interview.MINUTES} minutes; the candidate's sheet: "
           f"kvkata interview {card.id} --sheet):"] + interview.agenda_lines(card)
    out += ["", "Questions to ask, the answer to expect, and the rubric:"]
    for q in interview.questions(card):
        out += [f"  {q.number}. {q.text}"] + interview.rubric_lines(q)
    out += ["", "The derivation to expect:"] + ["  " + ln for ln in notes["derivation"].strip().splitlines()]
    out += ["", "Follow-ups:"]
    for f in notes["follow_ups"]:
        out += [f"  [{f['kind']}] {f['question']}", f"      expect: {f['expect']}"]
    out += ["", "Red flags (and the katas whose failures point to them):"]
    for r, katas in zip(notes["red_flags"], notes.get("red_flag_katas", [()] * len(notes["red_flags"]))):
        out += [f"  - {r}"] + ([f"      ({', '.join(katas)})"] if katas else [])
    out += ["", "Which tests probe what:"] + [f"  {t}: {what}" for t, what in notes["probes"].items()]
    if notes.get("sources"):
        out += ["", "Sources:"] + [f"  - {s}" for s in notes["sources"]]
    return out
