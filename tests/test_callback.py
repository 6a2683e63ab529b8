"""ESCallback: online tuning inside model.fit, logs, errors, interruption and resume."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_es

SPACE = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 1e-3, "log"),
                              keras_es.Hyperparameter("momentum", 0.5, "logit")])


def _data(n, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(10, 3))
    x = rng.normal(size=(n, 10)).astype("float32")
    return x, np.argmax(x @ w, axis=1)


def _model(momentum=0.5):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _callback(**kwargs):
    settings = dict(train_data=_data(512, 1), meta_data=_data(256, 2), num_particles=8,
                    sigma=0.3, truncation_length=4, batch_size=32,
                    outer_optimizer=keras.optimizers.Adam(0.1), seed=3)
    settings.update(kwargs)
    return keras_es.ESCallback(SPACE, keras_es.engine.SGD("lr", momentum="momentum"),
                               **settings)


X, Y = _data(512, 0)


def test_fit_tunes_and_applies_hyperparameters():
    model = _model()
    callback = _callback()
    history = model.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                        callbacks=[callback])
    logs = history.history
    for key in ("es_lr", "es_momentum", "es_meta_loss", "es_gradient_norm",
                "es_diverged_pairs"):
        assert len(logs[key]) == 3, key
    # 16 batches per epoch, K = 4: 12 windows; a far too small lr is raised.
    assert int(callback.trainer.outer_step.numpy()) == 12
    assert [w["batches"] for w in callback.window_history] == list(range(4, 49, 4))
    np.testing.assert_allclose(callback.window_history[-1]["theta"],
                               callback.trainer.theta_value)
    assert logs["es_lr"][-1] > 3e-3
    assert callback.values["lr"] == pytest.approx(logs["es_lr"][-1])
    # Applied to the fitted model: the rate every batch, momentum at epoch ends.
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(
        callback.values["lr"], rel=1e-5)
    assert model.optimizer.momentum == pytest.approx(callback.values["momentum"], rel=1e-5)
    assert np.all(np.isfinite(model.get_weights()[0]))
    config = callback.get_config()
    assert config["num_particles"] == 8 and config["estimator"] == "es_single"


def test_guided_es_with_the_one_step_hypergradient_surrogate():
    model = _model()
    callback = _callback(guided=keras_es.GuidedConfig(k=2, alpha=0.5))
    history = model.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                        callbacks=[callback])
    # Every window pushed the hypergradient of the current theta: the two newest fill
    # the FIFO, and at lr = 1e-3 it says "raise the learning rate" (negative first entry).
    surrogates = callback.trainer.state.guided.surrogates.numpy()
    assert surrogates.shape == (2, 2) and np.all(np.isfinite(surrogates))
    assert np.all(surrogates[:, 0] < 0)
    assert history.history["es_lr"][-1] > 1e-3
    assert callback.get_config()["guided"]["k"] == 2


def test_the_fitted_model_follows_the_tuned_schedule_at_its_own_step():
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr0", 0.05, "log"),
                                  keras_es.Hyperparameter("decay", 1.0, "log")])
    schedule = keras_es.schedules.InverseTimeDecay("lr0", 7.0, "decay")
    es = keras_es.ESCallback(space, keras_es.engine.SGD(schedule, momentum=0.5),
                             train_data=_data(512, 1), meta_data=_data(256, 2),
                             num_particles=4, truncation_length=4, seed=3)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            optimizer = self.model.optimizer
            seen.append((int(optimizer.iterations.numpy()), dict(es.values),
                         float(optimizer.learning_rate.numpy())))

    _model().fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                 callbacks=[es, Record()])
    assert len(seen) == 32 and len({v["lr0"] for _, v, _ in seen}) > 1
    for step, values, lr in seen:
        expected = values["lr0"] / (1.0 + step / 7.0) ** values["decay"]
        assert lr == pytest.approx(expected, rel=1e-5), step


def test_an_averaging_outer_optimizer_ends_the_fit_with_the_average():
    model = _model()
    callback = _callback(outer_optimizer=keras.optimizers.Adam(0.1, use_ema=True,
                                                               ema_momentum=0.8))
    model.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    # The moving average by hand, as Keras keeps it (momentum 0 on the first update).
    average = None
    for window in callback.window_history:
        theta = np.asarray(window["theta"])
        average = theta if average is None else 0.8 * average + 0.2 * theta
    np.testing.assert_allclose(callback.trainer.theta_value, average, rtol=1e-5)
    assert not np.allclose(callback.trainer.theta_value, callback.window_history[-1]["theta"])
    # ... and the fitted model got the averaged values.
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(
        callback.values["lr"], rel=1e-5)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_the_same_theta_trajectory(tmp_path):
    def run(callbacks):
        return _model().fit(X, Y, batch_size=32, epochs=4, shuffle=False, verbose=0,
                            callbacks=callbacks)

    straight = _callback()
    expected = run([straight]).history["es_lr"]

    backup = str(tmp_path / "backup")
    first = _callback(backup_dir=backup)
    with pytest.raises(RuntimeError, match="interrupted"):
        run([keras.callbacks.BackupAndRestore(backup), first, Interrupt(2, 5)])
    resumed = _callback(backup_dir=backup)
    history = run([keras.callbacks.BackupAndRestore(backup), resumed])
    # The resumed fit runs epochs 2 and 3 again from the epoch-1 backup.
    assert len(history.history["es_lr"]) == 2
    np.testing.assert_allclose(history.history["es_lr"], expected[2:], rtol=1e-6)
    np.testing.assert_allclose(resumed.trainer.theta_value, straight.trainer.theta_value,
                               rtol=1e-6)


def test_works_beside_model_checkpoint_and_early_stopping(tmp_path):
    model = _model()
    callbacks = [_callback(), keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras")),
                 keras.callbacks.EarlyStopping(monitor="es_meta_loss", mode="min", patience=10)]
    model.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    assert (tmp_path / "m.keras").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"num_particles": 7}, "num_particles=7"),
    ({"truncation_length": 0}, "truncation_length=0"),
    ({"truncation_length": 8, "horizon": 4}, "horizon=4 is shorter"),
    ({"train_data": None}, "train_data=None"),
    ({"estimator": "cma"}, "estimator='cma'"),
    ({"jit_compile": "always"}, "jit_compile='always'"),
    ({"guided": 2}, "guided=2"),
])
def test_bad_settings_raise_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _callback(**kwargs)


def test_bad_models_raise_at_train_begin():
    with pytest.raises(ValueError, match="momentum=0"):
        _model(momentum=0.0).fit(X, Y, epochs=1, verbose=0, callbacks=[_callback()])
    adam = _model()
    adam.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="compiled with Adam"):
        adam.fit(X, Y, epochs=1, verbose=0, callbacks=[_callback()])
    with pytest.raises(ValueError, match=r"hyperparameters \['beta'\]"):
        keras_es.ESCallback(SPACE, keras_es.engine.SGD("lr", momentum="beta"),
                            train_data=_data(10, 0))


# A fit run in its own process, so that it can be killed for real (SIGKILL, no
# clean-up, no exception handlers) and run again.
_FIT_SCRIPT = """
import json, os, signal, sys
import keras
sys.path.insert(0, {tests!r})
import test_callback as t

