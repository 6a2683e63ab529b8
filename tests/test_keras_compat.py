"""The Keras internals keras_es relies on (keras_es.keras_compat) still hold.

If a Keras release moves one, these fail first, naming it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_es import keras_compat


def test_backup_and_restore_writes_the_files_keras_compat_names(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("stop")  # before BackupAndRestore cleans up at train end

    with pytest.raises(RuntimeError, match="stop"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), epochs=2, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path)), Stop()])
    assert keras_compat.backup_present(str(tmp_path)), (
        f"BackupAndRestore no longer writes {keras_compat.BACKUP_FILES}: "
        f"{sorted(p.name for p in tmp_path.iterdir())}")


@pytest.mark.parametrize("name, value, new", [("momentum", 0.5, 0.9), ("beta_1", 0.9, 0.5)])
def test_run_time_values_change_the_traced_step_without_a_new_trace(name, value, new):
    """An attribute served by read_at_run_time changes what the already traced step
    computes; outside a trace it reads as a float; restore gives the plain class."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    optimizer = (keras.optimizers.SGD(0.1, momentum=value) if name == "momentum"
                 else keras.optimizers.Adam(0.1, beta_1=value))
    model.compile(optimizer, "mse")
    knobs = keras_compat.read_at_run_time(model.optimizer, [name])
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 1), np.float32)
    model.train_on_batch(x, y)  # traced here, with the value read from a variable
    step = model.train_function
    before = [v.numpy().copy() for v in model.optimizer.variables if len(v.shape)]
    with tf.GradientTape() as tape:  # the gradient the second step will apply
        loss = keras.losses.mean_squared_error(y, model(x))
        loss = tf.reduce_mean(loss)
    (gradient,) = tape.gradient(loss, model.trainable_variables)
    gradient = gradient.numpy()
    knobs[name].assign(new)
    model.train_on_batch(x, y)
    assert model.train_function is step  # no new trace
    after = [v.numpy() for v in model.optimizer.variables if len(v.shape)]
    m1, m2 = before[0], after[0]
    if name == "momentum":  # m_2 = momentum * m_1 - lr * g_2, with the new momentum
        expected, stale = new * m1 - 0.1 * gradient, value * m1 - 0.1 * gradient
    else:  # m_2 = m_1 + (g_2 - m_1) (1 - beta_1)
        expected, stale = m1 + (gradient - m1) * (1 - new), m1 + (gradient - m1) * (1 - value)
    np.testing.assert_allclose(m2, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(m2, stale, rtol=1e-3)
    assert getattr(model.optimizer, name) == pytest.approx(new)
    assert isinstance(model.optimizer.get_config()[name], float)
    keras_compat.restore_attributes(model.optimizer)
    assert type(model.optimizer).__name__ == type(optimizer).__name__
    assert type(model.optimizer) in (keras.optimizers.SGD, keras.optimizers.Adam)
    assert getattr(model.optimizer, name) == pytest.approx(new)


def test_a_model_saved_while_values_are_served_at_run_time_loads(tmp_path):
    """A fit interrupted before its end leaves the optimizer swapped: saving and
    loading the model still sees Keras's own SGD, with the current momentum."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.5), "mse")
    knobs = keras_compat.read_at_run_time(model.optimizer, ["momentum"])
    knobs["momentum"].assign(0.8)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is keras.optimizers.SGD
    assert loaded.optimizer.momentum == pytest.approx(0.8)
