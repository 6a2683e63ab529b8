"""The two options from the ES primer: rank-based fitness shaping and a learned sigma.

* ``fitness_shaping="rank"`` replaces each pair's loss difference by its signed rank.
  On a linear loss ``g . theta`` its mean is exactly ``c g / ||g||`` with
  ``c = ((n - 1) / (n sqrt(pi)) + sqrt(2 / pi) / n) / (2 sigma)`` for ``n`` pairs: a
  positive multiple of the gradient's direction, whatever ``||g||`` (the z-test below).
* ``learn_sigma`` estimates the gradient of the smoothed loss with respect to
  ``log sigma``. For a quadratic it is exact: ``E l(theta + eps) = l(theta) +
  0.5 sum_i sigma_i^2 M_ii``, so ``d / d log sigma_i = sigma_i^2 M_ii``, where ``M`` is
  the Hessian of the step's loss in the noise that reaches it (ES-Single: the episode's
  one draw; PES: each window's draw, separately).

Tolerances are z-scores with standard errors measured from the samples; seeds are
fixed.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es import distribute, testing
from keras_es.core import guard
from keras_es.estimators import LearnedSigma, resolve

SIGMA = 0.1


class _Linear(keras_es.UnrolledSystem):
    """Every step's loss is ``g . theta + offset``."""

    def __init__(self, gradient, offset=3.0):
        self.gradient = tf.constant(gradient, tf.float32)
        self.offset = offset

    def init(self, keys):
        return tf.zeros([tf.shape(keys)[0]])

    def step(self, state, theta, keys):
        return state, tf.linalg.matvec(theta, self.gradient) + self.offset, None


class _Quadratic(keras_es.UnrolledSystem):
    """Every step's loss is ``curvature * 0.5 ||theta - 1||^2``."""

    def __init__(self, curvature):
        self.curvature = curvature

    def init(self, keys):
        return tf.zeros([tf.shape(keys)[0]])

    def step(self, state, theta, keys):
        return state, self.curvature * 0.5 * tf.reduce_sum(tf.square(theta - 1.0), -1), None


def _one_window(estimator, losses, pairs=64, dim=3, seed=0):
    """One step of ask/tell, then finish and combine, with ``losses(thetas)``."""
    state = estimator.init(pairs, dim)
    state, thetas = estimator.ask(state, tf.zeros([dim]), seed)
    state, sums, _ = estimator.tell(state, estimator.start_window(state), losses(thetas))
    state, partials, _ = estimator.finish(state, sums)
    return (*estimator.combine(state, partials), thetas)


# ---------------------------------------------------------------------- rank shaping
def test_signed_ranks():
    differences = tf.constant([3.0, -1.0, 0.0, 2.0, -2.0, 5.0])
    valid = tf.constant([True, True, True, True, True, False])
    # |d| of the valid pairs: 3, 1, 0, 2, 2 -> ranks 5, 2, 1, 3.5 (tied), 3.5 of 5.
    np.testing.assert_allclose(guard.signed_ranks(differences, valid).numpy(),
                               [1.0, -0.4, 0.0, 0.7, -0.7, 0.0], rtol=1e-6)


@pytest.mark.slow
def test_rank_shaping_on_a_linear_loss_is_a_positive_multiple_of_the_gradient():
    g = np.array([1.0, -2.0, 0.5])
    pairs, windows = 2000, 100
    # One step per episode and window: every window draws fresh noise, so the windows'
    # estimates are independent replicates (the ranks couple the pairs of a window).
    estimator = keras_es.full_es(SIGMA, horizon=1, fitness_shaping="rank")
    _, results = testing.run_windows(estimator, _Linear(g), np.zeros(3), pairs, windows,
                                     seed=3)
    estimates = np.array([r.gradient.numpy() for r in results], np.float64)
    c = ((pairs - 1) / pairs / math.sqrt(math.pi) + math.sqrt(2 / math.pi) / pairs) \
        / (2 * SIGMA)
    expected = c * g / np.linalg.norm(g)
    se = estimates.std(0, ddof=1) / np.sqrt(windows)
    z = (estimates.mean(0) - expected) / se
    assert np.all(np.abs(z) < 4.0), z
    # The test resolves the expected value to within 1% (4 SE).
    assert np.all(4 * se < 0.01 * np.linalg.norm(expected)), se


