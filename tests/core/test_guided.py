"""Guided ES sampling: covariance sigma^2 Sigma, trace one, Woodbury inverse, FIFO."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_es import guided, noise

N_DIM, K = 5, 2
SIGMA = 0.3
SAMPLES = 400_000


def _filled_state(rows):
    state = guided.init(len(rows), N_DIM)
    for row in reversed(rows):  # push oldest first so rows[0] ends up newest
        state = guided.push(state, tf.constant(row, tf.float32))
    return state


def _covariance(space):
    basis = space.basis.numpy().astype(np.float64)
    return float(space.a) * np.eye(N_DIM) + float(space.b) * basis @ basis.T


def _samples(space, seed=0):
    seeds = noise.pair_seeds(seed, noise.STREAM_PERTURBATION, tf.range(SAMPLES),
                             tf.zeros([SAMPLES], tf.int32))
    z = noise.normal_rows(seeds, N_DIM + K)
    return guided.sample(space, z[:, :N_DIM], z[:, N_DIM:], SIGMA).numpy().astype(np.float64)


def test_empirical_covariance_matches_sigma_squared_sigma():
    rng = np.random.default_rng(0)
    space = guided.subspace(_filled_state(list(rng.normal(size=(K, N_DIM)))), alpha=0.5)
    assert int(space.rank) == K
    cov = SIGMA ** 2 * _covariance(space)
    eps = _samples(space)
    empirical = eps.T @ eps / SAMPLES
    # Var(x_i x_j) = C_ii C_jj + C_ij^2 for a zero-mean Gaussian.
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / SAMPLES)
    z = (empirical - cov) / se
    assert np.max(np.abs(z)) < 4.0, z
    np.testing.assert_allclose(np.trace(_covariance(space)), 1.0, rtol=1e-5)


def test_expected_squared_norm_is_sigma_squared():
    rng = np.random.default_rng(1)
    space = guided.subspace(_filled_state(list(rng.normal(size=(K, N_DIM)))), alpha=0.3)
    cov = SIGMA ** 2 * _covariance(space)
    squared = np.sum(_samples(space, seed=3) ** 2, axis=1)
    se = np.sqrt(2.0 * np.trace(cov @ cov) / SAMPLES)  # Var||eps||^2 = 2 tr(C^2)
    z = (squared.mean() - SIGMA ** 2) / se
    assert abs(z) < 4.0, z


def test_woodbury_inverse():
    rng = np.random.default_rng(2)
    space = guided.subspace(_filled_state(list(rng.normal(size=(K, N_DIM)))), alpha=0.4)
    v = rng.normal(size=(3, N_DIM))
    sigma_v = v @ _covariance(space)  # symmetric
    back = guided.inverse_covariance(space, tf.constant(sigma_v, tf.float32)).numpy()
    np.testing.assert_allclose(back, v, rtol=1e-3, atol=1e-4)


def test_degenerate_columns_are_dropped_not_orthonormalized():
    g = np.arange(1.0, N_DIM + 1)
    state = _filled_state([g, np.zeros(N_DIM), 2.0 * g])
    space = guided.subspace(state, alpha=0.5)
    assert int(space.rank) == 1
    basis = space.basis.numpy()
    assert np.all(np.isfinite(basis))
    norms = np.linalg.norm(basis, axis=0)
    np.testing.assert_allclose(sorted(norms), [0.0, 0.0, 1.0], atol=1e-6)
    direction = basis[:, np.argmax(norms)]
    np.testing.assert_allclose(abs(direction @ g) / np.linalg.norm(g), 1.0, rtol=1e-5)
    # Trace one with the one usable column.
    np.testing.assert_allclose(np.trace(_covariance(space)), 1.0, rtol=1e-5)


def test_empty_and_non_finite_fifo_falls_back_to_isotropic():
    state = guided.init(2, N_DIM)
    state = guided.push(state, tf.constant([np.nan] + [1.0] * (N_DIM - 1), tf.float32))
    space = guided.subspace(state, alpha=0.5)
    assert int(space.rank) == 0
    np.testing.assert_allclose(_covariance(space), np.eye(N_DIM) / N_DIM, rtol=1e-6)


def test_fifo_keeps_newest_k():
    state = guided.init(2, N_DIM)
    for i in range(4):
        state = guided.push(state, tf.fill([N_DIM], float(i + 1)))
    assert int(state.count) == 2
    np.testing.assert_array_equal(state.surrogates.numpy()[:, 0], [4.0, 3.0])
