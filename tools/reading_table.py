"""Print the spoiler rows of README's table of what to read in kvref, from kvkata/cards.toml.

    python tools/reading_table.py

Each answer module (`answers` in cards.toml) is a row naming exactly the cards it answers, with its
docstring's topic; paste the rows into README.md's table when a card's answers change
(checks/test_kata_contract.py compares the README with cards.toml).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvkata.manifest import reading_table  # noqa: E402

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(reading_table())
