"""ESCallback's Keras-native surface: tuning the compiled optimizer by Keras names,
ranges, compiled schedules, and the tuned schedule and optimizer handed back."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es.callback import keras_optimizers

SCHEDULES = keras.optimizers.schedules


def _data(n, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(10, 3))
    x = rng.normal(size=(n, 10)).astype("float32")
    return x, np.argmax(x @ w, axis=1)


X, Y = _data(512, 0)
TRAIN, META = _data(512, 1), _data(256, 2)


def _model(optimizer):
    """A model as keras.io writes it: Sequential without an Input, a string loss."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _callback(tune, **kwargs):
    settings = dict(train_data=TRAIN, meta_data=META, num_particles=8, sigma=0.3,
                    truncation_length=4, outer_optimizer=keras.optimizers.Adam(0.1), seed=3)
    settings.update(kwargs)
    return keras_es.ESCallback(tune, **settings)


def _fit(model, callback, epochs=3, extra=()):
    return model.fit(X, Y, batch_size=32, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=[callback, *extra])


@pytest.mark.slow
def test_sgd_learning_rate_and_momentum_by_keras_names_without_naming_the_optimizer():
    model = _model(keras.optimizers.SGD(1e-3, momentum=0.5))
    callback = _callback(["learning_rate", "momentum"])
    history = _fit(model, callback).history
    assert len(history["es_learning_rate"]) == len(history["es_momentum"]) == 3
    assert history["es_learning_rate"][-1] > 3e-3  # a far too small rate is raised
    values = callback.values
    assert set(values) == {"learning_rate", "momentum"}
    # Applied to the fitted model, which ends as a plain SGD holding the tuned values.
    assert type(model.optimizer) is keras.optimizers.SGD
    assert float(model.optimizer.learning_rate) == pytest.approx(values["learning_rate"],
                                                                 rel=1e-5)
    assert model.optimizer.momentum == pytest.approx(values["momentum"], rel=1e-6)

    schedule = callback.tuned_schedule()
    assert isinstance(schedule, keras_es.schedules.Constant)
    config = json.loads(json.dumps(SCHEDULES.serialize(schedule)))
    again = SCHEDULES.deserialize(config)
    assert again.get_config() == schedule.get_config()
    assert float(again(0)) == pytest.approx(values["learning_rate"], rel=1e-6)

    optimizer = callback.tuned_optimizer()
    assert type(optimizer) is keras.optimizers.SGD and optimizer is not model.optimizer
    assert optimizer.get_config()["momentum"] == pytest.approx(values["momentum"])
    assert float(optimizer.learning_rate) == pytest.approx(values["learning_rate"], rel=1e-6)
    # ... and a plain fit with it trains.
    plain = _model(keras.optimizers.SGD.from_config(optimizer.get_config()))
    losses = plain.fit(X, Y, batch_size=32, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert json.loads(json.dumps(callback.get_config()))["tune"] == {
        "learning_rate": None, "momentum": None}


@pytest.mark.slow
def test_keras_names_and_the_advanced_form_follow_the_same_trajectory():
    """The Keras-native form is the advanced form with the compiled values as start."""
    native = _callback(["learning_rate", "momentum"])
    _fit(_model(keras.optimizers.SGD(1e-3, momentum=0.5)), native, epochs=2)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("learning_rate", 1e-3, "log"),
                                  keras_es.Hyperparameter("momentum", 0.5, "logit")])
    advanced = _callback(space, optimizer=keras_es.engine.SGD("learning_rate",
                                                              momentum="momentum"))
    _fit(_model(keras.optimizers.SGD(1e-3, momentum=0.5)), advanced, epochs=2)
    np.testing.assert_allclose([w["theta"] for w in native.window_history],
                               [w["theta"] for w in advanced.window_history], rtol=1e-5)
    assert advanced.tuned_optimizer().get_config()["momentum"] == pytest.approx(
        native.values["momentum"], rel=1e-5)


@pytest.mark.slow
def test_a_range_keeps_the_value_inside_it_and_a_start_value_replaces_the_compiled_one():
    model = _model(keras.optimizers.SGD(1e-3, momentum=0.5))
    callback = _callback({"learning_rate": (1e-4, 2e-3), "momentum": 0.8})
    _fit(model, callback)
    transforms = {h.name: h.transform for h in callback.space.hyperparameters}
    assert isinstance(transforms["learning_rate"], keras_optimizers.LogRange)
    assert callback.space.hyperparameters[1].value == 0.8
    rates = [callback.space.decode(np.array(w["theta"]))["learning_rate"]
             for w in callback.window_history]
    assert max(rates) < 2e-3 and max(rates) > 1.5e-3  # pushed up, held below the bound
    assert callback.get_config()["tune"]["learning_rate"] == [1e-4, 2e-3]