out, backup, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (kill_at, 5):
            os.kill(os.getpid(), signal.SIGKILL)

es = t._callback(backup_dir=backup)
history = t._model().fit(t.X, t.Y, batch_size=32, epochs=4, shuffle=False, verbose=0,
                         callbacks=[keras.callbacks.BackupAndRestore(backup), es, Kill()])
with open(out, "w") as f:
    json.dump({{"es_lr": history.history["es_lr"],
               "theta": es.trainer.theta_value.tolist()}}, f)
"""


def test_a_killed_fit_resumes_the_same_theta_trajectory(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(_FIT_SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def run(out, backup, kill_at):
        return subprocess.run([sys.executable, str(script), str(out), str(backup),
                               str(kill_at)], env=env, capture_output=True, text=True,
                              timeout=600)

    straight = run(tmp_path / "straight.json", tmp_path / "b1", -1)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path / "killed.json", tmp_path / "b2", 2)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.json").exists()
    resumed = run(tmp_path / "resumed.json", tmp_path / "b2", -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected = json.loads((tmp_path / "straight.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    # Killed during epoch 2: the rerun starts from the epoch-1 backups.
    np.testing.assert_allclose(got["es_lr"], expected["es_lr"][2:], rtol=1e-6)
    np.testing.assert_allclose(got["theta"], expected["theta"], rtol=1e-6)


def test_auto_jit_compile_follows_window_count_and_population():
    callback = _callback()
    callback.params = {"steps": 16, "epochs": 1000}  # 4,000 windows of K = 4
    estimator = keras_es.es_single(0.3, 4)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 1e-3, "log")])

    def population(model):
        return keras_es.Population(model, 2, space, keras.losses.MeanSquaredError(),
                                   keras_es.engine.SGD("lr"))

    conv = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),
                             keras.layers.Flatten(), keras.layers.Dense(1)])
    assert callback._use_xla(estimator, population(_model()))
    assert not callback._use_xla(estimator, population(conv))  # stacked: XLA is slow
    callback.params = {"steps": 16, "epochs": 10}  # 40 windows: compile would not pay off
    assert not callback._use_xla(estimator, population(_model()))


def test_fit_of_a_convolutional_model_tunes_with_stacked_particles():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(256, 6, 6, 1)).astype("float32")
    y = (x[:, :3, :3, 0].sum((1, 2)) > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(),
                              keras.layers.Activation("relu"), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = _callback(train_data=(x[:192], y[:192]), meta_data=(x[192:], y[192:]))
    history = model.fit(x[:192], y[:192], batch_size=32, epochs=2, shuffle=False,
                        verbose=0, callbacks=[callback])
    assert callback.trainer.system.population.stacked
    assert not callback.trainer.jit_compile  # auto: stacked steps run without XLA
    assert history.history["es_lr"][-1] > 1e-3  # a far too small lr is raised
    assert np.all(np.isfinite(callback.trainer.theta_value))
