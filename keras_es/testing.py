"""Checking estimators against exact answers.

Helpers to run an estimator at a fixed theta and compare it with the exact gradient of
a `LinearQuadraticSystem`, where every unbiased estimator's
mean must equal it. keras_es's statistical tests and ``benchmarks/estimator_statistics.py``
use them; they work as well for checking a custom estimator configuration.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_es import estimators as es
from keras_es.systems import LinearQuadraticSystem
from keras_es.unrolled import UnrolledSystem

ORACLE_THETA = np.array([0.3, -0.2])


def oracle_system(seed: int = 1234) -> LinearQuadraticSystem:
    """Random stable linear dynamics (spectral radius 0.8, state dim 3, theta dim 2)
    with quadratic per-step and meta losses; evaluate at `ORACLE_THETA`."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return LinearQuadraticSystem(
        A=0.8 * q, B=rng.normal(size=(3, 2)), c=rng.normal(size=3) * 0.3,
        H=np.eye(3), y=rng.normal(size=3), s0=rng.normal(size=3),
        meta_H=rng.normal(size=(2, 3)), meta_y=rng.normal(size=2))


def run_windows(estimator, system, theta, num_pairs, num_windows, seed=0, surrogate=None):
    """Runs burn-in then ``num_windows`` windows at a fixed theta.

    Returns ``(per-pair totals [pairs, dim] float64, list of WindowResult)``: the sum of
    each pair's per-window estimates, which are independent across pairs.
    """
    theta = tf.constant(np.asarray(theta, np.float32))
    state = estimator.init(num_pairs, int(theta.shape[0]))
    if surrogate is not None:
        state = estimator.push_surrogate(state, tf.constant(surrogate, tf.float32))
    sys_state = estimator.init_system(system, num_pairs, seed)
    sys_state, state = estimator.burn_in(system, sys_state, state, theta, seed)

    @tf.function(autograph=False)
    def window(sys_state, state):
        return estimator.window(system, sys_state, state, theta, seed)

    totals = np.zeros((num_pairs, int(theta.shape[0])))
    results = []
    for _ in range(num_windows):
        sys_state, state, result = window(sys_state, state)
        totals += result.pair_gradients.numpy().astype(np.float64)
        results.append(result)
    return totals, results


def expected_totals(estimator, system, theta, num_pairs, num_windows):
    """Exact expected per-pair totals ``[pairs, dim]`` for an unbiased estimator.

    Simulates each pair's within-episode counter (start offsets, horizon resets) and
    adds the exact gradient of every credited loss: per-step losses for
    ``objective="sum"``, telescoped window-end meta-losses for ``objective="final"``
    (or episode-end meta-losses only, with ``telescope=False``).
    """
    horizon = estimator.horizon
    steps = num_windows * estimator.truncation_length + (horizon or 0)
    step_grads = system.step_gradients(theta, horizon or steps)
    meta_grads = system.step_gradients(theta, horizon or steps, meta=True)
    offsets = estimator.start_offsets(num_pairs).numpy()
    cache = {}
    out = np.zeros((num_pairs, system.dim))
    for p, offset in enumerate(offsets):
        if offset not in cache:
            cache[offset] = _expected_for_offset(estimator, step_grads, meta_grads,
                                                 int(offset), num_windows)
        out[p] = cache[offset]
    return out


def _expected_for_offset(estimator, step_grads, meta_grads, offset, num_windows):
    horizon = estimator.horizon
    telescope = estimator.telescope
    tau = offset
    total = np.zeros(step_grads.shape[1])
    previous = meta_grads[tau - 1] if tau > 0 and telescope else 0.0
    for _ in range(num_windows):
        for _ in range(estimator.truncation_length):
            tau += 1
            if estimator.objective == "sum":
                total += step_grads[tau - 1]
            if horizon is not None and tau == horizon:
                if estimator.objective == "final":
                    total += meta_grads[tau - 1] - previous
                    previous = 0.0
                tau = 0
        if estimator.objective == "final" and tau > 0 and telescope:
            total += meta_grads[tau - 1] - previous
            previous = meta_grads[tau - 1]
    return total


def z_scores(totals, expected):
    """Per-coordinate z-scores of the mean residual, with the SE from the pairs."""
    residual = totals - expected
    n = residual.shape[0]
    se = residual.std(axis=0, ddof=1) / np.sqrt(n)
    return residual.mean(axis=0) / se


def oracle_estimators(sigma: float, truncation_length: int, horizon: int) -> dict:
    """``{name: factory(objective) -> Estimator}`` for every unbiased configuration:
    full ES, ES-Single (staggered or not), PES with window, per-step, M = 3 and M >= T
    resampling, and guided ES-Single / PES (unbiased ``Sigma^-1 eps`` weighting)."""
    s, k, t = sigma, truncation_length, horizon
    guided = es.GuidedConfig(k=1, alpha=0.5, weighting="inverse_covariance")
    return {
        "full_es": lambda obj: es.full_es(s, horizon=t, objective=obj),
        "es_single": lambda obj: es.es_single(s, k, horizon=t, objective=obj),
        "es_single_unstaggered": lambda obj: es.es_single(s, k, horizon=t, objective=obj,
                                                          stagger=False),
        "pes": lambda obj: es.pes(s, k, horizon=t, objective=obj),
        "pes_M1": lambda obj: es.pes(s, k, horizon=t, resample_interval=1, objective=obj),
        "pes_M3": lambda obj: es.pes(s, k, horizon=t, resample_interval=3, objective=obj),
        "pes_M_ge_T": lambda obj: es.pes(s, k, horizon=t, resample_interval=t, objective=obj),
        "guided_es_single": lambda obj: es.es_single(s, k, horizon=t, objective=obj,
                                                     guided=guided),
        "guided_pes": lambda obj: es.pes(s, k, horizon=t, objective=obj, guided=guided),
    }


class MemorylessSystem(UnrolledSystem):
    """Step t's loss is ``0.5 ||theta - a_t||^2`` with ``a_t = targets[t]``.

    Per-step gradients ``theta - a_t`` are independent across steps: the case where
    PES's variance grows with the number of windows while ES-Single's does not.
    """

    def __init__(self, targets):
        self.targets = tf.constant(targets, tf.float32)

    def init(self, keys):
        return tf.zeros([tf.shape(keys)[0]], tf.int32)

    def step(self, state, theta, keys):
        target = tf.gather(self.targets, state)
        return state + 1, 0.5 * tf.reduce_sum(tf.square(theta - target), axis=-1), None


def es_total_variance(gradient) -> float:
    """Closed-form total variance of one pair's ES / ES-Single estimate on a quadratic:
    ``(P + 1) ||g||^2``."""
    g = np.asarray(gradient, np.float64)
    return float((g.size + 1) * np.sum(g ** 2))


def pes_total_variance(window_gradients) -> float:
    """Closed-form total variance of one pair's per-episode PES estimate when window j's
    loss depends only on window j's noise: ``sum_j (P + 1 + (j - 1) P) ||g_j||^2``."""
    g = np.asarray(window_gradients, np.float64)
    p = g.shape[1]
    return float(sum((p + 1 + j * p) * np.sum(gj ** 2) for j, gj in enumerate(g)))


def total_variance(totals) -> tuple[float, float]:
    """Sample total variance of per-pair estimates ``[pairs, dim]`` and its standard error."""
    centred = totals - totals.mean(0)
    per_pair = np.sum(centred ** 2, axis=1)
    return float(per_pair.mean()), float(per_pair.std(ddof=1) / np.sqrt(len(per_pair)))