@pytest.mark.slow
def test_a_compiled_exponential_decay_is_followed_and_its_arguments_tuned():
    schedule = SCHEDULES.ExponentialDecay(0.02, decay_steps=20, decay_rate=0.5)
    model = _model(keras.optimizers.SGD(schedule, momentum=0.5))
    callback = _callback(["initial_learning_rate", "decay_rate"])
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            optimizer = self.model.optimizer
            seen.append((int(optimizer.iterations.numpy()), dict(callback.values),
                         float(optimizer.learning_rate)))

    _fit(model, callback, epochs=2, extra=[Record()])
    assert len({v["initial_learning_rate"] for _, v, _ in seen}) > 1
    for step, values, rate in seen:  # the model's own schedule, at the tuned values
        expected = values["initial_learning_rate"] * values["decay_rate"] ** (step / 20)
        assert rate == pytest.approx(expected, rel=1e-5), step
    tuned = callback.tuned_schedule()
    assert type(tuned) is SCHEDULES.ExponentialDecay
    assert tuned.get_config()["decay_rate"] == pytest.approx(callback.values["decay_rate"])
    assert SCHEDULES.deserialize(SCHEDULES.serialize(tuned)).get_config() == tuned.get_config()
    # The fitted model keeps a plain ExponentialDecay holding the tuned values.
    config = model.optimizer.get_config()["learning_rate"]["config"]
    assert config["initial_learning_rate"] == pytest.approx(
        callback.values["initial_learning_rate"], rel=1e-6)
    plain = _model(callback.tuned_optimizer())
    assert np.isfinite(plain.fit(X, Y, batch_size=32, verbose=0).history["loss"][-1])


@pytest.mark.slow
def test_a_compiled_keras_es_schedule_and_adam_on_a_dataset():
    schedule = keras_es.schedules.InverseTimeDecay(0.01, decay_steps=10.0, power=1.0)
    model = _model(keras.optimizers.Adam(schedule))
    data = tf.data.Dataset.from_tensor_slices(TRAIN).batch(32)
    callback = _callback({"initial_learning_rate": None, "power": (0.1, 3.0),
                          "beta_1": None}, train_data=data)
    model.fit(tf.data.Dataset.from_tensor_slices((X, Y)).batch(32), epochs=1, verbose=0,
              callbacks=[callback])
    assert int(callback.trainer.outer_step.numpy()) == 4
    assert model.optimizer.beta_1 == pytest.approx(callback.values["beta_1"], rel=1e-6)
    tuned = callback.tuned_schedule()
    assert isinstance(tuned, keras_es.schedules.InverseTimeDecay)
    config = json.loads(json.dumps(SCHEDULES.serialize(tuned)))
    assert SCHEDULES.deserialize(config).get_config() == tuned.get_config()
    optimizer = callback.tuned_optimizer()
    assert type(optimizer) is keras.optimizers.Adam
    assert optimizer.get_config()["beta_1"] == pytest.approx(callback.values["beta_1"])


@pytest.mark.slow
def test_adamw_weight_decay_starts_from_the_compiled_value():
    model = _model(keras.optimizers.AdamW(1e-3, weight_decay=0.01))
    callback = _callback(["weight_decay"])
    _fit(model, callback, epochs=1)
    assert callback.space.hyperparameters[0].value == pytest.approx(0.01)
    assert model.optimizer.weight_decay == pytest.approx(callback.values["weight_decay"])
    assert type(callback.tuned_optimizer()) is keras.optimizers.AdamW


@pytest.mark.slow
def test_estimator_settings_go_through_the_shared_resolve():
    given = _callback(["learning_rate"], estimator="pes", truncation_length=4, horizon=8,
                      meta_objective="final", sigma=0.2)
    _fit(_model(keras.optimizers.SGD(1e-3)), given, epochs=1)
    assert given.trainer.estimator == keras_es.estimators.resolve(
        "pes", sigma=0.2, truncation_length=4, horizon=8, meta_objective="final",
        stagger=True)
    default = keras_es.ESCallback("learning_rate", train_data=TRAIN, num_particles=4)
    model = _model(keras.optimizers.SGD(1e-3))
    model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[default])
    # The fit's 32 steps are the horizon, unstaggered; the rest are resolve's defaults.
    assert default.trainer.estimator == keras_es.estimators.resolve(
        "es_single", horizon=32, stagger=False)
    with pytest.raises(ValueError, match="carries its own settings"):
        _callback(["learning_rate"], estimator=keras_es.pes(0.1, 4))


