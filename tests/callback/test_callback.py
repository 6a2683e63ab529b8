"""ESCallback: online tuning inside model.fit, logs, errors, interruption and resume."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es.engine import stacked

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


_BETWEEN_SAVES_SCRIPT = """
import json, os, signal, sys
import keras
sys.path.insert(0, {tests!r})
import test_callback as t

out, backup, order, kill_epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

es, keras_backup = t._callback(backup_dir=backup), keras.callbacks.BackupAndRestore(backup)
callbacks = ([keras_backup, Kill(), es] if order == "keras_first"
             else [es, Kill(), keras_backup])
history = t._model().fit(t.X, t.Y, batch_size=32, epochs=4, shuffle=False, verbose=0,
                         callbacks=callbacks)
with open(out, "w") as f:
    json.dump({{"theta": es.trainer.theta_value.tolist(),
               "outer_step": int(es.trainer.outer_step.numpy())}}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["keras_first", "es_first"])
def test_a_kill_between_the_two_epoch_end_saves_resumes_exactly(tmp_path, order):
    """SIGKILL after one of Keras's and keras_es's epoch-end saves and before the other
    (either order in the callback list): the rerun ends with the uninterrupted run's
    theta and outer step, not one epoch of windows lost or repeated."""
    script = tmp_path / "fit.py"
    script.write_text(_BETWEEN_SAVES_SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def run(name, kill_epoch):
        return subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.json"),
                               str(tmp_path / "backup"), order, str(kill_epoch)], env=env,
                              capture_output=True, text=True, timeout=600)

    killed = run("killed", 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run("resumed", -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    model, callback = _model(), _callback()
    model.fit(X, Y, batch_size=32, epochs=4, shuffle=False, verbose=0, callbacks=[callback])
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got["outer_step"] == int(callback.trainer.outer_step.numpy()) == 16
    np.testing.assert_allclose(got["theta"], callback.trainer.theta_value, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["record", "checkpoint", "both_checkpoints"])
def test_damaged_or_missing_es_state_is_named_and_never_silently_restarted(tmp_path, damage):
    """A damaged ES save is reported by name and the intact one used (the windows since
    replayed); with every ES save and the start record gone while Keras's backup
    resumes the fit, the fit refuses instead of starting ES over."""
    backup = tmp_path / "backup"

    def fit(callback, *extra):
        model = _model()
        model.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(backup)), callback, *extra])
        return callback

    straight = _callback()
    _model().fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                 callbacks=[straight])
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(_callback(backup_dir=str(backup)), Interrupt(2, 3))
    # Both epochs' ES saves are there (slots a, b); damage the newest (epoch 1, in b):
    # its record torn, or its checkpoint's data truncated.
    # With both checkpoints damaged: replayed from the run's start (es_start.json),
    # after the first damaged save was partly loaded into the trainer.
    if damage == "record":
        (backup / "es_state_b.json").write_text('{"batches": 3')
    for slot in {"checkpoint": "b", "both_checkpoints": "ab"}.get(damage, ""):
        (data,) = [p for p in backup.iterdir() if p.name.startswith(f"es_state_{slot}")
                   and ".data-" in p.name]
        data.write_bytes(data.read_bytes()[:20])
    with pytest.warns(RuntimeWarning, match="es_state_b"):
        resumed = fit(_callback(backup_dir=str(backup),
                                outer_optimizer=keras.optimizers.Adam(0.1)))
    # Resumed from the epoch-0 save (or the start), the windows since replayed, epoch 2
    # trained.
    assert int(resumed.trainer.outer_step.numpy()) == 12
    np.testing.assert_allclose(resumed.trainer.theta_value, straight.trainer.theta_value,
                               rtol=1e-6)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(_callback(backup_dir=str(backup)), Interrupt(1, 3))
    for name in os.listdir(backup):
        if name.startswith("es_"):
            os.remove(backup / name)
    with pytest.raises(ValueError, match="no usable ES state"):
        fit(_callback(backup_dir=str(backup)))


def test_auto_jit_compile_follows_window_count_and_population():
    callback = _callback()
    callback.params = {"steps": 16, "epochs": 1000}  # 4,000 windows of K = 4
    estimator = keras_es.es_single(0.3, 4)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 1e-3, "log")])

    def population(model, execution="auto"):
        return keras_es.Population(model, 2, space, keras.losses.MeanSquaredError(),
                                   keras_es.engine.SGD("lr"), execution=execution)

    conv = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),
                             keras.layers.Flatten(), keras.layers.Dense(1)])
    assert callback._use_xla(estimator, population(_model()))
    assert callback._use_xla(estimator, population(conv, "vectorized"))
    if stacked.missing_kernel(conv) is None:
        assert not callback._use_xla(estimator, population(conv))  # stacked: XLA is slow
    callback.params = {"steps": 16, "epochs": 10}  # 40 windows: compile would not pay off
    assert not callback._use_xla(estimator, population(_model()))