def test_rank_shaping_ignores_the_loss_scale():
    def loss(thetas, scale=1.0):
        return scale * tf.reduce_sum(tf.square(thetas - [1.0, -0.5, 2.0]), -1) + 7.0

    for estimator in (keras_es.es_single(SIGMA, 1, horizon=4, fitness_shaping="rank"),
                      keras_es.es_single(SIGMA, 1, horizon=4)):
        _, small, _ = _one_window(estimator, loss)
        _, large, _ = _one_window(estimator, lambda t: loss(t, 1000.0))
        ratio = np.linalg.norm(large.gradient) / np.linalg.norm(small.gradient)
        expected_ratio = 1.0 if estimator.fitness_shaping else 1000.0
        np.testing.assert_allclose(ratio, expected_ratio, rtol=1e-4)
        if estimator.fitness_shaping:
            np.testing.assert_allclose(large.gradient, small.gradient, rtol=1e-4)


def test_rank_shaping_bounds_an_outlier():
    def loss(thetas, outlier=0.0):
        base = tf.reduce_sum(tf.square(thetas - [1.0, -0.5, 2.0]), -1)
        return base + tf.one_hot(0, tf.shape(thetas)[0]) * outlier

    shaped = keras_es.es_single(SIGMA, 1, horizon=4, fitness_shaping="rank")
    _, clean, thetas = _one_window(shaped, loss)
    _, spiked, _ = _one_window(shaped, lambda t: loss(t, 1e30))
    # The outlier moves only its own pair's term, by at most |u| <= 1 times its xi.
    eps = (thetas[0] - thetas[1]).numpy() / 2
    bound = 2 * np.linalg.norm(eps) / (2 * SIGMA ** 2) / 64
    assert np.linalg.norm(spiked.gradient - clean.gradient) <= bound
    assert int(spiked.clipped_pairs) == 0  # nothing left for clip_outliers
    plain = keras_es.es_single(SIGMA, 1, horizon=4, clip_outliers=None)
    _, raw, _ = _one_window(plain, lambda t: loss(t, 1e30))
    assert np.linalg.norm(raw.gradient.numpy().astype(np.float64)) > 1e25


# ---------------------------------------------------------------------- learned sigma
def _expected_log_sigma(estimator, system, pairs, windows, per_dimension):
    """Exact expected per-pair totals of the log-sigma estimate on a
    `LinearQuadraticSystem`: ``sigma^2 diag(J^T H^T H J)`` per step, summed over the
    blocks of noise that reach the step (``J``: the block's effect on the state)."""
    A, B, H = (np.asarray(m, np.float64) for m in (system.A, system.B, system.H))
    T, K = estimator.horizon, estimator.truncation_length
    # Within-episode steps that draw: ES-Single once, unstaggered PES every window.
    draws = [1] if estimator.resample == "episode" else list(range(1, T + 1, K))

    def per_step(tau):
        starts = [d for d in draws if d <= tau] + [tau + 1]
        total = np.zeros(B.shape[1])
        for first, nxt in zip(starts[:-1], starts[1:], strict=True):
            J = sum(np.linalg.matrix_power(A, tau - u) @ B for u in range(first, nxt))
            total += np.diag(J.T @ H.T @ H @ J)
        return estimator.sigma ** 2 * total

    cache, out = {}, []
    for offset in estimator.start_offsets(pairs).numpy():
        if offset not in cache:
            tau, total = int(offset), np.zeros(B.shape[1])
            for _ in range(windows * K):
                tau += 1
                total += per_step(tau)
                tau = 0 if tau == T else tau
            cache[offset] = total
        out.append(cache[offset])
    out = np.asarray(out)
    return out if per_dimension else out.sum(1, keepdims=True)


