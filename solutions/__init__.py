"""Worked solutions. The same module paths, names and docstrings as katas/."""
