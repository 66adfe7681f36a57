"""Metrics: Hungarian multi-ID matching (shared by faces, objects and ToyWorld) and the paper's image metrics."""

from .hungarian import HungarianResult, hungarian_match

__all__ = ["HungarianResult", "hungarian_match"]
