"""The guard: what non-finite and outlying losses may do to an estimate (nothing).

* A pair whose loss (either twin's) is not finite at a step is not credited for the
  window, and restarts its episode; so does a pair whose state went non-finite in the
  window's last step, before a checkpoint can save it.
* ``clip_loss_difference`` bounds each credited difference.
* ``clip_outliers`` credits a pair whose difference exceeds that multiple of the scale
  of the pairs' differences at that bound instead. The scale is the larger of the
  window's (upper) median difference over valid pairs and a running average of past
  windows' medians, so one outlier (a particle reporting 1e30) cannot throw theta or
  overflow the outer optimizer's slots, while ordinary differences are not touched
  (measured on a tuned MLP with 4 pairs: a bound of 10 medians clipped a pair in about
  1 window of 3, 100 in none of 12).
* ``fitness_shaping="rank"`` replaces each pair's difference by its signed rank among
  the pairs (`signed_ranks`), which bounds every pair's weight whatever its loss; it is
  applied in `keras_es.core.reduce.combine`, where every pair's difference is known.

State: `GuardState`, the same on every replica.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class GuardState(NamedTuple):
    """Attributes:
        diverged: int32 scalar, pairs reset after a non-finite loss, in total.
        scale: float32 scalar, the running scale of the pairs' loss differences
            (``clip_outliers``); 0 before the first window.
    """

    diverged: tf.Tensor
    scale: tf.Tensor


class Guard:
    """Args:
        clip_loss_difference: Optional bound on each credited difference.
        clip_outliers: Optional multiple of the differences' scale (see above).
    """

    def __init__(self, clip_loss_difference: float | None, clip_outliers: float | None):
        self.clip_loss_difference = clip_loss_difference
        self.clip_outliers = clip_outliers

    @staticmethod
    def init() -> GuardState:
        return GuardState(tf.constant(0, tf.int32), tf.constant(0.0))

    def differences(self, plus, minus, active):
        """``(difference, finite)`` per pair: the clipped ``l_+ - l_-`` of active pairs
        with two finite losses (0 elsewhere), and which pairs' losses are finite."""
        finite = tf.math.is_finite(plus) & tf.math.is_finite(minus)
        difference = tf.where(active & finite, plus - minus, 0.0)
        if self.clip_loss_difference is not None:
            c = self.clip_loss_difference
            difference = tf.clip_by_value(difference, -c, c)
        return difference, finite

    def outliers(self, state: GuardState, differences, valid, local_differences,
                 local_valid):
        """The factor each local pair's estimate is scaled by (``clip_outliers``).

        Args:
            state: The guard's state.
            differences: Every pair's credited difference (over all replicas).
            valid: Every pair's validity (over all replicas).
            local_differences: This replica's pairs' differences.
            local_valid: This replica's pairs' validity.

        Returns:
            ``(factor [local pairs], clipped pairs (float32), new scale)``.
        """
        median = masked_median(tf.abs(differences), valid & (differences != 0.0))
        bound = self.clip_outliers * tf.maximum(state.scale, median)
        magnitude = tf.abs(local_differences)
        over = local_valid & (bound > 0.0) & (magnitude > bound)
        factor = tf.where(over, bound / tf.where(over, magnitude, 1.0), 1.0)
        clipped = tf.reduce_sum(tf.cast(over, tf.float32))
        # The running scale follows the windows' medians (robust to the outliers it
        # exists for); a window without a nonzero difference leaves it.
        scale = tf.where(median > 0.0,
                         tf.where(state.scale > 0.0, 0.9 * state.scale + 0.1 * median,
                                  median),
                         state.scale)
        return factor, clipped, scale


def finite_particles(system_state, num_pairs: int) -> tf.Tensor:
    """bool ``[pairs]``: both twins' floating-point state leaves are finite."""
    ok = tf.ones([2 * num_pairs], tf.bool)
    for leaf in tf.nest.flatten(system_state):
        leaf = tf.convert_to_tensor(leaf)
        if leaf.dtype.is_floating and leaf.shape.rank and leaf.shape[0] == 2 * num_pairs:
            flat = tf.reshape(leaf, [2 * num_pairs, -1])
            ok &= tf.reduce_all(tf.math.is_finite(flat), axis=1)
    return ok[0::2] & ok[1::2]


def masked_median(x, mask):
    """The upper median of ``x`` where ``mask``; 0 where ``mask`` is empty. (Upper: with
    few pairs, the lower one of an even count understates the scale.)"""
    count = tf.reduce_sum(tf.cast(mask, tf.int32))
    ordered = tf.sort(tf.where(mask, x, tf.float32.max))
    return tf.where(count > 0, tf.gather(ordered, count // 2), 0.0)


def masked_std(x, mask):
    """Standard deviation of ``x`` where ``mask``."""
    m = tf.cast(mask, tf.float32)
    n = tf.maximum(tf.reduce_sum(m), 1.0)
    mean = tf.reduce_sum(x * m) / n
    return tf.sqrt(tf.reduce_sum(tf.square(x - mean) * m) / n)


def signed_ranks(differences, mask):
    """Rank-based fitness shaping of the pairs' loss differences ``d_p``: each pair
    where ``mask`` gets ``u_p = sign(d_p) F(|d_p|)``, with ``F`` the empirical
    distribution of ``|d|`` over the pairs in ``mask`` (``(rank + 1) / n``, rank 0 for
    the smallest; tied magnitudes share their mean rank); 0 elsewhere.

    ``u`` keeps each difference's sign (so it stays odd in the noise, as ``d`` is for an
    antithetic pair) and its order of magnitude among the pairs, and drops its scale:
    ``|u_p| <= 1`` whatever the losses, and a zero difference stays zero.
    """
    magnitude = tf.abs(differences)
    ordered = tf.sort(tf.where(mask, magnitude, float("inf")))
    below = tf.searchsorted(ordered, magnitude, side="left")
    at_or_below = tf.searchsorted(ordered, magnitude, side="right")
    count = tf.reduce_sum(tf.cast(mask, tf.float32))
    # Mean 1-based rank of the tied block [below, at_or_below).
    rank = 0.5 * tf.cast(below + at_or_below + 1, tf.float32)
    return tf.where(mask, tf.sign(differences) * rank / tf.maximum(count, 1.0), 0.0)
