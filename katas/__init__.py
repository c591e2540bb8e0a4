"""Your katas: fill in the stubs. Run `pytest -k card00` to check one card, `kvkata` for the board."""
