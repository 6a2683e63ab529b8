"""Non-finite losses, common random numbers and bad input."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es.systems import LinearQuadraticSystem, influence_balancing
from keras_es.testing import ORACLE_THETA, run_windows

PAIRS = 8
BAD_PARTICLE = 5  # the - twin of pair 2


class PoisonedSystem(keras_es.UnrolledSystem):
    """Wraps a system; particle ``BAD_PARTICLE`` gets a NaN state and an Inf loss at its
    episode step ``poison_step`` (or never, with ``poison_step=None``)."""

    def __init__(self, inner, poison_step):
        self.inner, self.poison_step = inner, poison_step

    def init(self, keys):
        return {"s": self.inner.init(keys), "t": tf.zeros([tf.shape(keys)[0]], tf.int32)}

    def step(self, state, theta, keys):
        s, loss, _ = self.inner.step(state["s"], theta, keys)
        t = state["t"] + 1
        if self.poison_step is not None:
            hit = (tf.range(tf.shape(t)[0]) == BAD_PARTICLE) & (t == self.poison_step)
            loss = tf.where(hit, np.inf, loss)
            s = tf.where(hit[:, None], np.nan, s)
        return {"s": s, "t": t}, loss, None

    def meta_loss(self, state, keys):
        return self.inner.meta_loss(state["s"], keys)


@pytest.mark.parametrize("objective", ["sum", "final"])
def test_one_diverging_particle_is_excluded_and_reset(objective, oracle_system):
    estimator = keras_es.es_single(0.1, 5, horizon=12, objective=objective, stagger=False)
    clean, _ = run_windows(estimator, PoisonedSystem(oracle_system, None), ORACLE_THETA,
                           PAIRS, 1)
    poisoned = PoisonedSystem(oracle_system, 3)
    trainer = keras_es.MetaTrainer(poisoned, estimator, ORACLE_THETA, 2 * PAIRS,
                                   outer_optimizer=keras.optimizers.SGD(0.01))
    logs = trainer.step()
    assert logs["diverged_pairs"] == 1 and logs["valid_pairs"] == PAIRS - 1
    assert np.all(np.isfinite(trainer.theta_value))
    state = trainer.state
    # Pair 2 restarted at step 3 of the window (new episode, new noise), the others not.
    assert state.episode.numpy().tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert state.episode_step.numpy().tolist() == [5, 5, 2, 5, 5, 5, 5, 5]
    assert state.draws.numpy()[2] == 2
    assert int(state.diverged) == 1
    system_state = trainer.system_state
    assert np.all(np.isfinite(system_state["s"].numpy()))
    # The estimate is the mean over the other pairs, exactly.
    others = np.delete(clean, 2, axis=0).mean(0)
    np.testing.assert_allclose(ORACLE_THETA - 0.01 * others, trainer.theta_value, rtol=1e-5)


def test_all_particles_diverging_leaves_theta_unchanged():
    class AlwaysInf(LinearQuadraticSystem):
        def step(self, state, theta, keys):
            state, loss, done = super().step(state, theta, keys)
            return state, loss + np.inf, done

    base = influence_balancing()
    system = AlwaysInf(base.A, base.B, H=base.H, y=base.y, s0=base.s0)
    trainer = keras_es.MetaTrainer(system, keras_es.pes(0.1, 2), [0.5], 4,
                                   outer_optimizer=keras.optimizers.Adam(0.1))
    for _ in range(3):
        logs = trainer.step()
    assert logs["valid_pairs"] == 0 and logs["gradient_norm"] == 0.0
    np.testing.assert_array_equal(trainer.theta_value, [0.5])


def test_a_window_where_every_pair_diverges_does_not_move_theta_even_with_momentum():
    class Breakable(LinearQuadraticSystem):
        broken = tf.Variable(False)

        def step(self, state, theta, keys):
            state, loss, done = super().step(state, theta, keys)
            return state, tf.where(self.broken, np.inf, loss), done

    base = influence_balancing()
    system = Breakable(base.A, base.B, H=base.H, y=base.y, s0=base.s0)
    trainer = keras_es.MetaTrainer(system, keras_es.pes(0.1, 2), [0.5], 4,
                                   outer_optimizer=keras.optimizers.Adam(0.1))
    for _ in range(3):  # Adam builds momentum
        trainer.step()
    before, iterations = trainer.theta_value, int(trainer.optimizer.iterations.numpy())
    Breakable.broken.assign(True)
    for _ in range(3):
        assert trainer.step()["valid_pairs"] == 0
    np.testing.assert_array_equal(trainer.theta_value, before)
    assert int(trainer.optimizer.iterations.numpy()) == iterations


def test_overflowing_update_is_rejected():
    trainer = keras_es.MetaTrainer(influence_balancing(), keras_es.pes(0.1, 1), [0.5], 64,
                                   outer_optimizer=keras.optimizers.SGD(1e38))
    for _ in range(3):
        trainer.step()
    assert np.all(np.isfinite(trainer.theta_value))


def test_twins_share_keys_common_random_numbers():
    """A loss that depends only on the step and episode keys gives dL = 0 exactly."""

    class KeyNoise(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.random.stateless_uniform([2], seed=keys[0]) + tf.cast(keys, tf.float32)

        def step(self, state, theta, keys):
            draw = tf.map_fn(lambda k: tf.random.stateless_uniform([], seed=k),
                             keys, fn_output_signature=tf.float32)
            return state, draw + state[:, 0] * 1e-9, None

    totals, results = run_windows(keras_es.pes(0.1, 3, horizon=5), KeyNoise(), [0.0, 0.0],
                                  16, 4)
    assert np.all(totals == 0.0)
    assert float(results[-1].loss) > 0.0


@pytest.mark.parametrize("objective", ["sum", "final"])
def test_clip_and_normalize_keep_direction(objective, oracle_system):
    plain = keras_es.es_single(0.1, 5, horizon=12, objective=objective)
    clipped = keras_es.es_single(0.1, 5, horizon=12, objective=objective,
                                 clip_loss_difference=1e-3, normalize=True)
    _, a = run_windows(plain, oracle_system, ORACLE_THETA, 2000, 2)
    _, b = run_windows(clipped, oracle_system, ORACLE_THETA, 2000, 2)
    ga, gb = a[-1].gradient.numpy(), b[-1].gradient.numpy()
    assert np.all(np.isfinite(gb))
    cosine = ga @ gb / np.linalg.norm(ga) / np.linalg.norm(gb)
    assert cosine > 0.9
    # Clipping at 1e-3 bounds every credited difference, so each pair's window estimate
    # is at most K * 1e-3 * |xi| / (2 sigma^2) ("sum": K per-step differences) or
    # 2e-3 * |xi| / (2 sigma^2) ("final": two telescoped terms), with |xi| < 6 sigma
    # for 2,000 pairs in two dimensions.
    bound = (5 if objective == "sum" else 2) * 1e-3 * 6 * 0.1 / (2 * 0.1 ** 2)
    assert np.abs(b[-1].pair_gradients.numpy()).max() <= bound
    assert np.abs(a[-1].pair_gradients.numpy()).max() > 10 * bound


@pytest.mark.parametrize("factory, kwargs, match", [
    (keras_es.pes, {"sigma": 0.0, "truncation_length": 5}, "sigma=0.0"),
    (keras_es.pes, {"sigma": 0.1, "truncation_length": 0}, "truncation_length=0"),
    (keras_es.pes, {"sigma": 0.1, "truncation_length": 5, "horizon": -1}, "horizon=-1"),
    (keras_es.pes, {"sigma": 0.1, "truncation_length": 5, "objective": "mean"},
     "objective='mean'"),
    (keras_es.pes, {"sigma": 0.1, "truncation_length": 5, "resample_interval": 0},
     "resample=0"),
    (keras_es.es_single, {"sigma": float("nan"), "truncation_length": 5}, "sigma=nan"),
    (keras_es.full_es, {"sigma": 0.1, "horizon": 5, "stagger": True}, "stagger=True"),
    (keras_es.es_single, {"sigma": 0.1, "truncation_length": 5, "horizon": 10,
                          "telescope": False}, "telescope=False with objective='sum'"),
    (keras_es.es_single, {"sigma": 0.1, "truncation_length": 5, "objective": "final",
                          "telescope": False}, "horizon=None"),
])
def test_bad_estimator_settings_raise(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_bad_guided_settings_raise():
    with pytest.raises(ValueError, match="alpha=0.0"):
        keras_es.GuidedConfig(alpha=0.0)
    with pytest.raises(ValueError, match="weighting='paper'"):
        keras_es.GuidedConfig(weighting="paper")
    with pytest.raises(ValueError, match="k=3 exceeds"):
        keras_es.es_single(0.1, 2, guided=keras_es.GuidedConfig(k=3)).init(4, 2)


def test_bad_trainer_settings_raise():
    system = influence_balancing()
    estimator = keras_es.pes(0.1, 1)
    with pytest.raises(ValueError, match="num_particles=7"):
        keras_es.MetaTrainer(system, estimator, [0.5], 7)
    with pytest.raises(ValueError, match="theta="):
        keras_es.MetaTrainer(system, estimator, [np.nan], 8)
    with pytest.raises(ValueError, match="surrogate was given"):
        keras_es.MetaTrainer(system, estimator, [0.5], 8, surrogate=lambda t, s: t)

    class NoMeta(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.zeros([tf.shape(keys)[0]])

        def step(self, state, theta, keys):
            return state, state, None

    with pytest.raises(ValueError, match="meta_loss"):
        keras_es.MetaTrainer(NoMeta(), keras_es.pes(0.1, 1, objective="final"), [0.5], 8)


def test_one_huge_finite_estimate_is_undone_and_does_not_freeze_theta():
    """A finite but huge estimate would overflow Adam's second moment (and then every
    later update is rejected: theta frozen): it is scaled down to a size whose square
    fits float32, direction kept. An update that still leaves theta or a slot
    non-finite is undone, theta *and* the optimizer's slots restored, and the next
    estimate moves theta."""
    update = keras_es.outer.outer_update
    optimizer = keras.optimizers.Adam(0.1)
    theta = keras.Variable(np.zeros(2, np.float32))
    optimizer.build([theta])
    assert bool(update(optimizer, theta, tf.constant([1.0, -1.0]), 4))
    moved = theta.numpy().copy()
    assert bool(update(optimizer, theta, tf.constant([3e30, 1.0]), 4))  # scaled, applied
    assert all(np.isfinite(v.numpy()).all() for v in optimizer.variables)
    assert theta.numpy()[0] < moved[0]  # toward -gradient
    # Momentum SGD at a rate that overflows theta: undone, slots and all.
    sgd = keras.optimizers.SGD(1e30, momentum=0.9)
    theta = keras.Variable(np.zeros(2, np.float32))
    sgd.build([theta])
    assert bool(update(sgd, theta, tf.constant([1.0, 1.0]), 4))
    moved = theta.numpy().copy()
    slots = [v.numpy().copy() for v in sgd.variables]
    assert not bool(update(sgd, theta, tf.constant([1e15, -1e15]), 4))  # 1e45: inf
    np.testing.assert_array_equal(theta.numpy(), moved)
    for variable, saved in zip(sgd.variables, slots, strict=True):
        np.testing.assert_array_equal(variable.numpy(), saved)
    assert bool(update(sgd, theta, tf.constant([1.0, 1.0]), 4))
    assert np.all(theta.numpy() != moved) and np.all(np.isfinite(theta.numpy()))
    # No valid pair, or a non-finite estimate: skipped, nothing touched.
    before = theta.numpy().copy()
    assert not bool(update(sgd, theta, tf.constant([1.0, 1.0]), 0))
    assert not bool(update(sgd, theta, tf.constant([np.nan, 1.0]), 4))
    np.testing.assert_array_equal(theta.numpy(), before)


def test_the_oracle_skips_a_round_where_every_pair_diverged(tmp_path):
    """ESOracle applies the same rule as MetaTrainer: without a valid pair, no update
    (Adam would otherwise coast on its momentum), and theta stays finite."""
    import keras_tuner as kt

    space = kt.HyperParameters()
    space.Float("lr", 1e-4, 1.0, sampling="log", default=0.01)
    oracle = keras_es.ESOracle(objective="val_loss", max_trials=100, num_particles=4,
                               sigma=0.3, truncation_length=1, horizon=4, seed=0,
                               stagger=False, hyperparameters=space,
                               outer_optimizer=keras.optimizers.Adam(0.5))
    oracle._set_project_dir(str(tmp_path), "p")

    def run_round(loss):
        for _ in range(4):
            trial = oracle.create_trial("t")
            oracle.update_trial(trial.trial_id, {"val_loss": loss(trial)})
            trial.status = "COMPLETED"
            oracle.end_trial(trial)

    for _ in range(2):  # Adam builds momentum
        run_round(lambda t: (np.log10(t.hyperparameters.values["lr"]) + 1.0) ** 2)
    theta, state = oracle.theta.copy(), json.dumps(oracle._es["optimizer"])
    run_round(lambda t: float("nan"))
    assert oracle.history[-1]["valid_pairs"] == 0
    np.testing.assert_array_equal(oracle.theta, theta)
    assert json.dumps(oracle._es["optimizer"]) == state
    assert not oracle.history[-1]["updated"]


def test_overflowing_finite_losses_invalidate_only_their_pair_and_say_so():
    """Per-step losses that are finite but whose difference overflows float32 leave
    that pair out of the estimate (and the valid count), instead of zeroing the whole
    window's estimate while reporting every pair valid."""
    class Overflowing(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.zeros([tf.shape(keys)[0]])

        def step(self, state, theta, keys):
            loss = tf.square(theta[:, 0] - 1.0)
            # Pair 1's twins report +3e38 and -3e38: finite, difference inf.
            index = tf.range(tf.shape(theta)[0])
            huge = tf.where(index % 2 == 0, 3e38, -3e38)
            loss = tf.where((index // 2) == 1, huge, loss)
            return state, loss, None

    trainer = keras_es.MetaTrainer(Overflowing(), keras_es.es_single(0.1, 2), [0.0], 8,
                                   outer_optimizer=keras.optimizers.SGD(0.1))
    logs = trainer.step()
    assert logs["valid_pairs"] == 3 and logs["diverged_pairs"] == 0
    assert logs["gradient_norm"] > 0 and logs["updated"]
    assert trainer.theta_value[0] > 0  # toward the optimum at 1, from the other pairs


def test_a_window_without_a_finite_loss_logs_nan_not_zero():
    class AlwaysInf(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.zeros([tf.shape(keys)[0]])

        def step(self, state, theta, keys):
            return state, tf.fill([tf.shape(theta)[0]], np.inf), None

        def meta_loss(self, state, keys):
            return tf.fill([tf.shape(keys)[0]], np.inf)

    for objective in ("sum", "final"):
        trainer = keras_es.MetaTrainer(AlwaysInf(), keras_es.es_single(
            0.1, 2, horizon=4, objective=objective), [0.0], 4)
        logs = trainer.step()
        assert logs["valid_pairs"] == 0
        assert np.isnan(logs["loss"]) and np.isnan(logs["meta_loss"])
        assert not logs["updated"]


@pytest.mark.parametrize("factory, kwargs, match", [
    (keras_es.es_single, {"stagger": "no"}, "stagger='no'"),
    (keras_es.pes, {"normalize": "no"}, "normalize='no'"),
    (keras_es.es_single, {"sigma": 1e-30}, "sigma=1e-30"),
])
def test_estimator_flags_must_be_booleans(factory, kwargs, match):
    settings = {"sigma": 0.1, "truncation_length": 2, "horizon": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        factory(**settings)


def test_trainer_seed_and_optimizer_are_checked():
    system = influence_balancing()
    with pytest.raises(ValueError, match="seed=4294967297"):
        keras_es.MetaTrainer(system, keras_es.pes(0.1, 1), [0.5], 4, seed=2**32 + 1)
    with pytest.raises(ValueError, match="optimizer='adam'"):
        keras_es.MetaTrainer(system, keras_es.pes(0.1, 1), [0.5], 4, optimizer="adam")
    with pytest.raises(ValueError, match="jit_compile='no'"):
        keras_es.MetaTrainer(system, keras_es.pes(0.1, 1), [0.5], 4, jit_compile="no")


class _Outlier(keras_es.UnrolledSystem):
    """The README's noisy quadratic (SGD on 0.5 * sum(h * w**2), theta = log rate),
    plus scripted outliers: ``script(step, loss [N]) -> loss`` may replace any
    particle's loss at any outer step."""

    def __init__(self, script, dim=10):
        self.h = np.geomspace(1.0, 0.01, dim).astype("float32")
        self.script, self.calls = script, tf.Variable(0)

    def init(self, keys):
        return keras_es.noise.normal_rows(keys, len(self.h))

    def step(self, w, theta, keys):
        rate = tf.exp(theta[:, :1])
        noise = keras_es.noise.normal_rows(keys, len(self.h))
        w = w - rate * (self.h * w + np.sqrt(self.h) * noise)
        loss = 0.5 * tf.reduce_sum(self.h * w**2, axis=-1)
        self.calls.assign_add(1)
        return w, self.script(self.calls, loss), None


@pytest.mark.parametrize("optimizer", ["default", "adam", "sgd"])
def test_one_huge_finite_loss_neither_freezes_nor_throws_theta(optimizer):
    """One particle reports 1e30 once (finite): with Adam (the default) it used to fill
    the second moment with inf, so every later update was rejected and theta froze;
    with SGD(0.01) it threw theta to ~1e20. Clipped at 100 medians, it is one bounded
    step among many, counted in clipped_pairs."""
    def script(calls, loss):
        hit = tf.logical_and(tf.equal(calls, 31), tf.range(tf.shape(loss)[0]) == 3)
        return tf.where(hit, 1e30, loss)

    kwargs = {"default": {}, "adam": {"optimizer": keras.optimizers.Adam(0.01)},
              "sgd": {"optimizer": keras.optimizers.SGD(0.01)}}[optimizer]
    trainer = keras_es.MetaTrainer(_Outlier(script), keras_es.es_single(0.1, 10, horizon=100,
                                                                        stagger=False),
                                   [np.log(0.01)], 64, seed=0, **kwargs)
    history = trainer.train(40)
    theta = np.array(history["theta_0"])
    assert np.isfinite(theta).all() and np.all(np.abs(np.diff(theta)) < 0.5)
    assert len(set(theta[5:].tolist())) == 35  # every window moved theta, after too
    # Still learning: the rate rose from 0.01 toward the noisy quadratic's optimum.
    assert theta[-1] > theta[5] > np.log(0.01)
    assert sum(history["clipped_pairs"]) >= 1 and all(history["updated"])


OUTLIERS = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38, 1e15], np.float32)


def test_fuzz_the_trainer_with_non_finite_and_huge_losses():
    """Random particles report random outliers (inf, NaN, +-1e30, 3e38, 1e15) at random
    steps: theta stays finite, and every window with a valid pair moves it."""
    rng = np.random.default_rng(7)
    steps = 10 * 60
    table = np.ones([steps + 1, 16], np.float32)  # 1: keep the loss; else: replace it
    hits = rng.random(table.shape) < 0.01
    table[hits] = rng.choice(OUTLIERS, hits.sum())
    table = tf.constant(table)

    def script(calls, loss):
        row = table[tf.minimum(calls, steps)]
        return tf.where(row == 1.0, loss, row)

    trainer = keras_es.MetaTrainer(_Outlier(script), keras_es.es_single(0.1, 10, horizon=100,
                                                                        stagger=False),
                                   [np.log(0.01)], 16, seed=1)
    history = trainer.train(60)
    theta = np.array(history["theta_0"])
    assert np.isfinite(theta).all() and np.all(np.abs(np.diff(theta)) < 0.5)
    assert sum(history["diverged_pairs"]) > 10 and sum(history["clipped_pairs"]) > 3
    for valid, updated in zip(history["valid_pairs"], history["updated"], strict=True):
        assert updated == (valid > 0)
    assert theta[-1] > np.log(0.01)  # still learning through it all


def _fuzzed_oracle_search(directory, outlier_rate):
    import keras_tuner as kt

    space = kt.HyperParameters()
    space.Float("lr", 1e-4, 1.0, sampling="log", default=1e-3)
    oracle = keras_es.ESOracle(objective="val_loss", max_trials=None, num_particles=8,
                               sigma=0.3, truncation_length=1, horizon=4, seed=0,
                               stagger=False, hyperparameters=space, outer_learning_rate=0.1)
    oracle._set_project_dir(str(directory), "p")
    rng = np.random.default_rng(3)
    for _ in range(40):
        for _ in range(8):
            trial = oracle.create_trial("t")
            loss = (np.log10(trial.hyperparameters.values["lr"]) + 1.0) ** 2
            if rng.random() < outlier_rate:
                loss = float(rng.choice(OUTLIERS))
            oracle.update_trial(trial.trial_id, {"val_loss": loss})
            trial.status = "COMPLETED"
            oracle.end_trial(trial)
    return oracle


@pytest.mark.slow
def test_fuzz_the_oracle_with_non_finite_and_huge_losses(tmp_path):
    # About one round in four has an outlier.
    oracle = _fuzzed_oracle_search(tmp_path / "fuzzed", 0.04)
    history = oracle.history
    assert len(history) == 40
    assert all(np.isfinite(list(h["values"].values())).all() for h in history)
    for h in history:
        assert h["updated"] == (h["valid_pairs"] > 0)
    json.dumps(oracle.get_state(), allow_nan=False)  # no NaN in oracle.json
    # Still learning through it all: from lr = 1e-3 towards the optimum 0.1 it covers at
    # least half the way (in log10 units) the same search without outliers covers
    # (measured with these seeds: -1.55 against -0.83, from -3). A clipped outlier still
    # counts 100 medians, which inflates Adam's second moment for a while.
    clean = _fuzzed_oracle_search(tmp_path / "clean", 0.0)
    start, reached = -3.0, np.log10(clean.mean_values()["lr"])
    assert reached > -1.0  # the clean search reaches the optimum
    assert np.log10(oracle.mean_values()["lr"]) - start > 0.5 * (reached - start)


def test_a_state_that_breaks_in_a_windows_last_step_is_restarted_before_any_save(tmp_path):
    """A particle whose weights become NaN in the last step of a window (its loss was
    computed before the update, so it was finite) is restarted in that window: the
    checkpoint saved after it holds no non-finite value."""
    class BreaksLate(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.zeros([tf.shape(keys)[0], 3])

        def step(self, state, theta, keys):
            loss = tf.reduce_sum(tf.square(state - theta[:, :1]), axis=1) + 1.0
            broken = (tf.range(tf.shape(state)[0]) == 5)[:, None]
            # Particle 5 (pair 2, theta ~ 0.9) turns NaN at its fourth step, the last of
            # window 2.
            new = state + 0.1 * theta[:, :1]
            new = tf.where(broken & (state[:, :1] > 0.25), np.nan, new)
            return new, loss, None

    trainer = keras_es.MetaTrainer(BreaksLate(), keras_es.es_single(0.1, 2, horizon=40,
                                                                    stagger=False),
                                   [1.0], 8, seed=0)
    diverged = [trainer.step()["diverged_pairs"] for _ in range(2)]  # save right after
    assert sum(diverged) >= 1
    path = trainer.save(str(tmp_path / "ckpt"))
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.isfinite(value).all(), name
    assert np.isfinite(trainer.system_state.numpy()).all()
