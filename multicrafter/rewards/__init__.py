"""Rewards for IPPO: R = w_text R_text + w_aes R_aes + w_id R_id.

A reward function takes a batch (images, prompts, references, optional per-sample metadata such as a ToyWorld scene)
and returns one list of floats per component: {"text": [...], "aes": [...], "id": [...]}. Components that cannot be
computed for a sample are 0 with a note, never a crash. `composite` turns components into the weighted reward.
"""

from .base import RewardBatch, RewardFn, RewardOutput, composite

__all__ = ["RewardBatch", "RewardFn", "RewardOutput", "composite"]
