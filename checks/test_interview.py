"""The mock interview: every question's expected answer and rubric, the 45-minute agenda, the
candidate's sheet, `interview --live` (blame, red flags, next questions) and the Anki deck."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from checks.conftest import run_kvkata as kvkata

from conftest import ROOT
from kvkata import board, interview, manifest

CARDS = manifest.cards()


def flat(text: str) -> str:
    return " ".join(text.split())


def probed_tests(card: manifest.Card) -> set[str]:
    return set(card.notes()["probes"])


# --- the notes ------------------------------------------------------------------------------

@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.id)
def test_every_question_has_an_expected_answer_a_three_level_rubric_and_the_katas_it_probes(card):
    notes = card.notes()
    answers = notes.get("answers", [])
    assert len(answers) == len(notes["questions"]), (
        f"{card.id}: {len(notes['questions'])} questions but {len(answers)} [[answers]] in its notes.toml")
    katas = {k.name for k in card.katas}
    for i, (q, a) in enumerate(zip(notes["questions"], answers), 1):
        where = f"{card.id} question {i} ({q[:50]!r})"
        for key in ("expect", *interview.RUBRIC):
            assert isinstance(a.get(key), str) and len(a[key].split()) >= 5, f"{where}: no {key!r}"
        assert len({flat(a[k]) for k in ("expect", *interview.RUBRIC)}) == 4, f"{where}: two of its answer lines are the same"
        assert len(re.findall(r"[.!?](?:\s|$)", a["expect"])) <= 4 and len(a["expect"]) <= 450, (
            f"{where}: the expected answer is 1-3 sentences, not {len(a['expect'])} characters")
        for key in interview.RUBRIC:
            assert "\n" not in a[key].strip() and len(a[key]) <= 260, f"{where}: the {key} line is one line"
        assert a.get("katas") and set(a["katas"]) <= katas, f"{where}: katas {a.get('katas')} must name {sorted(katas)}"
    tagged = {k for a in answers for k in a["katas"]}
    assert tagged == katas, f"{card.id}: no question probes {sorted(katas - tagged)}; --live could not follow its failure"


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.id)
def test_every_red_flag_names_the_katas_or_tests_whose_failure_points_to_it(card):
    notes = card.notes()
    mapping = notes.get("red_flag_katas")
    assert mapping is not None and len(mapping) == len(notes["red_flags"]), (
        f"{card.id}: red_flag_katas must hold one list per red flag ({len(notes['red_flags'])})")
    valid = {k.name for k in card.katas} | probed_tests(card)
    for flag, names in zip(notes["red_flags"], mapping):
        assert set(names) <= valid, f"{card.id}: {sorted(set(names) - valid)} is neither a kata nor a test ({flag[:50]!r})"
    assert sum(bool(names) for names in mapping) > len(mapping) // 2, f"{card.id}: most red flags show in a failing test"


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.id)
def test_the_agenda_fills_45_minutes_with_every_question_and_follow_up(card):
    parts = interview.agenda(card)
    assert [start for start, _, _ in parts] == [0] + [sum(m for _, m, _ in parts[:i]) for i in range(1, len(parts))]
    assert sum(m for _, m, _ in parts) == 45 and all(m >= 1 for _, m, _ in parts)
    text = "\n".join(what for _, _, what in parts)
    for q in interview.questions(card):
        assert f"question {q.number}:" in text
    assert text.count("follow-up [") == len(card.notes()["follow_ups"])
    assert all(k in text for k in interview.keyboard_katas(card))


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.id)
def test_interviewer_notes_show_the_agenda_and_each_questions_rubric(card):
    text = flat("\n".join(board.render_notes(card)))
    assert "Agenda (45 minutes" in text and "score each question against its rubric" in text
    for q in interview.questions(card):
        for line in (q.text, q.expect, *q.rubric.values()):
            assert flat(line) in text, f"{card.id}: {line[:60]!r} is not in the interviewer notes"


def _secret_lines(card: manifest.Card) -> list[str]:
    """Text the candidate must not see: the derivation, red flags, rubric, expected answers."""
    notes = card.notes()
    secret = [p for p in notes["derivation"].split("\n\n") if p.strip()]
    secret += notes["red_flags"] + [f["expect"] for f in notes["follow_ups"]]
    for q in interview.questions(card):
        secret += [q.expect, *q.rubric.values()]
    return secret


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.id)
def test_the_sheet_holds_every_question_and_nothing_for_the_interviewer(card):
    text = flat("\n".join(interview.sheet(card)))
    for q in card.notes()["questions"]:
        assert flat(q) in text
    for line in _secret_lines(card):
        assert flat(line)[:80] not in text, f"{card.id}: the sheet shows {line[:60]!r}"
    assert not re.search(r"strong:|adequate:|weak:|expect:|red flag|derivation", text, re.I)


@pytest.mark.slow
def test_kvkata_interview_card07_sheet_prints_the_questions_and_no_answer():
    proc = kvkata(ROOT, "interview", "card07", "--sheet", timeout=60)
    assert proc.returncode == 0, proc.stderr
    card = manifest.card("card07")
    text = flat(proc.stdout)
    for q in card.notes()["questions"]:
        assert flat(q) in text
    for line in _secret_lines(card):
        assert flat(line)[:80] not in text
    assert "Red flags" not in proc.stdout and "derivation" not in proc.stdout.lower() and "strong:" not in proc.stdout


# --- --live: blame, red flags, next questions (on synthetic reports, then on real runs) ---------

def _report(card: manifest.Card, failing: dict[str, str], passing_katas: set[str]) -> dict:
    """A --kvkata-json report: one passing test per kata in passing_katas, and `failing` {test: kata}."""
    tests, messages = {}, {}
    for k in passing_katas:
        tests[f"katas/{card.dir}/test_x.py::test_ok_{k}"] = {"outcome": "passed", "card": card.id, "kata": k}
    for t, k in failing.items():
        nodeid = f"katas/{card.dir}/test_x.py::{t}"
        tests[nodeid] = {"outcome": "failed", "card": card.id, "kata": k}
        messages[nodeid] = f"called {k}(...): returned 1; expected 2\nin {t} (kata {card.id} {k})"
    return {"tests": tests, "messages": messages}


def test_a_failure_is_blamed_on_the_called_kata_whose_own_tests_fail(tmp_path):
    card = manifest.card("card00")
    project = tmp_path / "p"
    (project / "katas" / card.dir).mkdir(parents=True)
    # The candidate's own call graph: attend calls repeat_kv, decode_step calls attend.
    (project / "katas" / card.dir / "cache.py").write_text(
        "def repeat_kv(x, n):\n    return x\n\n"
        "def attend(q, k, v):\n    k = repeat_kv(k, 2)\n    return q\n\n"
        "def decode_step(model, cache, tok):\n    return attend(tok, tok, tok)\n")
    data = _report(card, {"test_r": "repeat_kv", "test_a1": "attend", "test_a2": "attend", "test_d": "decode_step"},
                   {"prefill"})
    failures, _, _ = interview.blame(card, data, project)
    assert {f.test: f.blame for f in failures} == {"test_r": "repeat_kv", "test_a1": "repeat_kv",
                                                   "test_a2": "repeat_kv", "test_d": "repeat_kv"}
    # repeat_kv right: attend's own failures are attend's, and decode_step's are blamed on attend.
    data = _report(card, {"test_a1": "attend", "test_d": "decode_step"}, {"repeat_kv"})
    assert {f.test: f.blame for f in interview.blame(card, data, project)[0]} == {"test_a1": "attend", "test_d": "attend"}


def test_a_failure_raised_in_another_katas_code_is_blamed_on_that_kata(tmp_path):
    card = manifest.card("card00")
    project = tmp_path / "p"
    (project / "katas" / card.dir).mkdir(parents=True)
    (project / "katas" / card.dir / "cache.py").write_text(
        "def repeat_kv(x, n):\n    raise IndexError('boom')\n\n"
        "def attend(q, k, v):\n    return repeat_kv(k, 2)\n")
    data = _report(card, {"test_a": "attend"}, set())
    data["messages"][next(iter(data["messages"]))] = (
        f"IndexError: boom\nyour code:\n  katas/{card.dir}/cache.py:5 in attend: return repeat_kv(k, 2)\n"
        f"  katas/{card.dir}/cache.py:2 in repeat_kv: raise IndexError('boom')\nin test_a (kata card00 attend)")
    (f,) = interview.blame(card, data, project)[0]
    assert (f.kata, f.blame) == ("attend", "repeat_kv") and "raised" in f.why


def test_after_only_reshard_seconds_fails_the_next_questions_are_the_resharding_ones():
    card = manifest.card("card07")
    others = {k.name for k in card.katas} - {"reshard_seconds"}
    failing = {t: "reshard_seconds" for t in probed_tests(card) if t.startswith("test_reshard_seconds")}
    failures, _, _ = interview.blame(card, _report(card, failing, others))
    assert {f.blame for f in failures} == {"reshard_seconds"}
    asked = interview.next_questions(card, ["reshard_seconds"])
    placement = [q for q in interview.questions(card) if {"kv_heads_of_rank", "kv_bytes_per_rank"} & set(q.katas)]
    assert asked and placement and not {q.number for q in asked} & {q.number for q in placement}
    assert all("reshard_seconds" in q.katas for q in asked)
    flags = interview.pointed_red_flags(card, failures)
    assert 0 < len(flags) < len(card.notes()["red_flags"])


@pytest.mark.slow
def test_live_interview_blames_a_wrong_repeat_kv_shows_got_and_expected_and_only_its_red_flags(project_copy):
    card = manifest.card("card00")
    stub = project_copy / "katas" / card.dir / "cache.py"
    solution = (project_copy / "solutions" / card.dir / "cache.py").read_text()
    right = "x.repeat_interleave(G, dim=1)"
    assert solution.count(right) == 1, "card00's repeat_kv changed: update this check"
    stub.write_text(solution.replace(right, "x.repeat(1, G, 1, 1)"))  # tiles the heads: h reads h % Hkv
    proc = kvkata(project_copy, "interview", "--live", "card00")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "repeat_kv's code is wrong" in out and "attend's code is wrong" not in out, out
    attend_tests = [t for t in re.findall(r"^  (test_\w+)$", out, re.M) if "attend_" in t]
    assert attend_tests, out
    assert out.count("blamed on repeat_kv: attend calls repeat_kv") == len(attend_tests), out
    assert re.search(r"\| called attend\(.*got .*expected", out) and re.search(r"\| called repeat_kv\(", out), out
    listed = re.search(r"Red flags to listen for: the (\d+) of (\d+)", out)
    assert listed and 0 < int(listed.group(1)) < int(listed.group(2)) == len(card.notes()["red_flags"]), out
    after = out.split("Next questions", 1)[1]
    repeat_qs = [q for q in interview.questions(card) if "repeat_kv" in q.katas]
    assert repeat_qs and all(flat(q.text)[:60] in flat(after) for q in repeat_qs[:3]), out


@pytest.mark.slow
def test_live_interview_after_only_reshard_seconds_fails_asks_the_resharding_questions(project_copy):
    card = manifest.card("card07")
    stub = project_copy / "katas" / card.dir / "sharding.py"
    solution = (project_copy / "solutions" / card.dir / "sharding.py").read_text()
    right = "busiest = max(busiest, moves)"
    assert solution.count(right) == 1, "card07's reshard_seconds changed: update this check"
    stub.write_text(solution.replace(right, "busiest += moves"))  # the sum over GPUs: a red flag
    proc = kvkata(project_copy, "interview", "--live", "card07")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "reshard_seconds's code is wrong" in out and out.count("'s code is wrong") == 1, out
    after = flat(out.split("Next questions", 1)[1])
    for q in interview.questions(card):
        if "reshard_seconds" in q.katas:
            assert flat(q.text)[:60] in after, out
        if {"kv_heads_of_rank", "kv_bytes_per_rank"} & set(q.katas):
            assert flat(q.text)[:60] not in after, out


# --- the Anki deck ----------------------------------------------------------------------------

def test_the_markdown_renderer_renders_code_bold_and_lists():
    from kvkata.anki import markdown
    html = markdown("Use `x.repeat_interleave(G, dim=1)`, **not** `x.repeat(...)`.\n\n- one < two\n- `a*b`")
    assert "<code>x.repeat_interleave(G, dim=1)</code>" in html and "<b>not</b>" in html
    assert "<ul><li>one &lt; two</li><li><code>a*b</code></li></ul>" in html and "`" not in html
    assert markdown("1. a\n2. b") == "<ol><li>a</li><li>b</li></ol>"


def _deck(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(guid, fields, tags) of every note in an .apkg."""
    with zipfile.ZipFile(path) as z:
        z.extract("collection.anki2", path.parent / path.stem)
    db = sqlite3.connect(path.parent / path.stem / "collection.anki2")
    rows = db.execute("select guid, flds, tags from notes").fetchall()
    db.close()
    return [(g, f.split("\x1f"), t.split()) for g, f, t in rows]


