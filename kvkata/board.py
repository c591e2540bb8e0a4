"""The progress board and the rendering of interviewer notes, from data, never from a stored claim."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvkata import manifest


@dataclass
class KataStatus:
    kata: manifest.Kata
    outcomes: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if not self.outcomes:
            return "not run"
        if all(o in ("passed", "skipped") for o in self.outcomes) and "passed" in self.outcomes:
            return "solved"
        if all(o == "todo" for o in self.outcomes):
            return "todo"
        return "failing"


def tally(results: dict[str, str], katas: dict[str, manifest.Kata]) -> list[tuple[manifest.Card, list[KataStatus]]]:
    """Group this run's outcomes by card and kata, in manifest order."""
    table = []
    for card in manifest.cards():
        statuses = {k.name: KataStatus(k) for k in card.katas}
        for nodeid, outcome in results.items():
            kata = katas.get(nodeid)
            if kata is not None and kata.card == card.id:
                statuses[kata.name].outcomes.append(outcome)
        table.append((card, list(statuses.values())))
    return table


def render(table) -> list[str]:
    lines = []
    next_up = None
    for card, statuses in table:
        run = [s for s in statuses if s.state != "not run"]
        solved = sum(s.state == "solved" for s in statuses)
        if not run:
            lines.append(f"  {card.id}  {card.title:<40} not run in this session ({len(statuses)} katas)")
            continue
        bar = "".join("#" if s.state == "solved" else "." for s in statuses)
        lines.append(f"  {card.id}  {card.title:<40} [{bar}] {solved}/{len(statuses)} katas solved")
        if next_up is None:
            next_up = next((s for s in statuses if s.state in ("failing", "todo")), None)
    if next_up is not None:
        k = next_up.kata
        verb = "fix" if next_up.state == "failing" else "fill in"
        lines.append(f"  next: {verb} {k.card} {k.name} in {k.where()}   (pytest -k {k.card}; kvkata hint {k.card})")
    elif any(s.state != "not run" for _, statuses in table for s in statuses):
        lines.append("  every kata run in this session passes.")
    return lines


def render_notes(card: manifest.Card) -> list[str]:
    notes = card.notes()
    out = [f"{card.id}: {card.title}", "", "Questions to ask:"]
    out += [f"  {i}. {q}" for i, q in enumerate(notes["questions"], 1)]
    out += ["", "The derivation to expect:"] + ["  " + ln for ln in notes["derivation"].strip().splitlines()]
    out += ["", "Follow-ups:"]
    for f in notes["follow_ups"]:
        out += [f"  [{f['kind']}] {f['question']}", f"      expect: {f['expect']}"]
    out += ["", "Red flags:"] + [f"  - {r}" for r in notes["red_flags"]]
    out += ["", "Which tests probe what:"] + [f"  {t}: {what}" for t, what in notes["probes"].items()]
    if notes.get("sources"):
        out += ["", "Sources:"] + [f"  - {s}" for s in notes["sources"]]
    return out
