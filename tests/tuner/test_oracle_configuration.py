"""ESOracle shares the front ends' configuration and search-space encoding: the same
estimator object or name and settings as `keras_es.estimators.resolve`, and the same
theta for the same hyperparameter value as ESCallback."""

from __future__ import annotations

import json

import keras
import keras_tuner as kt
import numpy as np
import pytest

import keras_es
from keras_es.callback import keras_optimizers
from keras_es.transforms import Logit, LogRange
from keras_es.tuner import kt_space
from keras_es.tuner.oracle import trial_units


def _space():
    hp = kt.HyperParameters()
    hp.Float("lr", 1e-4, 1e-1, sampling="log", default=3e-3)
    hp.Float("momentum", 0.0, 0.99, default=0.5)
    return hp


def _oracle(tmp_path, **kwargs):
    args = dict(objective="val_loss", max_trials=None, num_particles=4, horizon=20,
                truncation_length=5, seed=3, hyperparameters=_space())
    args.update(kwargs)
    oracle = keras_es.ESOracle(**args)
    oracle._set_project_dir(str(tmp_path), "p")
    return oracle


def _rounds(oracle, count):
    for _ in range(count * oracle.num_particles):
        trial = oracle.create_trial("t")
        values = trial.hyperparameters.values
        loss = (np.log10(values["lr"]) + 2.0) ** 2 + (values["momentum"] - 0.9) ** 2
        oracle.update_trial(trial.trial_id, {"val_loss": loss})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)


# ---------------------------------------------------------------------- encoding
@pytest.mark.parametrize("value", [3e-3, 1.7e-4, 0.05, 1e-2])
def test_a_log_float_and_a_callback_range_encode_a_value_to_the_same_theta(value):
    """hp.Float("lr", 1e-4, 1e-1, sampling="log") in the oracle and
    tune={"learning_rate": (1e-4, 1e-1)} in ESCallback: one transform, one theta."""
    compiled = keras_optimizers.read_compiled(
        keras.optimizers.SGD(value), keras_optimizers.parse_tune({"learning_rate": (1e-4, 1e-1)}))
    callback_theta = compiled.space.encode()
    start = compiled.space.hyperparameters[0].value  # as Keras holds it (float32)
    hp = kt.HyperParameters()
    hp.Float("learning_rate", 1e-4, 1e-1, sampling="log", default=start)
    space = kt_space.KerasTunerSpace(hp.space)
    assert isinstance(space.transforms[0], LogRange)
    np.testing.assert_array_equal(space.encode(), callback_theta)
    # ... and back: the oracle's trial value and the callback's decoded value agree.
    for theta in (callback_theta, callback_theta + 0.37):
        got = space.decode(theta)["learning_rate"]
        want = compiled.space.decode(theta)["learning_rate"]
        assert got == pytest.approx(want, rel=1e-12)


def test_the_oracle_starts_at_the_transforms_encoding(tmp_path):
    oracle = _oracle(tmp_path)
    oracle.create_trial("t")
    expected = [LogRange(1e-4, 1e-1).encode(3e-3), Logit(0.0, 0.99).encode(0.5)]
    np.testing.assert_array_equal(oracle.theta, np.asarray(expected, np.float32))
    assert oracle.mean_values()["lr"] == pytest.approx(3e-3, rel=1e-6)


def test_keras_tuner_relaxation_where_no_transform_fits():
    hp = kt.HyperParameters()
    hp.Int("units", 8, 64, step=8)
    hp.Float("decay", 1e-4, 0.5, sampling="reverse_log")
    hp.Float("lr", 1e-3, 1.0, sampling="log", step=10)
    hp.Choice("activation", ["relu", "tanh", "gelu"])
    assert [kt_space.transform(h) for h in hp.space] == [None] * 4
    space = kt_space.KerasTunerSpace(hp.space)
    assert space.dim == 6  # one logit per Choice value
    values = space.decode(space.encode({"units": 24, "decay": 0.2, "lr": 0.1,
                                        "activation": "gelu"}))
    assert values == {"units": 24, "decay": pytest.approx(0.2, rel=1e-6), "lr": 0.1,
                      "activation": "gelu"}