def test_the_anki_deck_has_a_note_with_its_own_answer_per_question_and_follow_up(tmp_path):
    pytest.importorskip("genanki", reason="the Anki deck needs genanki (the dev extra)")
    from kvkata.anki import build_deck, markdown
    want = [(c.id, "question", q) for c in CARDS for q in c.notes()["questions"]]
    want += [(c.id, "follow-up", f["question"]) for c in CARDS for f in c.notes()["follow_ups"]]
    n = build_deck(tmp_path / "a.apkg")
    notes = _deck(tmp_path / "a.apkg")
    assert n == len(notes) == len(want)
    for card_id, kind, q in want:
        match = [f for _, f, tags in notes if card_id in tags and kind in tags and f[0] == markdown(q)]
        assert len(match) == 1, f"{card_id} {kind}: {q[:60]!r}"
    backs = [f[1] for _, f, _ in notes]
    assert len(set(backs)) == len(notes), "two notes share a back: each question has its own answer"
    assert max(len(b) for b in backs) < 2000, "a back is an answer, not the card's derivation"
    assert not any("`" in part for _, f, _ in notes for part in f), "Markdown backticks shown literally"
    for c in CARDS:  # the expected answers are the backs, not the derivation
        for q in interview.questions(c):
            assert any(markdown(q.expect)[3:60] in b for b in backs), f"{c.id} question {q.number}"
    build_deck(tmp_path / "b.apkg")
    assert sorted(g for g, _, _ in _deck(tmp_path / "b.apkg")) == sorted(g for g, _, _ in notes), (
        "the GUIDs change between builds: a re-import would duplicate the notes")
    assert len({g for g, _, _ in notes}) == len(notes)


@pytest.mark.slow
def test_kvkata_cards_anki_writes_the_deck(tmp_path):
    pytest.importorskip("genanki", reason="the Anki deck needs genanki (the dev extra)")
    proc = kvkata(ROOT, "cards", "--anki", str(tmp_path / "deck.apkg"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    total = sum(len(c.notes()["questions"]) + len(c.notes()["follow_ups"]) for c in CARDS)
    assert f"wrote {total} notes" in proc.stdout
