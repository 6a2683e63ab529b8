"""Checking estimators against exact answers.

Helpers to run an estimator at a fixed theta and compare it with the exact gradient of
a :class:`~keras_es.systems.LinearQuadraticSystem`, where every unbiased estimator's
mean must equal it. keras_es's statistical tests and ``benchmarks/estimator_statistics.py``
use them; they work as well for checking a custom estimator configuration.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_es.systems import LinearQuadraticSystem

ORACLE_THETA = np.array([0.3, -0.2])


def oracle_system(seed: int = 1234) -> LinearQuadraticSystem:
    """Random stable linear dynamics (spectral radius 0.8, state dim 3, theta dim 2)
    with quadratic per-step and meta losses; evaluate at :data:`ORACLE_THETA`."""
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

    @tf.function
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
    ``objective="sum"``, telescoped window-end meta-losses for ``objective="final"``.
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
    tau = offset
    total = np.zeros(step_grads.shape[1])
    previous = meta_grads[tau - 1] if tau > 0 else 0.0
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
        if estimator.objective == "final" and tau > 0:
            total += meta_grads[tau - 1] - previous
            previous = meta_grads[tau - 1]
    return total


def z_scores(totals, expected):
    """Per-coordinate z-scores of the mean residual, with the SE from the pairs."""
    residual = totals - expected
    n = residual.shape[0]
    se = residual.std(axis=0, ddof=1) / np.sqrt(n)
    return residual.mean(axis=0) / se
