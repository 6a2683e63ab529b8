"""Credit rules: which loss differences an antithetic pair's estimate is credited with.

* `SumCredit` (``objective="sum"``): every step's difference ``l_+ - l_-`` times ``xi``,
  an unbiased estimate of the gradient of the smoothed *sum* of per-step losses.
* `FinalCredit` (``objective="final"``): the meta-loss ``F`` at the end of an episode.
  Telescoped, each window end credits ``dF_j xi_j - dF_{j-1} xi_{j-1}``, which sums over
  the episode to ``dF_T xi_T``; or, with ``telescope=False``, ``dF_T xi_T`` is credited
  once, at the episode end. Both are unbiased for the final loss.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class Telescope(NamedTuple):
    """What telescoping remembers per pair from the last window end.

    Attributes:
        final_difference: float32 ``[pairs]``, ``F_+ - F_-`` at the last window end.
        final_accumulator: float32 ``[pairs, dim]``, ``xi`` at that moment.
    """

    final_difference: tf.Tensor
    final_accumulator: tf.Tensor


class SumCredit:
    """Credits every step's loss difference. Its state is empty."""

    final = False

    @staticmethod
    def init(num_pairs: int, dim: int):
        return ()

    @staticmethod
    def step(difference, accumulator):
        """The credit of one step's (clipped, finite-or-zero) differences."""
        return difference[:, None] * accumulator


class FinalCredit:
    """Credits the final meta-loss, telescoped over window ends (or at episode ends).

    Args:
        telescope: Credit telescoped differences at every window end (else the whole
            ``dF_T xi_T`` at the episode end).
        clip: Optional bound on ``|F_+ - F_-|``.
    """

    final = True

    def __init__(self, telescope: bool, clip: float | None):
        self.telescope, self.clip = telescope, clip

    @staticmethod
    def init(num_pairs: int, dim: int) -> Telescope:
        return Telescope(tf.zeros([num_pairs], tf.float32),
                         tf.zeros([num_pairs, dim], tf.float32))

    @staticmethod
    def step(difference, accumulator):
        return tf.zeros_like(accumulator)

    def telescoped(self, st: Telescope, accumulator, f_plus, f_minus):
        """``(dF_j, dF_j xi_j - dF_{j-1} xi_{j-1}, finite)`` per pair; pairs whose
        meta-losses are not finite get ``dF_j = 0`` and must not be credited."""
        finite = tf.math.is_finite(f_plus) & tf.math.is_finite(f_minus)
        difference = tf.where(finite, f_plus - f_minus, 0.0)
        if self.clip is not None:
            difference = tf.clip_by_value(difference, -self.clip, self.clip)
        term = (difference[:, None] * accumulator
                - st.final_difference[:, None] * st.final_accumulator)
        return difference, term, finite

    def episode_end(self, st: Telescope, accumulator, ended, step_bad, meta_losses):
        """Credit of the pairs whose episode ended at this step (``meta_losses``: a
        callable returning ``(F_+, F_-)``, called only if one did); ``step_bad``: pairs
        whose step loss was not finite (their telescoping restarts too).

        Returns ``(credit [pairs, dim], bad [pairs], telescope state)``: ``bad`` marks
        ended pairs whose meta-loss is not finite.
        """
        def at_end():
            _, part, f_ok = self.telescoped(st, accumulator, *meta_losses())
            return tf.where((ended & f_ok)[:, None], part, 0.0), ended & ~f_ok

        part, bad = tf.cond(tf.reduce_any(ended), at_end,
                            lambda: (tf.zeros_like(accumulator), tf.zeros_like(ended)))
        cleared = ended | step_bad | bad
        st = Telescope(tf.where(cleared, 0.0, st.final_difference),
                       tf.where(cleared[:, None], 0.0, st.final_accumulator))
        return part, bad, st

    def window_end(self, st: Telescope, accumulator, inside, f_plus, f_minus):
        """The window-end term of pairs ``inside`` an episode (a pair that has just
        restarted is at ``F_0 = 0`` and contributes nothing).

        Returns ``(credit, difference, finite, telescope state)``: ``difference`` is
        the credited ``dF`` of pairs inside an episode (what ``normalize`` and the
        outlier guard measure), ``finite`` marks pairs whose meta-losses are finite.
        """
        d, part, finite = self.telescoped(st, accumulator, f_plus, f_minus)
        ok = inside & finite
        if not self.telescope:
            return tf.zeros_like(part), tf.where(ok, d, 0.0), finite, st
        st = Telescope(tf.where(ok, d, 0.0), tf.where(ok[:, None], accumulator, 0.0))
        return tf.where(ok[:, None], part, 0.0), tf.where(ok, d, 0.0), finite, st


def credit_rule(objective: str, telescope: bool, clip: float | None):
    """The credit rule of an estimator."""
    return FinalCredit(telescope, clip) if objective == "final" else SumCredit()
