"""Text for a terminal: the width every command's output fits, and prose wrapped to it (a leaf module)."""

from __future__ import annotations

import textwrap

COLUMNS = 80  # every line a command prints fits a terminal this wide (prose is wrapped to it)


def wrap(text: str, first: str = "", rest: str = "", width: int = COLUMNS) -> list[str]:
    """Prose wrapped to `width` columns (words never split: a long path stays whole)."""
    return textwrap.wrap(" ".join(text.split()), width=width, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False) or [first.rstrip()]
