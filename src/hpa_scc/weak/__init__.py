"""Weak supervision: pure functions from image-level labels to cell targets and back (no I/O)."""