# ---------------------------------------------------------------------- configuration
def test_an_estimator_object_and_a_name_with_the_same_settings_search_alike(tmp_path):
    by_name = _oracle(tmp_path / "a", estimator="pes", sigma=0.2, truncation_length=5,
                      horizon=20, stagger=False)
    by_object = _oracle(tmp_path / "b", estimator=keras_es.pes(0.2, 5, horizon=20,
                                                               stagger=False),
                        truncation_length=None, horizon=None)
    assert by_name.estimator == by_object.estimator == trial_units(
        keras_es.pes(0.2, 5, horizon=20, stagger=False))
    assert (by_object.estimator.truncation_length, by_object.estimator.horizon) == (1, 4)
    assert by_object.truncation_length == 5 and by_object.horizon == 20
    _rounds(by_name, 3)
    _rounds(by_object, 3)
    np.testing.assert_array_equal(by_name.theta, by_object.theta)
    assert [h["gradient"] for h in by_name.history] == \
        [h["gradient"] for h in by_object.history]


def test_the_defaults_are_the_shared_ones(tmp_path):
    oracle = keras_es.ESOracle(objective="val_loss", horizon=100)
    defaults = keras_es.estimators.DEFAULTS
    assert oracle.sigma == defaults["sigma"]
    assert oracle.truncation_length == defaults["truncation_length"]
    assert oracle.meta_objective == defaults["meta_objective"]
    assert oracle.estimator == trial_units(keras_es.estimators.resolve("es_single",
                                                                       horizon=100))
    default = keras_es.outer.default_outer_optimizer()
    assert type(oracle.outer_optimizer) is type(default)
    assert float(oracle.outer_optimizer.learning_rate) == float(default.learning_rate)


@pytest.mark.parametrize("kwargs, match", [
    ({"guided": keras_es.GuidedConfig(k=1)}, "guided=.*surrogate gradients"),
    ({"estimator": keras_es.es_single(0.1, 5, horizon=20,
                                      guided=keras_es.GuidedConfig(k=1)),
      "truncation_length": None, "horizon": None}, "guided=.*surrogate gradients"),
    ({"estimator": keras_es.pes(0.1, 5, horizon=20), "sigma": 0.3},
     r"carries its own settings.*sigma"),
    ({"estimator": keras_es.pes(0.1, 5, resample_interval=3, horizon=20),
      "truncation_length": None, "horizon": None}, "resample=3"),
    ({"estimator": "full_es", "truncation_length": 5, "horizon": 20},
     "estimator='full_es'.*truncation_length=5"),
])
def test_settings_the_oracle_cannot_run_are_refused_by_name(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _oracle(tmp_path, **kwargs)


def test_full_es_trains_a_whole_training_run_per_trial(tmp_path):
    oracle = _oracle(tmp_path, estimator="full_es", truncation_length=None, horizon=20)
    assert oracle.truncation_length == 20 and not oracle.stagger
    assert (oracle.estimator.truncation_length, oracle.estimator.horizon) == (1, 1)
    assert oracle.trials_before_first_update() == 4
    _rounds(oracle, 2)
    metadata = [oracle.trial_metadata(t) for t in sorted(oracle.trials)]
    assert [m["episode"] for m in metadata] == [0] * 4 + [1] * 4  # every round restarts
    assert all(m["window"] == 0 for m in metadata)
    assert len(oracle.history) == 2
    unset = keras_es.ESOracle(objective="val_loss", estimator="full_es")
    assert unset.truncation_length is None
    unset.set_horizon(30)  # what ESTuner.search does from epochs
    assert unset.truncation_length == 30 and unset.estimator.horizon == 1


def test_a_search_resumed_without_sigma_keeps_the_saved_sigma(tmp_path):
    oracle = _oracle(tmp_path, sigma=0.3)
    _rounds(oracle, 1)
    saved = json.loads(json.dumps(oracle.get_state()))
    resumed = _oracle(tmp_path)  # sigma not given: the default would be 0.1
    resumed.trials = oracle.trials
    resumed.set_state(saved)
    assert resumed.sigma == 0.3 and resumed.estimator.sigma == 0.3
    other = _oracle(tmp_path, sigma=0.2)  # given: must match
    other.trials = oracle.trials
    with pytest.raises(ValueError, match="sigma=0.2 does not match"):
        other.set_state(saved)
