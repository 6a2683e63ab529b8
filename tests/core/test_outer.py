"""MetaTrainer: the outer loop on influence balancing, checkpoints, search spaces."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es.systems import influence_balancing, steady_state_optimum


@pytest.fixture(scope="module")
def system():
    return influence_balancing()


def test_influence_balancing_optimum():
    np.testing.assert_allclose(steady_state_optimum(influence_balancing()), -1.0 / 6.0)


@pytest.mark.parametrize("name, direction", [("pes", -1), ("es_single", -1),
                                             ("truncated_es", +1)])
def test_influence_balancing_direction(system, name, direction):
    """From theta = 0.5 the true optimum (-1/6) is below; truncated ES goes up."""
    estimator = keras_es.ESTIMATORS[name](sigma=0.1, truncation_length=1)
    trainer = keras_es.MetaTrainer(system, estimator, [0.5], 200,
                                   outer_optimizer=keras.optimizers.SGD(1e-4), seed=1)
    trainer.train(150)
    moved = trainer.theta_value[0] - 0.5
    assert np.sign(moved) == direction and abs(moved) > 0.01, moved


@pytest.mark.slow
def test_checkpoint_resume_reproduces_trajectory(system, tmp_path):
    def build():
        return keras_es.MetaTrainer(
            system, keras_es.es_single(0.1, 2, horizon=7), [0.5], 16,
            outer_optimizer=keras.optimizers.Adam(1e-2), seed=3)

    straight = build()
    straight.train(4)
    path = straight.save(str(tmp_path / "ckpt"))
    expected = straight.train(4)["theta_0"]

    resumed = build()
    resumed.restore(path)
    assert int(resumed.outer_step.numpy()) == 4
    got = resumed.train(4)["theta_0"]
    np.testing.assert_array_equal(got, expected)
    assert resumed.optimizer.iterations.numpy() == straight.optimizer.iterations.numpy()


def test_search_space_values_and_logs(system):
    space = keras_es.SearchSpace([keras_es.Hyperparameter("theta", 0.5, "identity")])
    trainer = keras_es.MetaTrainer(system, keras_es.pes(0.1, 1), space, 8)
    history = trainer.train(2, verbose=1)
    assert set(history) >= {"loss", "meta_loss", "gradient_norm", "valid_pairs",
                            "diverged_pairs", "outer_step", "theta"}
    assert history["outer_step"] == [1, 2]
    assert trainer.values == {"theta": pytest.approx(history["theta"][-1])}


def test_guided_trainer_pushes_surrogates(system):
    calls = []

    def surrogate(theta, step):
        calls.append(1)  # traced once
        return tf.ones_like(theta) * tf.cast(step + 1, tf.float32)

    estimator = keras_es.es_single(0.1, 1, guided=keras_es.GuidedConfig(k=1, alpha=0.5))
    trainer = keras_es.MetaTrainer(system, estimator, [0.5], 8, surrogate=surrogate)
    trainer.train(3)
    state = trainer.state
    assert int(state.guided.count) == 1
    np.testing.assert_allclose(state.guided.surrogates.numpy(), [[3.0]])
    assert len(calls) == 1


def test_step_is_traced_once(system):
    trainer = keras_es.MetaTrainer(system, keras_es.pes(0.1, 2, horizon=5), [0.5], 8)
    trainer.train(5)
    assert trainer._step_fn.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_xla_matches_graph_mode():
    """The whole outer step compiles under XLA and follows the same trajectory."""
    from keras_es import testing

    def run(jit):
        estimator = keras_es.pes(0.1, 3, horizon=7, objective="final",
                                 guided=keras_es.GuidedConfig(k=1))
        trainer = keras_es.MetaTrainer(
            testing.oracle_system(), estimator, testing.ORACLE_THETA, 16,
            outer_optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit,
            surrogate=lambda theta, step: tf.ones_like(theta))
        trainer.train(10)
        return trainer.theta_value

    np.testing.assert_allclose(run(True), run(False), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_keys_keep_static_shape_across_population_sizes():
    """Systems may size their state from keys.shape[0], whatever trainers came before."""

    class Toy(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.zeros([keys.shape[0]], tf.float32)

        def step(self, state, theta, keys):
            return state, tf.reduce_sum(theta ** 2, -1) + state, None

    for n in (4, 8, 16):
        trainer = keras_es.MetaTrainer(Toy(), keras_es.full_es(0.1, horizon=1),
                                       np.zeros(2, np.float32), num_particles=n)
        assert trainer.step()["valid_pairs"] == n // 2


def test_long_theta_is_logged_by_norm(system):
    class Quadratic(keras_es.UnrolledSystem):
        def init(self, keys):
            return tf.zeros([keys.shape[0]])

        def step(self, state, theta, keys):
            return state, tf.reduce_sum(theta ** 2, -1), None

    logs = keras_es.MetaTrainer(Quadratic(), keras_es.full_es(0.1, horizon=1),
                                np.ones(100, np.float32), 4).step()
    assert "theta_0" not in logs and logs["theta_norm"] > 0


@pytest.mark.slow
def test_every_front_end_spelling_of_the_estimator_builds_the_same_trainer():
    """MetaTrainer takes the estimator as every front end does: an Estimator, or a name
    with resolve()'s settings; optimizer= is the old name of outer_optimizer=."""
    system = influence_balancing()
    by_object = keras_es.MetaTrainer(system, keras_es.pes(0.1, 4, horizon=16), [0.5], 4)
    by_name = keras_es.MetaTrainer(system, "pes", [0.5], 4, sigma=0.1, truncation_length=4,
                                   horizon=16)
    assert by_name.estimator == by_object.estimator
    np.testing.assert_array_equal(by_name.step()["theta_0"], by_object.step()["theta_0"])
    with pytest.warns(DeprecationWarning, match="outer_optimizer"):
        old = keras_es.MetaTrainer(system, "pes", [0.5], 4,
                                   optimizer=keras.optimizers.SGD(0.1))
    assert isinstance(old.optimizer, keras.optimizers.SGD)
    with pytest.raises(ValueError, match="carries its own settings"):
        keras_es.MetaTrainer(system, keras_es.pes(0.1, 4), [0.5], 4, sigma=0.2)
