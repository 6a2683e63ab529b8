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


class _Holder(keras.layers.Layer):
    """A layer that owns a weight and a sublayer (tracked by attribute)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(2, name="inner")

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")
        self.inner.build(input_shape)

    def call(self, x):
        return self.inner(x) * self.scale


def test_sublayers_lists_nested_layers_parents_first():
    assert hasattr(keras.layers.Layer, "_flatten_layers"), (
        "keras.layers.Layer._flatten_layers moved: keras_compat.sublayers reads it")
    nested = keras.Sequential([keras.layers.Dense(3, name="d1")], name="nested")
    holder = _Holder(name="holder")
    model = keras.Sequential([keras.Input((4,)), nested, holder, keras.layers.Dropout(0.1)])
    names = [layer.name for layer in keras_compat.sublayers(model)]
    assert model.name not in names
    for name in ("nested", "d1", "holder", "inner"):
        assert name in names, f"keras_compat.sublayers misses {name!r}: {names}"
    assert names.index("nested") < names.index("d1")
    assert names.index("holder") < names.index("inner")


def test_own_variables_are_a_layers_own_weights_only():
    for name in ("_trainable_variables", "_non_trainable_variables"):
        assert hasattr(keras.layers.Dense(1), name), (
            f"keras.layers.Layer.{name} moved: keras_compat.own_variables reads it")
    holder = _Holder()
    dropout = keras.layers.Dropout(0.5, seed=1)
    norm = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((4,)), holder, dropout, norm])
    assert [v.name for v in keras_compat.own_variables(holder)] == ["scale"]
    assert [v.name for v in keras_compat.own_variables(holder.inner)] == ["kernel", "bias"]
    assert keras_compat.own_variables(dropout) == []  # its seed state is not its weight
    assert [v.name for v in keras_compat.own_variables(norm)] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    owned = [id(v) for layer in keras_compat.sublayers(model)
             for v in keras_compat.own_variables(layer)]
    assert sorted(owned) == sorted(id(v) for v in model.weights
                                   if id(v) not in {id(s) for s in dropout.weights})


def test_layer_calls_and_is_functional_read_a_functional_chain():
    assert hasattr(keras.layers.Dense(1), "_inbound_nodes"), (
        "keras.layers.Layer._inbound_nodes moved: keras_compat.layer_calls reads it")
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3)
    hidden = dense(inputs)
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(inputs, outputs)
    assert keras_compat.is_functional(model), (
        f"keras.Model(inputs, outputs) is now a {type(model).__name__}, not 'Functional': "
        "keras_compat.is_functional checks the name")
    assert not keras_compat.is_functional(keras.Sequential([keras.layers.Dense(1)]))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    assert not keras_compat.is_functional(Subclassed())
    ((ins, outs),) = keras_compat.layer_calls(dense)
    assert len(ins) == 1 and ins[0] is model.inputs[0]
    assert len(outs) == 1 and outs[0] is hidden


def test_optimizer_strategy_is_the_one_current_at_creation():
    assert hasattr(keras.optimizers.SGD(), "_distribution_strategy"), (
        "keras.optimizers.Optimizer._distribution_strategy moved: "
        "keras_compat.optimizer_strategy reads it")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        inside = keras.optimizers.Adam()
    outside = keras.optimizers.Adam()
    assert keras_compat.optimizer_strategy(inside) is strategy
    assert keras_compat.optimizer_strategy(outside) is not strategy
    assert keras_compat.optimizer_strategy(object(), "default") == "default"


def test_convolution_method_replaces_how_one_layer_convolves():
    method = keras_compat.CONVOLUTION_METHOD
    assert callable(getattr(keras.layers.Conv2D, method, None)), (
        f"keras.layers.Conv2D.{method} moved: keras_es.engine.vectorize replaces it")
    layer = keras.layers.Conv2D(2, 3, use_bias=False)
    other = keras.layers.Conv2D(2, 3, use_bias=False)
    x = np.ones((1, 5, 5, 1), np.float32)
    layer(x), other(x)
    calls = []

    def convolve(inputs, kernel):
        calls.append(kernel)
        return tf.zeros([1, 3, 3, 2])

    setattr(layer, method, convolve)
    assert np.all(np.asarray(layer(x)) == 0), (
        f"keras.layers.Conv2D.call no longer computes through self.{method}")
    assert calls and calls[0] is layer.kernel
    assert not np.all(np.asarray(other(x)) == 0)  # other layers keep Keras's own
