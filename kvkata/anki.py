"""`kvkata cards --anki PATH`: an Anki deck, one note per interviewer question and per follow-up.

Front: the question. Back: its own answer (a question's expected answer and its strong and weak
rubric lines; a follow-up's expected answer), never the card's whole derivation. Text is Markdown
rendered to HTML by `markdown()` below. Written with genanki (an .apkg is a zip holding an SQLite
collection and a media map). Note GUIDs come from the card id and the question's text, so a
rebuilt deck updates the notes already imported instead of duplicating them.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path

from kvkata import interview, manifest


def _id(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) | (1 << 30)  # a stable positive 31-bit id


def _inline(text: str) -> str:
    """Escape HTML, then `code` and **bold** (inside code, nothing else is rendered)."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(part)))
    return "".join(out)


BULLET, NUMBER = re.compile(r"^\s*[-*] "), re.compile(r"^\s*\d+\. ")


def markdown(text: str) -> str:
    """A tiny Markdown renderer: paragraphs, `- ` and `1. ` lists, `code`, **bold**, line breaks."""
    blocks, out = re.split(r"\n\s*\n", text.strip()), []
    for block in blocks:
        lines = block.splitlines()
        for tag, marker in (("ul", BULLET), ("ol", NUMBER)):
            if all(marker.match(ln) for ln in lines):
                items = "".join("<li>" + _inline(marker.sub("", ln, count=1)) + "</li>" for ln in lines)
                out.append(f"<{tag}>{items}</{tag}>")
                break
        else:
            out.append("<p>" + "<br>".join(_inline(ln) for ln in lines) + "</p>")
    return "".join(out)


def notes_of(card: manifest.Card) -> list[tuple[str, str, str, str]]:
    """(kind, question, back in Markdown, guid key) for each of a card's questions and follow-ups."""
    out = []
    for q in interview.questions(card):
        back = f"{q.expect}\n\n- **Strong:** {q.rubric['strong']}\n- **Weak:** {q.rubric['weak']}"
        out.append(("question", q.text, back, q.text))
    for f in card.notes()["follow_ups"]:
        out.append((f"follow-up, {f['kind']}", f["question"], f["expect"], f["question"]))
    return out


def build_deck(path: Path) -> int:
    """Write the deck; return the number of notes."""
    import genanki

    model = genanki.Model(
        _id("kvkata interview note model, v2"), "kvkata interview note",
        fields=[{"name": "Question"}, {"name": "Answer"}, {"name": "Card"}],
        templates=[{"name": "Question", "qfmt": "<div class=card-id>{{Card}}</div>{{Question}}",
                    "afmt": "{{FrontSide}}<hr id=answer>{{Answer}}"}],
        css=(".card { font-family: sans-serif; font-size: 16px; text-align: left; } .card-id { color: grey; } "
             "code { background: #eee; padding: 0 2px; }"),
    )
    deck = genanki.Deck(_id("kvkata deck"), "kvkata: the KV cache, interview questions")
    count = 0
    for card in manifest.cards():
        for kind, question, back, key in notes_of(card):
            deck.add_note(genanki.Note(
                model=model, fields=[markdown(question), markdown(back), f"{card.id}: {html.escape(card.title)} ({kind})"],
                tags=[card.id, kind.split(",")[0].replace(" ", "-")], guid=genanki.guid_for(card.id, key)))
            count += 1
    genanki.Package(deck).write_to_file(str(path))
    return count