ESTIMATE_ONLY = LearnedSigma(learning_rate=0.0)  # sigma stays put: one smoothed loss
CASES = {
    "es_single": lambda: keras_es.es_single(SIGMA, 4, horizon=12, learn_sigma=ESTIMATE_ONLY),
    "es_single_unstaggered": lambda: keras_es.es_single(
        SIGMA, 4, horizon=12, stagger=False, learn_sigma=ESTIMATE_ONLY),
    "pes": lambda: keras_es.pes(SIGMA, 4, horizon=12, stagger=False,
                                learn_sigma=ESTIMATE_ONLY),
    "pes_one_sigma": lambda: keras_es.pes(
        SIGMA, 4, horizon=12, stagger=False,
        learn_sigma=LearnedSigma(learning_rate=0.0, per_dimension=False)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_log_sigma_estimate_matches_the_smoothed_quadratic(name, oracle_system):
    estimator = CASES[name]()
    pairs, windows = 10_000, 6
    _, results = testing.run_windows(estimator, oracle_system, testing.ORACLE_THETA, pairs,
                                     windows, seed=7)
    totals = sum(r.pair_sigma_gradients.numpy().astype(np.float64) for r in results)
    expected = _expected_log_sigma(estimator, oracle_system, pairs, windows,
                                   estimator.learn_sigma.per_dimension)
    z = testing.z_scores(totals, expected)
    assert np.all(np.abs(z) < 4.0), f"{name}: z={z}"
    se = totals.std(0) / np.sqrt(pairs)
    assert np.linalg.norm(expected.mean(0)) > 5 * np.linalg.norm(se), "oracle too weak"
    # The window's estimate is the mean of its pairs' (sigma stayed where it was).
    np.testing.assert_allclose(results[0].sigma_gradient,
                               results[0].pair_sigma_gradients.numpy().mean(0),
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(results[-1].sigma, SIGMA, rtol=1e-6)


@pytest.mark.slow
def test_pes_and_es_single_credit_different_smoothings(oracle_system):
    """The oracle tells the two apart: ES-Single's one draw per episode reaches every
    later step, PES's draws only their own window's and after."""
    estimator = keras_es.es_single(SIGMA, 4, horizon=12, stagger=False,
                                   learn_sigma=ESTIMATE_ONLY)
    pes = keras_es.pes(SIGMA, 4, horizon=12, stagger=False)
    _, results = testing.run_windows(estimator, oracle_system, testing.ORACLE_THETA, 5000, 3,
                                     seed=7)
    totals = sum(r.pair_sigma_gradients.numpy().astype(np.float64) for r in results)
    z = testing.z_scores(totals, _expected_log_sigma(pes, oracle_system, 5000, 3, True))
    assert np.max(np.abs(z)) > 5.0, z


@pytest.mark.slow
@pytest.mark.parametrize("curvature, direction", [(1.0, -1.0), (-1.0, 1.0)])
def test_learned_sigma_descends_the_smoothed_loss(curvature, direction):
    """Convex: the smoothed loss grows with sigma, which shrinks; concave: it grows.
    Through `resolve`'s names; MetaTrainer logs sigma."""
    trainer = keras_es.MetaTrainer(_Quadratic(curvature), "pes", [0.5, 0.5], 16, seed=1,
                                   sigma=SIGMA, truncation_length=2, learn_sigma=True)
    history = trainer.train(20)
    for key in ("sigma_0", "sigma_1"):
        # Adam steps of at most 0.01 on log sigma, nearly all in the same direction.
        steps = np.diff(np.log([SIGMA, *history[key]]))
        assert np.all(np.abs(steps) < 0.0101), steps
        assert np.mean(direction * steps > 0.0) >= 0.9, steps
        assert direction * steps.sum() > 0.05, steps
    np.testing.assert_allclose(trainer.state.sampler.log_sigma.numpy(),
                               np.log([history["sigma_0"][-1], history["sigma_1"][-1]]),
                               rtol=1e-6)


@pytest.mark.slow
def test_learned_sigma_stays_within_its_bounds():
    learn = LearnedSigma(learning_rate=0.5, min_sigma=0.05, max_sigma=0.2)
    for curvature, bound in ((1.0, 0.05), (-1.0, 0.2)):
        trainer = keras_es.MetaTrainer(_Quadratic(curvature),
                                       keras_es.pes(SIGMA, 2, learn_sigma=learn), [0.5], 8)
        history = trainer.train(6)
        np.testing.assert_allclose(history["sigma"][-1], bound, rtol=1e-5)


def test_a_burn_in_leaves_sigma_alone():
    estimator = keras_es.es_single(SIGMA, 2, horizon=8, learn_sigma=True)
    system = _Quadratic(1.0)
    state = estimator.init(4, 2)
    sys_state = estimator.init_system(system, 4, 0)
    _, state = estimator.burn_in(system, sys_state, state, tf.zeros([2]), 0)
    np.testing.assert_allclose(np.exp(state.sampler.log_sigma), SIGMA, rtol=1e-6)
    assert int(state.sampler.updates) == 0


# ---------------------------------------------------------------------- the options
def test_resolve_and_the_factories_take_the_options():
    est = resolve("pes", learn_sigma=True, fitness_shaping="rank", horizon=20)
    assert est == keras_es.pes(0.1, 10, horizon=20, learn_sigma=LearnedSigma(),
                               fitness_shaping="rank")
    assert resolve("full_es", horizon=5, learn_sigma=False).learn_sigma is None
    assert keras_es.full_es(0.1, 5, fitness_shaping="rank").fitness_shaping == "rank"
    # The defaults are unchanged: no option, no extra state.
    default = keras_es.es_single(0.1, 5, horizon=20)
    assert default.fitness_shaping is None and default.learn_sigma is None
    assert len(tf.nest.flatten(default.init(3, 2))) == 9
    with pytest.raises(TypeError, match="unexpected keyword argument 'learn_sigm'"):
        keras_es.es_single(0.1, 5, horizon=20, learn_sigm=True)


@pytest.mark.parametrize("make, message", [
    (lambda: keras_es.es_single(0.1, 5, horizon=20, fitness_shaping="ranks"),
     "fitness_shaping='ranks' is invalid"),
    (lambda: keras_es.pes(0.1, 5, horizon=20, objective="final", fitness_shaping="rank"),
     "fitness_shaping='rank' with objective='final' is not supported"),
    (lambda: keras_es.pes(0.1, 5, fitness_shaping="rank", normalize=True),
     "ranks are already scale-free"),
    (lambda: keras_es.pes(0.1, 5, learn_sigma="yes"), "learn_sigma='yes' is invalid"),
    (lambda: keras_es.pes(0.1, 5, learn_sigma=True, guided=keras_es.GuidedConfig()),
     "learn_sigma with guided"),
    (lambda: keras_es.pes(0.1, 5, horizon=20, objective="final", learn_sigma=True),
     "learn_sigma with objective='final' is not supported"),
    (lambda: keras_es.es_single(0.1, 5, learn_sigma=True),
     "noise drawn once per episode is never redrawn without a horizon"),
    (lambda: LearnedSigma(learning_rate=-1.0), "learning_rate=-1.0 is invalid"),
    (lambda: LearnedSigma(min_sigma=0.5, max_sigma=0.1), "min_sigma=0.5 exceeds"),
    (lambda: LearnedSigma(per_dimension=1), "per_dimension=1 is invalid"),
])
def test_options_refuse_what_they_cannot_serve(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------- checkpoints
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "v0_2")


def _trainer(learn=True):
    from keras_es.systems import influence_balancing

    estimator = keras_es.pes(0.1, 5, horizon=20, fitness_shaping="rank",
                             learn_sigma=True if learn else None)
    return keras_es.MetaTrainer(influence_balancing(), estimator, [0.5], 4, seed=3)


@pytest.mark.slow
def test_a_learned_sigma_checkpoint_resumes_exactly(tmp_path):
    trainer = _trainer()
    trainer.train(3)
    path = trainer.save(str(tmp_path / "ckpt"))
    expected = trainer.step()
    resumed = _trainer()
    resumed.restore(path)
    logs = resumed.step()
    assert logs["sigma"] != 0.1
    for key in ("sigma", "theta_0", "loss", "gradient_norm"):
        np.testing.assert_allclose(logs[key], expected[key], rtol=1e-6)


def test_checkpoints_of_the_other_kind_are_refused_clearly(tmp_path):
    # A 0.2 checkpoint (one flat state) has as many tensors as this one.
    with pytest.raises(ValueError, match="same system, estimator and num_particles"):
        _trainer().restore(os.path.join(DATA, "pes_final"))
    path = _trainer().save(str(tmp_path / "learned"))
    with pytest.raises(ValueError, match="estimator"):
        _trainer(learn=False).restore(path)


# ---------------------------------------------------------------------- replicas
class _TwoReplicas:
    """An all-reduce of two replicas played by two threads: each call blocks until
    both have contributed, then returns the sum to both."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.values = [None, None]

    def shard(self, replica: int, pairs_per_replica: int) -> distribute.Shard:
        def all_reduce(x):
            self.values[replica] = x
            self.barrier.wait()
            total = self.values[0] + self.values[1]
            self.barrier.wait()  # both have read before the next call writes
            return total
        return distribute.Shard(replica * pairs_per_replica, 2 * pairs_per_replica,
                                all_reduce)


def _half(partials, replica: int, pairs: int):
    """Replica ``replica``'s share of one-device partials: its pairs' rows, and the
    window's scalar sums on replica 0 only."""
    rows = slice(replica * pairs, (replica + 1) * pairs)

    def part(value):
        value = tf.convert_to_tensor(value)
        if value.shape.rank:
            return value[rows]
        return value if replica == 0 else tf.zeros_like(value)
    return tf.nest.map_structure(part, partials)


def test_two_replicas_rank_and_learn_sigma_as_one_device():
    """Ranks need every pair: each replica ranks all of them after the gather of
    differences. The learned sigma's sums cross in the window's one all-reduce and
    every replica takes the same Adam step."""
    estimator = keras_es.pes(SIGMA, 1, horizon=4, fitness_shaping="rank", learn_sigma=True)
    pairs, dim = 8, 3

    def losses(thetas):
        return tf.reduce_sum(tf.square(thetas - [1.0, -0.5, 2.0]), -1) ** 1.5

    state = estimator.init(2 * pairs, dim)
    state, thetas = estimator.ask(state, tf.zeros([dim]), 0)
    state, sums, _ = estimator.tell(state, estimator.start_window(state), losses(thetas))
    state, partials, _ = estimator.finish(state, sums)
    one_state, one = estimator.combine(state, partials)

    reduce, results = _TwoReplicas(), [None, None]

    def replica(r):
        results[r] = estimator.combine(state, _half(partials, r, pairs),
                                       reduce.shard(r, pairs))
    threads = [threading.Thread(target=replica, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for two_state, two in results:
        for field in ("gradient", "sigma", "sigma_gradient", "loss", "valid_pairs"):
            # Sums over pairs are taken in another order: float32 rounding only.
            np.testing.assert_allclose(getattr(two, field), getattr(one, field),
                                       rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(two_state.sampler.log_sigma, one_state.sampler.log_sigma,
                                   rtol=1e-6)
    np.testing.assert_allclose(
        np.concatenate([results[0][1].pair_gradients, results[1][1].pair_gradients]),
        one.pair_gradients, rtol=1e-4, atol=1e-5)