@pytest.mark.slow
@pytest.mark.parametrize("convolutions, execution", [(1, "auto"), (2, "auto"),
                                                     (2, "vectorized")])
def test_fit_of_a_convolutional_model_tunes_on_any_cpu(convolutions, execution):
    """Particles run stacked where the device has grouped-convolution gradients and
    vectorized elsewhere (a CPU without oneDNN), or as asked."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(256, 6, 6, 1)).astype("float32")
    y = (x[:, :3, :3, 0].sum((1, 2)) > 0).astype("int32")
    keras.utils.set_random_seed(0)
    extra = [keras.layers.Conv2D(4, 3, padding="same")] if convolutions == 2 else []
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3), *extra,
                              keras.layers.BatchNormalization(),
                              keras.layers.Activation("relu"), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = _callback(train_data=(x[:192], y[:192]), meta_data=(x[192:], y[192:]),
                         execution=execution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's, tested elsewhere
        history = model.fit(x[:192], y[:192], batch_size=32, epochs=2, shuffle=False,
                            verbose=0, callbacks=[callback])
    expected = execution == "auto" and stacked.missing_kernel(model) is None
    assert callback.trainer.system.population.stacked == expected
    assert not callback.trainer.jit_compile  # auto: 12 windows, too few for XLA
    assert history.history["es_lr"][-1] > 1e-3  # a far too small lr is raised
    assert np.all(np.isfinite(callback.trainer.theta_value))


@pytest.mark.slow
def test_the_guided_surrogate_reads_the_particles_current_weights():
    """The one-step hypergradient pushed before each window is taken at the particles'
    state of that moment, not at the state captured when the window was traced."""
    model = _model()
    callback = _callback(guided=keras_es.GuidedConfig(k=1, alpha=0.5))
    model.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    trainer = callback.trainer
    system = trainer.system
    pushed, expected = [], []
    for _ in range(3):
        state, theta = trainer.system_state, tf.constant(trainer.theta_value)
        step = int(trainer.outer_step.numpy())
        key = keras_es.noise.pair_seeds(3, keras_es.noise.STREAM_SURROGATE,
                                        tf.constant([0]), tf.constant([step]))[0]
        expected.append(system.hypergradient(state, theta, key).numpy())
        trainer.step()
        pushed.append(trainer.state.guided.surrogates.numpy()[0])
    np.testing.assert_allclose(pushed, expected, rtol=1e-4, atol=1e-7)
    assert not np.allclose(pushed[0], pushed[2])  # the weights moved, so did the surrogate


# Compile calls as the keras.io guides write them: string losses and metrics, loss
# objects with every reduction, from_logits either way.
COMPILES = {
    "sparse_string": (dict(loss="sparse_categorical_crossentropy", metrics=["accuracy"]),
                      "softmax", "sparse"),
    "categorical_string": (dict(loss="categorical_crossentropy", metrics=["accuracy"]),
                           "softmax", "onehot"),
    "mse_string": (dict(loss="mse", metrics=["mae"]), None, "onehot"),
    "mae_string": (dict(loss="mae"), None, "onehot"),
    "binary_string": (dict(loss="binary_crossentropy", metrics=["accuracy"]), "sigmoid",
                      "binary"),
    "crossentropy_by_shape": (dict(loss="crossentropy"), "softmax", "sparse"),
    "logits_object": (dict(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=[keras.metrics.SparseCategoricalAccuracy()]), None,
        "sparse"),
    "sum_reduction": (dict(loss=keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction="sum")), None, "onehot"),
    "no_reduction": (dict(loss=keras.losses.MeanSquaredError(reduction=None)), None,
                     "onehot"),
    "function": (dict(loss=keras.losses.sparse_categorical_crossentropy), "softmax",
                 "sparse"),
}


def _targets(kind, y):
    if kind == "onehot":
        return keras.utils.to_categorical(y, 3).astype("float32")
    if kind == "binary":
        return (y == 0).astype("float32")[:, None]
    return y


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPILES))
def test_keras_compile_calls_as_users_write_them(name):
    settings, activation, kind = COMPILES[name]
    units = 1 if kind == "binary" else 3
    keras.utils.set_random_seed(0)
    # Sequential without an Input, as the guides build it.
    model = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(units, activation=activation)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.5), **settings)
    x, y = _data(512, 1)
    xv, yv = _data(256, 2)
    callback = _callback(train_data=(x, _targets(kind, y)), meta_data=(xv, _targets(kind, yv)))
    history = model.fit(X, _targets(kind, Y), batch_size=32, epochs=1, verbose=0,
                        callbacks=[callback])
    assert int(callback.trainer.outer_step.numpy()) == 4
    assert np.isfinite(history.history["es_meta_loss"][-1])
    # The particles train on the loss Keras's fit trains on: same value, same weights.
    population = callback.trainer.system.population
    state = population.copy_state(model)
    xb, yb = tf.constant(X[:32]), tf.constant(_targets(kind, Y[:32]))
    ours = population.evaluate(state, xb, yb)["loss"].numpy()
    theirs = model.compute_loss(x=xb, y=yb, y_pred=model(xb))
    np.testing.assert_allclose(ours, np.sum(theirs), rtol=1e-5)


@pytest.mark.slow
def test_steps_per_execution_counts_batches_not_calls():
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=3)
    callback = _callback(truncation_length=5)
    model.fit(X[:352], Y[:352], batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    # 44 batches, K = 5: 8 windows, although Keras called back only 15 times.
    assert int(callback.trainer.outer_step.numpy()) == 8
    assert [w["batches"] for w in callback.window_history] == list(range(5, 41, 5))


# Every level of each, beside a level of the other (the fits are the slow part).
@pytest.mark.slow
@pytest.mark.parametrize("verbose, fit_verbose", [(0, 0), (1, 1), (2, 2), (2, "auto"),
                                                  (1, "auto")])
def test_every_verbose_level(verbose, fit_verbose, capsys):
    model = _model()
    callback = _callback(verbose=verbose)
    model.fit(X[:128], Y[:128], batch_size=32, epochs=2, verbose=fit_verbose,
              callbacks=[callback])
    out = capsys.readouterr().out
    assert out.count("ESCallback window: es_lr=") == (2 if verbose == 2 else 0)
    assert out.count(": ESCallback es_lr=") == (2 if verbose == 1 else 0)


def _generator():
    while True:
        for i in range(0, 512, 32):
            yield X[i:i + 32], Y[i:i + 32]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["arrays", "dataset", "generator"])
def test_fit_on_arrays_datasets_and_generators(source):
    model = _model()
    callback = _callback()
    if source == "arrays":
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    elif source == "dataset":
        data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(32)
        model.fit(data, epochs=1, verbose=0, callbacks=[callback])
    else:
        model.fit(_generator(), steps_per_epoch=16, epochs=1, verbose=0,
                  callbacks=[callback])
    assert int(callback.trainer.outer_step.numpy()) == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"telescope": "False"}, "telescope='False'"),
    ({"jit_compile": "no"}, "jit_compile='no'"),
    ({"seed": 1.7}, "seed=1.7"),
    ({"seed": 2**32}, "seed=4294967296"),
    ({"sigma": 1e-30}, "sigma=1e-30.*float32 rounding"),
    ({"estimator": 5}, "estimator=5"),
    ({"outer_optimizer": "adam"}, "outer_optimizer='adam'"),
    ({"batch_size": 0}, "batch_size=0"),
])
def test_strict_arguments_are_refused_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _callback(**kwargs)


def test_arguments_that_would_train_wrongly_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="backup_dir=.*not a file"):
        _callback(backup_dir=str(a_file))
    with pytest.raises(ValueError, match="hyperparameters='lr' is invalid"):
        keras_es.SearchSpace("lr")
    with pytest.raises(ValueError, match="momentum=-1 is invalid"):
        keras_es.engine.SGD("lr", momentum=-1)
    with pytest.raises(ValueError, match="beta_1=1.5 is invalid"):
        keras_es.engine.Adam("lr", beta_1=1.5)
    with pytest.raises(ValueError, match=r"space declares \['momentum'\], which neither"):
        keras_es.ESCallback(SPACE, keras_es.engine.SGD("lr", momentum=0.5),
                            train_data=_data(64, 1))
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.5, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="nesterov=True"):
        model.fit(X[:128], Y[:128], batch_size=32, verbose=0, callbacks=[_callback()])


@pytest.mark.slow
def test_a_second_fit_with_the_same_callback_is_refused_clearly():
    model = _model()
    callback = _callback()
    model.fit(X[:128], Y[:128], batch_size=32, verbose=0, callbacks=[callback])
    theta = callback.trainer.theta_value
    with pytest.raises(ValueError, match="already used in a fit.*callback.values"):
        model.fit(X[:128], Y[:128], batch_size=32, verbose=0, callbacks=[callback])
    np.testing.assert_array_equal(callback.trainer.theta_value, theta)  # untouched


@pytest.mark.slow
def test_tuned_momentum_reaches_the_model_without_retracing_its_step():
    """Momentum is read by the traced train step from a variable: the step is traced
    once per fit (each new trace kept memory alive: +55 MiB per 100 epochs), and the
    model trains with the momentum of the latest window, not of the last epoch end."""
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append((self.model.train_function, float(self.model.optimizer.momentum)))

    model, callback = _model(), _callback()
    model.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0,
              callbacks=[callback, Record()])
    assert len({id(step) for step, _ in seen}) == 1
    momenta = [m for _, m in seen]
    assert len(set(momenta)) > 3  # it changed within epochs (every window)
    window = callback.window_history[-2]
    assert momenta[window["batches"]] == pytest.approx(
        float(callback.space.decode(np.array([window["theta"]]))["momentum"][0]), rel=1e-5)
    # After the fit: a plain Keras SGD holding the tuned float.
    assert type(model.optimizer) is keras.optimizers.SGD
    assert model.optimizer.momentum == pytest.approx(callback.values["momentum"], rel=1e-5)


@pytest.mark.parametrize("data, name, match", [
    (lambda: (_data(64, 1)[0][:, :7], _data(64, 1)[1]), "train_data", "train_data does not fit"),
    (lambda: (_data(64, 1)[0], _data(64, 1)[1] + 5), "train_data", "labels from 5 to 7"),
    (lambda: (_data(64, 1)[0], keras.utils.to_categorical(_data(64, 1)[1], 3)), "meta_data",
     "meta_data does not fit"),
])
def test_data_that_does_not_fit_the_model_is_named_at_train_begin(data, name, match):
    model = _model()
    callback = _callback(**{name: data()})
    with pytest.raises(ValueError, match=match):
        model.fit(X[:128], Y[:128], batch_size=32, verbose=0, callbacks=[callback])
    assert callback.trainer is None  # before any window


@pytest.mark.slow
def test_an_endless_generator_as_train_data_is_refused(monkeypatch):
    from keras_es.engine import keras_system

    monkeypatch.setattr(keras_system, "MAX_DATA_BYTES", 2**20)

    def endless():
        while True:
            yield np.zeros(10, np.float32), 0

    data = tf.data.Dataset.from_generator(endless, output_signature=(
        tf.TensorSpec([10], tf.float32), tf.TensorSpec([], tf.int64)))
    with pytest.raises(ValueError, match="train_data yielded more than .* endless"):
        _model().fit(X[:128], Y[:128], batch_size=32, verbose=0,
                     callbacks=[_callback(train_data=data)])


@pytest.mark.slow
def test_a_diverging_learning_rate_is_tuned_down_not_frozen():
    """Particles started at a diverging learning rate report inf, NaN and huge losses:
    every window with a valid pair still updates theta (it froze before), and the rate
    comes down."""
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 100.0, "log")])
    model = _model()
    callback = keras_es.ESCallback(space, keras_es.engine.SGD("lr", momentum=0.5),
                                   train_data=_data(512, 1), meta_data=_data(256, 2),
                                   num_particles=8, sigma=0.3, truncation_length=4,
                                   outer_optimizer=keras.optimizers.Adam(0.1), seed=3)
    model.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[callback])
    history = callback.window_history
    assert sum(w["diverged_pairs"] for w in history) > 0
    assert all(w["updated"] == (w["valid_pairs"] > 0) for w in history)
    assert sum(w["updated"] for w in history) >= len(history) // 2
    assert np.isfinite(callback.trainer.theta_value).all()
    assert callback.values["lr"] < 100.0 * 0.7


@pytest.mark.slow
def test_fuzz_the_callback_with_poisoned_rows():
    """The particles' data holds poisoned rows whose loss is inf, NaN or 1e30 times the
    error (both twins of a pair see the same rows): theta stays finite, every window
    with a valid pair updates it, and the learning rate still rises from far too low."""
    rng = np.random.default_rng(11)
    x, y = _data(512, 1)
    poison = np.zeros(512, np.float32)
    rows = rng.choice(512, 6, replace=False)
    poison[rows] = [1.0, 2.0, 3.0, 3.0, 3.0, 1.0]  # 1: inf, 2: NaN, 3: x 1e30

    def poisoned_loss(target, logits):
        labels, tag = target[:, 0], target[:, 1]
        loss = keras.losses.sparse_categorical_crossentropy(
            tf.cast(labels, tf.int32), logits, from_logits=True)
        loss = tf.where(tag == 1.0, np.inf, loss)
        loss = tf.where(tag == 2.0, np.nan, loss)
        return tf.where(tag == 3.0, loss * 1e30, loss)

    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.5), loss=poisoned_loss)
    targets = np.stack([y.astype(np.float32), poison], axis=1)
    callback = _callback(train_data=(x, targets), meta_data=None, batch_size=16)
    model.fit(X, np.stack([Y.astype(np.float32), np.zeros(512, np.float32)], axis=1),
              batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[callback])
    history = callback.window_history
    assert sum(w["diverged_pairs"] for w in history) > 0
    assert all(w["updated"] == (w["valid_pairs"] > 0) for w in history)
    assert np.isfinite([w["theta"] for w in history]).all()
    assert callback.values["lr"] > 1e-3
