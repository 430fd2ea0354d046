"""Gradient-projection and rotated optimizers built on :mod:`decomp` (not implemented yet)."""
