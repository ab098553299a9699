"""Helpers every stage uses: atomic file writes, the process pool of the per-image steps, checkpoint files."""
