"""One configuration, one outer update: the same estimator built through every front
end (`MetaTrainer`, `ESOracle`, `ESCallback`) makes the same first update on the same
losses."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es.estimators import resolve
from keras_es.outer import default_outer_optimizer
from keras_es.transforms import Logit

SETTINGS = {"sigma": 0.2, "truncation_length": 1, "horizon": 4}
TARGET = 0.7  # the loss is (u - TARGET)^2 of the encoded value u


class _Quadratic(keras_es.UnrolledSystem):
    """Each particle's loss is ``(theta - TARGET)^2``: what the oracle's trials report."""

    def init(self, keys):
        return tf.zeros([keys.shape[0]])

    def step(self, state, theta, keys):
        return state, tf.reduce_sum(tf.square(theta - TARGET), -1), None


def _oracle_first_update(estimator, tmp_path):
    import keras_tuner as kt

    space = kt.HyperParameters()
    space.Float("x", 0.0, 1.0, default=0.3)
    settings = {"stagger": False, **SETTINGS} if isinstance(estimator, str) else {}
    oracle = keras_es.ESOracle(objective="val_loss", max_trials=None, num_particles=4,
                               estimator=estimator, seed=3, hyperparameters=space,
                               **settings)
    oracle._set_project_dir(str(tmp_path), "p")
    encode = Logit(0.0, 1.0).encode
    while not oracle.history:
        trial = oracle.create_trial("t")
        u = float(encode(np.float64(trial.hyperparameters.values["x"])))
        oracle.update_trial(trial.trial_id, {"val_loss": (u - TARGET) ** 2})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    return (np.asarray(oracle.theta, np.float64), np.asarray(oracle.history[0]["gradient"]),
            oracle)


@pytest.mark.parametrize("spelling", ["name", "object"])
def test_meta_trainer_and_oracle_make_the_same_first_update(spelling, tmp_path):
    estimator = ("es_single" if spelling == "name"
                 else keras_es.es_single(stagger=False, **SETTINGS))
    theta0 = float(Logit(0.0, 1.0).encode(np.float64(0.3)))
    trainer = keras_es.MetaTrainer(
        _Quadratic(), estimator, [theta0], 4, seed=3,
        **({"stagger": False, **SETTINGS} if spelling == "name" else {}))
    logs = trainer.step()
    theta, gradient, _ = _oracle_first_update(estimator, tmp_path)
    # The oracle's trials report float64 values decoded from theta and encoded again.
    np.testing.assert_allclose(np.linalg.norm(gradient), logs["gradient_norm"], rtol=1e-5)
    np.testing.assert_allclose(theta, trainer.theta_value, rtol=1e-6, atol=1e-7)
    assert not np.allclose(theta, theta0)  # the update moved theta


def test_the_primer_options_make_the_same_first_update_through_both(tmp_path):
    """Rank shaping and a learned sigma live in the estimator and its state, so the
    oracle (which calls ask/tell/finish/combine itself) applies them as MetaTrainer
    does: same theta, same estimate, same new sigma."""
    estimator = keras_es.es_single(stagger=False, fitness_shaping="rank", learn_sigma=True,
                                   **SETTINGS)
    theta0 = float(Logit(0.0, 1.0).encode(np.float64(0.3)))
    trainer = keras_es.MetaTrainer(_Quadratic(), estimator, [theta0], 4, seed=3)
    logs = trainer.step()
    theta, gradient, oracle = _oracle_first_update(estimator, tmp_path)
    np.testing.assert_allclose(np.linalg.norm(gradient), logs["gradient_norm"], rtol=1e-5)
    np.testing.assert_allclose(theta, trainer.theta_value, rtol=1e-6, atol=1e-7)
    steps = oracle.estimator
    state = steps.restore_state(oracle.search_state.es["estimator"], steps.init(2, 1))
    np.testing.assert_allclose(np.exp(state.sampler.log_sigma), logs["sigma"], rtol=1e-5)
    assert logs["sigma"] != SETTINGS["sigma"]  # the first update moved sigma


@pytest.mark.slow
def test_the_callback_takes_an_estimator_with_the_primer_options():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential([keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.5), loss="binary_crossentropy")
    estimator = keras_es.es_single(0.2, 2, horizon=8, fitness_shaping="rank",
                                   learn_sigma=True)
    callback = keras_es.ESCallback(["learning_rate", "momentum"], train_data=(x, y),
                                   estimator=estimator, num_particles=4, seed=3)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    assert callback.trainer.estimator == estimator
    sigma = np.exp(callback.trainer.state.sampler.log_sigma.numpy())
    assert sigma.shape == (2,) and not np.allclose(sigma, 0.2)
    assert all(h["updated"] for h in callback.window_history)


@pytest.mark.slow
def test_the_callback_builds_the_same_estimator_and_outer_optimizer():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential([keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.5), loss="binary_crossentropy")
    callback = keras_es.ESCallback(["learning_rate", "momentum"], train_data=(x, y),
                                   estimator="es_single", num_particles=4, sigma=0.2,
                                   truncation_length=2, horizon=8, seed=3)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    trainer = callback.trainer
    assert trainer.estimator == resolve("es_single", sigma=0.2, truncation_length=2,
                                        horizon=8)
    # The default outer optimizer at the rate for this fit's 4 windows (8 batches, K = 2).
    rate = keras_es.outer.outer_learning_rate_for(4)
    assert trainer.optimizer.get_config() == {
        **default_outer_optimizer(rate).get_config(), "name": trainer.optimizer.name}
    # Its updates are MetaTrainer's, applied every window.
    assert all(h["updated"] for h in callback.window_history)


def test_resolve_refuses_a_full_es_window_shorter_than_its_horizon():
    with pytest.raises(ValueError, match="truncation_length=5 with estimator='full_es'"):
        resolve("full_es", truncation_length=5, horizon=20)
    assert resolve("full_es", horizon=20).truncation_length == 20


def test_resolve_names_what_the_user_typed():
    with pytest.raises(ValueError, match="the estimator's objective is meta_objective="):
        resolve("es_single", objective="final")
    with pytest.raises(ValueError, match="meta_objective='finale' is invalid"):
        resolve("es_single", meta_objective="finale")
    with pytest.raises(ValueError, match=r"\['sigmaa'\] are not estimator settings"):
        resolve("es_single", sigmaa=0.1)
    with pytest.raises(ValueError, match=r"keras_es.pes\(truncation_length=...\)"):
        resolve(keras_es.pes(0.1, 5), truncation_length=3)
    with pytest.raises(ValueError, match="meta_objective="):
        keras_es.MetaTrainer(_Quadratic(), "es_single", [0.5], 4, meta_objective="sum",
                             objective="final")
