"""Where the project lives. A leaf: it imports nothing from kvkata, so that every kvkata module can use it."""

import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: katas/, solutions/, kvref/, kvkata/
# The stubs as shipped, one archive inside the package (`kvkata dev snapshot` writes it).
PRISTINE = Path(__file__).resolve().parent / "pristine.zip"


def pristine_text(rel: Path) -> str:
    """A stub file (`rel`, from the project root) as shipped. FileNotFoundError when the archive lacks it."""
    with zipfile.ZipFile(PRISTINE) as z:
        try:
            return z.read(Path(rel).as_posix()).decode()
        except KeyError:
            raise FileNotFoundError(f"{rel} has no pristine copy in {PRISTINE.name}") from None
