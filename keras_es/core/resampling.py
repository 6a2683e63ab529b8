"""Resampling rules: when a pair draws new noise, and whether its credit accumulates.

This is the one thing in which the unbiased online estimators differ:

| estimator | new noise | ``xi`` (what differences are credited with) |
|---|---|---|
| full ES | at episode start; one window = one episode | current score |
| truncated ES | at every window start | current score (biased) |
| PES | at every window start | sum of scores over the episode |
| PES with interval M | every M steps of the episode | sum over the episode |
| ES-Single | at episode start | current score |
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class Perturbation(NamedTuple):
    """Per-pair noise state (leading dimension: pairs).

    Attributes:
        noise: float32 ``[pairs, dim]``, the perturbation currently applied (``+noise``
            to particle ``2p``, ``-noise`` to ``2p + 1``).
        score: float32 ``[pairs, dim]``, the credit weight of ``noise`` (with a learned
            sigma, ``[pairs, dim + s]``: the log-sigma scores follow).
        accumulator: float32 ``[pairs, dim]``, ``xi``: the scores credited with the
            pair's loss differences (with a learned sigma, ``[pairs, dim + s]``).
    """

    noise: tf.Tensor
    score: tf.Tensor
    accumulator: tf.Tensor


class Resampling:
    """A resampling rule.

    Args:
        every: ``"episode"``, ``"window"`` or an int M (every M steps of the episode).
        accumulate: Whether ``xi`` sums the scores of the episode (PES) or holds the
            current one only.
    """

    def __init__(self, every: str | int, accumulate: bool):
        self.every, self.accumulate = every, accumulate

    @staticmethod
    def init(num_pairs: int, dim: int, score_width: int | None = None) -> Perturbation:
        """Zeros; the score and accumulator have ``score_width`` columns (default
        ``dim``; a learned sigma adds its own)."""
        zeros = tf.zeros([num_pairs, dim], tf.float32)
        if score_width is None or score_width == dim:
            return Perturbation(zeros, zeros, zeros)
        wide = tf.zeros([num_pairs, score_width], tf.float32)
        return Perturbation(zeros, wide, wide)

    def due(self, episode_step, active, window_start):
        """bool ``[pairs]``: pairs that draw new noise at this step."""
        if self.every == "episode":
            return active & tf.equal(episode_step, 0)
        if self.every == "window":
            return window_start
        return active & tf.equal(episode_step % self.every, 0)

    def update(self, st: Perturbation, draw, episode_start, eps, score) -> Perturbation:
        """Applies draws (``eps``, ``score`` where ``draw``) and updates ``xi``."""
        drawn = draw[:, None]
        noise = tf.where(drawn, eps, st.noise)
        score_now = tf.where(drawn, score, st.score)
        if self.accumulate:
            base = tf.where(episode_start[:, None], 0.0, st.accumulator)
        else:
            base = tf.zeros_like(st.accumulator)
        accumulator = tf.where(
            drawn, base + score,
            tf.where(episode_start[:, None], score_now, st.accumulator))
        return Perturbation(noise, score_now, accumulator)
