"""Where the project lives. A leaf: it imports nothing from kvkata, so that every kvkata module can use it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: katas/, solutions/, kvref/, kvkata/
