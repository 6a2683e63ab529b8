"""What one window produces: the running sums of `keras_es.Estimator.tell`, one
replica's partial estimate, and the window's result."""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf


class WindowSums(NamedTuple):
    """What `Estimator.tell` adds up over one window, per replica.

    Attributes:
        credit: float32 ``[pairs, dim]``, the credited differences times ``xi``.
        differences: float32 ``[pairs]``, the credited loss differences (``normalize``
            and ``clip_outliers`` measure them).
        loss_sum: Sum of the finite particles' per-step losses.
        loss_count: Number of those losses.
        invalid: bool ``[pairs]``, pairs not to be credited (a non-finite value).
        stepped: bool ``[pairs]``, pairs that took part in at least one step.
        diverged: int32, pairs reset after a non-finite value.
        sigma: With a learned sigma, its `keras_es.core.sampling.SigmaSums`; else ``()``.
    """

    credit: tf.Tensor
    differences: tf.Tensor
    loss_sum: tf.Tensor
    loss_count: tf.Tensor
    invalid: tf.Tensor
    stepped: tf.Tensor
    diverged: tf.Tensor
    sigma: Any = ()


class WindowPartials(NamedTuple):
    """One replica's share of a window, before `Estimator.combine` sums over replicas.

    Attributes:
        pair_gradients: float32 ``[pairs, dim]``, each local pair's estimate (zeros for
            invalid pairs).
        differences: float32 ``[pairs]``, the credited loss differences.
        valid: bool ``[pairs]``, pairs whose window was finite and credited.
        loss_sum: Sum of the finite particles' per-step losses.
        loss_count: Number of those losses.
        meta_sum: Sum of the finite window-end meta-losses (``objective="final"``).
        meta_count: Number of those meta-losses.
        diverged: int32, local pairs reset after a non-finite loss.
        sigma: With a learned sigma, its `keras_es.core.sampling.SigmaPartials`; else
            ``()``.
    """

    pair_gradients: tf.Tensor
    differences: tf.Tensor
    valid: tf.Tensor
    loss_sum: tf.Tensor
    loss_count: tf.Tensor
    meta_sum: tf.Tensor
    meta_count: tf.Tensor
    diverged: tf.Tensor
    sigma: Any = ()


class WindowResult(NamedTuple):
    """What one window of K steps produced.

    Attributes:
        gradient: float32 ``[dim]``, the estimate (zeros if no pair was valid).
        loss: Mean per-step loss of the finite particles over the window (NaN when
            no particle had a finite loss).
        meta_loss: Mean meta-loss at window end (``objective="final"``; else NaN, and
            NaN when no meta-loss was finite).
        valid_pairs: int32, pairs whose window was finite and credited (a pair whose
            huge but finite losses overflow their difference or credit is not).
        diverged_pairs: int32, pairs reset in this window after a non-finite loss.
        pair_gradients: float32 ``[pairs, dim]``, each pair's own estimate (zeros for
            invalid pairs); ``gradient`` is their mean over valid pairs. Under a
            strategy: only this replica's pairs.
        clipped_pairs: int32, valid pairs whose loss difference was clipped
            (``clip_outliers``).
        sigma: With a learned sigma (``learn_sigma``), float32 ``[s]``: sigma after
            this window's update, which the next draws use; else ``()``.
        sigma_gradient: With a learned sigma, float32 ``[s]``: the estimate of the
            gradient of the smoothed loss with respect to ``log sigma`` (mean over the
            pairs counted); else ``()``.
        pair_sigma_gradients: With a learned sigma, float32 ``[pairs, s]``: each pair's
            own log-sigma estimate (zeros for pairs not counted; under a strategy, only
            this replica's pairs); else ``()``.
    """

    gradient: tf.Tensor
    loss: tf.Tensor
    meta_loss: tf.Tensor
    valid_pairs: tf.Tensor
    diverged_pairs: tf.Tensor
    pair_gradients: tf.Tensor
    clipped_pairs: tf.Tensor
    sigma: Any = ()
    sigma_gradient: Any = ()
    pair_sigma_gradients: Any = ()