@pytest.mark.parametrize("tune, kwargs, match", [
    (["lr"], {}, "tune names 'lr', which is not a hyperparameter"),
    ([], {}, r"tune=\[\] is invalid"),
    (["momentum", "momentum"], {}, "names a hyperparameter twice"),
    ({"momentum": 1.5}, {}, r"tune\['momentum'\]=1.5 is invalid; expected None"),
    ({"learning_rate": (1e-2, 1e-4)}, {}, r"tune\['learning_rate'\]=\(0.01, 0.0001\)"),
    ({"learning_rate": "log"}, {}, r"tune\['learning_rate'\]='log' is invalid"),
    (["learning_rate"], {"optimizer": keras_es.engine.SGD("lr")}, "was given with tune"),
    (["learning_rate"], {"layer_hyperparameters": {"*rate": "dropout"}},
     "layer_hyperparameters needs the advanced form"),
])
def test_bad_tune_requests_are_named_when_the_callback_is_built(tune, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _callback(tune, **kwargs)


@pytest.mark.parametrize("optimizer, tune, match", [
    (lambda: keras.optimizers.SGD(1e-3), ["momentum"],
     "compiled with momentum=0.0, so Keras built no momentum buffers"),
    (lambda: keras.optimizers.SGD(1e-3, momentum=0.5), ["beta_1"],
     "tune names 'beta_1', which the model's SGD does not have"),
    (lambda: keras.optimizers.SGD(1e-3, momentum=0.5), ["weight_decay"],
     "has weight_decay=None, which cannot start a search"),
    (lambda: keras.optimizers.SGD(1e-3, momentum=0.5), {"learning_rate": (1e-2, 1e-1)},
     r"does not contain the start value learning_rate=0.001"),
    (lambda: keras.optimizers.SGD(SCHEDULES.ExponentialDecay(0.01, 10, 0.9)),
     ["learning_rate"], "follows a ExponentialDecay schedule; tune its arguments"),
    (lambda: keras.optimizers.SGD(SCHEDULES.CosineDecay(0.01, 100)), ["learning_rate"],
     "CosineDecay learning-rate schedule, which ESCallback cannot evaluate"),
    (lambda: keras.optimizers.RMSprop(1e-3), ["learning_rate"],
     "compiled with RMSprop; ESCallback tunes models compiled with"),
    (lambda: keras.optimizers.SGD(1e-3, clipnorm=1.0), ["learning_rate"],
     "clipnorm=1.0, which the particles' update does not reproduce"),
])
def test_names_the_compiled_optimizer_cannot_serve_are_named_at_train_begin(
        optimizer, tune, match):
    callback = _callback(tune)
    with pytest.raises(ValueError, match=match):
        _fit(_model(optimizer()), callback, epochs=1)
    assert callback.trainer is None


def test_tuned_results_before_a_fit_are_refused_clearly():
    callback = _callback(["learning_rate"])
    assert callback.values == {}
    with pytest.raises(ValueError, match="tuned_optimizer\\(\\) is available once a fit"):
        callback.tuned_optimizer()


@pytest.mark.parametrize("schedule", [
    keras_es.schedules.Constant(0.1),
    keras_es.schedules.InverseTimeDecay(0.1, 50.0, 0.5),
    keras_es.schedules.ExponentialDecay(0.1, 10, 0.5, staircase=True),
    keras_es.schedules.PiecewiseLinear([0.0, 10.0], [0.1, 0.01]),
])
def test_keras_es_schedules_are_serializable_keras_schedules(schedule):
    config = json.loads(json.dumps(SCHEDULES.serialize(schedule)))
    again = SCHEDULES.deserialize(config)
    assert type(again) is type(schedule) and again.get_config() == schedule.get_config()
    steps = tf.constant([0.0, 5.0, 15.0])
    np.testing.assert_allclose([float(again(s)) for s in steps],
                               schedule(steps, {}).numpy(), rtol=1e-6)
    optimizer = keras.optimizers.SGD(again)
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(0)), rel=1e-6)


def test_a_schedule_with_hyperparameter_names_is_substituted_before_keras_uses_it():
    schedule = keras_es.schedules.InverseTimeDecay("lr0", 7.0, "decay")
    with pytest.raises(ValueError, match=r"refers to hyperparameters \['lr0', 'decay'\]"):
        schedule(0)
    tuned = keras_es.schedules.substitute(schedule, {"lr0": 0.2, "decay": 2.0})
    assert tuned.get_config() == {"initial_learning_rate": 0.2, "decay_steps": 7.0,
                                  "power": 2.0}


@pytest.mark.slow
def test_backup_and_restore_resumes_a_keras_native_fit(tmp_path):
    """Keras's backup restores the optimizer (its learning rate variable too) before
    the callback reads it; the ES state saved beside it resumes the same trajectory."""

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch) == (2, 5):
                raise RuntimeError("interrupted")

    def run(*callbacks):
        model = _model(keras.optimizers.SGD(1e-3, momentum=0.5))
        model.build((None, 10))  # BackupAndRestore needs a built model
        return model.fit(X, Y, batch_size=32, epochs=4, shuffle=False, verbose=0,
                         callbacks=list(callbacks))

    straight = _callback(["learning_rate", "momentum"])
    expected = run(straight).history["es_learning_rate"]
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        run(keras.callbacks.BackupAndRestore(backup),
            _callback(["learning_rate", "momentum"], backup_dir=backup), Interrupt())
    resumed = _callback(["learning_rate", "momentum"], backup_dir=backup)
    history = run(keras.callbacks.BackupAndRestore(backup), resumed).history
    np.testing.assert_allclose(history["es_learning_rate"], expected[2:], rtol=1e-6)
    np.testing.assert_allclose(resumed.trainer.theta_value, straight.trainer.theta_value,
                               rtol=1e-6)
