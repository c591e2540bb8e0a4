"""Worked solutions for card09."""
