"""What replicas exchange: one window's partial estimates, summed into the estimate.

Under a ``tf.distribute`` strategy each replica holds a `keras_es.distribute.Shard` of
the pairs; `combine` is the only place they exchange anything: with
``clip_outliers``, ``normalize`` or ``fitness_shaping="rank"`` one all-reduce of two
floats per pair (every pair's credited difference and validity), then one of
``dim + 7`` floats packed from a nest (``3 s + 2`` more with a learned sigma).

Rank-based fitness shaping needs every pair's difference, so it is computed here, after
that first all-reduce: each replica ranks all pairs and scales its own. A learned
sigma's estimate and its update happen here too, identically on every replica.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_es import distribute as distribute_lib
from keras_es.core import guard as guard_lib
from keras_es.core.window import WindowResult


def combine(est, state, partials, shard: distribute_lib.Shard | None = None):
    """Sums the replicas' `WindowPartials` into the window's estimate.

    With ``clip_outliers``, ``normalize`` or ``fitness_shaping="rank"``, one all-reduce
    gathers every pair's credited difference (two floats per pair over all replicas)
    first; then one of ``dim + 7`` floats (``3 s + 2`` more with a learned sigma, whose
    estimate and Adam step follow). Every replica gets the same result, guard state and
    learned sigma.

    Returns:
        ``(state, WindowResult)``.
    """
    shard = shard or distribute_lib.single(int(partials.valid.shape[0]))
    pair_gradients, spread, guard, clipped = _shape(est, state.guard, partials, shard)
    nest = {
        "gradient": tf.reduce_sum(pair_gradients, 0),
        "valid": tf.reduce_sum(tf.cast(partials.valid, tf.float32)),
        "loss_sum": partials.loss_sum, "loss_count": partials.loss_count,
        "meta_sum": partials.meta_sum, "meta_count": partials.meta_count,
        "diverged": tf.cast(partials.diverged, tf.float32), "clipped": clipped}
    if est.learn_sigma is not None:
        nest["sigma"] = est.sampler.totals(partials.sigma)
    total = _all_reduce_nest(shard, nest)
    gradient = total["gradient"] / tf.maximum(total["valid"], 1.0)
    if spread is not None:
        gradient = tf.math.divide_no_nan(gradient, spread)
    # Counts are exact in float32 up to 2^24.
    diverged = tf.cast(tf.round(total["diverged"]), tf.int32)
    # A window without one finite loss has no mean loss: NaN, never 0 (which a
    # ModelCheckpoint(save_best_only=True) would take for the best epoch).
    meta_loss = (_mean(total["meta_sum"], total["meta_count"])
                 if est.credit.final else tf.constant(float("nan")))
    state = state._replace(guard=guard._replace(diverged=guard.diverged + diverged))
    learned = {}
    if est.learn_sigma is not None:
        sampler, pairs, estimate, sigma = est.sampler.combine(state.sampler, partials.sigma,
                                                              total["sigma"])
        state = state._replace(sampler=sampler)
        learned = {"sigma": sigma, "sigma_gradient": estimate, "pair_sigma_gradients": pairs}
    return state, WindowResult(
        gradient=tf.where(tf.math.is_finite(gradient), gradient, 0.0),
        loss=_mean(total["loss_sum"], total["loss_count"]), meta_loss=meta_loss,
        valid_pairs=tf.cast(tf.round(total["valid"]), tf.int32), diverged_pairs=diverged,
        pair_gradients=pair_gradients,
        clipped_pairs=tf.cast(tf.round(total["clipped"]), tf.int32), **learned)


def _shape(est, guard, partials, shard):
    """The pairs' estimates after fitness shaping, outlier clipping and ``normalize``:
    ``(pair_gradients, spread or None, guard state, clipped pairs)``."""
    pair_gradients, spread, clipped = partials.pair_gradients, None, tf.constant(0.0)
    if est.fitness_shaping == "rank":
        # Ranks bound every pair's utility: nothing is left for the outlier clip.
        differences, valid = _gather_pairs(shard, partials)
        utilities = guard_lib.signed_ranks(differences, valid)
        local = tf.gather(utilities, shard.first_pair + tf.range(tf.shape(partials.valid)[0]))
        # credit / d is the pair's xi when xi was constant over the window (else the
        # steps' xi weighted by their share of d); the utility replaces d.
        shaped = tf.math.divide_no_nan(pair_gradients, partials.differences[:, None])
        pair_gradients = tf.where(partials.valid[:, None], shaped * local[:, None], 0.0)
        return pair_gradients, spread, guard, clipped
    if est.normalize or est.clip_outliers is not None:
        differences, valid = _gather_pairs(shard, partials)
        if est.normalize:
            spread = guard_lib.masked_std(differences, valid)
        if est.clip_outliers is not None:
            factor, clipped, scale = est.guard.outliers(
                guard, differences, valid, partials.differences, partials.valid)
            pair_gradients = pair_gradients * factor[:, None]
            guard = guard._replace(scale=scale)
    return pair_gradients, spread, guard, clipped


def _mean(total, count):
    return tf.where(count > 0, tf.math.divide_no_nan(total, count), float("nan"))


def _gather_pairs(shard, partials):
    """Every pair's credited difference and validity, over all replicas: each replica
    writes its own into a zero vector over all pairs, so one sum carries them (x + 0 is
    exact) with static shapes."""
    index = (shard.first_pair + tf.range(tf.shape(partials.valid)[0]))[:, None]
    size = [shard.total_pairs]
    gathered = shard.all_reduce(tf.stack([
        tf.scatter_nd(index, tf.where(partials.valid, partials.differences, 0.0), size),
        tf.scatter_nd(index, tf.cast(partials.valid, tf.float32), size)]))
    return gathered[0], gathered[1] > 0.5


def _all_reduce_nest(shard, nest):
    """Sums a nest of float32 tensors over replicas in one all-reduce."""
    leaves = [tf.convert_to_tensor(v, tf.float32) for v in tf.nest.flatten(nest)]
    sizes = [int(np.prod(v.shape)) for v in leaves]
    total = shard.all_reduce(tf.concat([tf.reshape(v, [-1]) for v in leaves], 0))
    parts = tf.split(total, sizes)
    return tf.nest.pack_sequence_as(
        nest, [tf.reshape(p, v.shape) for p, v in zip(parts, leaves, strict=True)])
