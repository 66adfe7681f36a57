"""Evaluation command lines: `python -m multicrafter.eval toy ...` (ToyWorld) and `... faces ...` (real photos)."""
