"""Particles stacked along channels compute what the vectorized engine computes."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import require_stacked_kernels

import keras_es
from keras_es import engine
from keras_es.engine import population as population_module
from keras_es.engine import stacked

L = keras.layers
N = 4
SPACE = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.1, "log"),
                              keras_es.Hyperparameter("momentum", 0.5, "logit")])
LOSS = keras.losses.SparseCategoricalCrossentropy()


def _zoo(head="flatten", functional=False):
    """Every stacked layer form: shared and stacked convolutions (strides, same and
    valid padding, a non-square kernel, dilation), both poolings, zero padding, batch
    normalization over channels and over Dense units, a softmax over channels, Flatten
    or global pooling, Dense with and without bias, ReLU and Activation layers."""
    keras.utils.set_random_seed(0)
    if head == "flatten":
        top = [L.Flatten(), L.Dropout(0.3), L.Dense(7, activation="tanh"),
               L.BatchNormalization(center=False)]
    else:
        top = [L.GlobalAveragePooling2D(keepdims=True), L.Dense(7, activation="tanh"),
               L.GlobalMaxPooling2D(), L.BatchNormalization(momentum=0.5, scale=False),
               keras_es.layers.Dropout(0.2, name="drop")]
    layers = [
        keras.Input((20, 20, 3)),
        L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        L.BatchNormalization(), L.Dropout(0.25, noise_shape=(None, 1, 1, 4)),
        L.ZeroPadding2D(((1, 0), (0, 2))),
        L.MaxPooling2D(), L.Conv2D(5, (2, 3), activation="tanh"),
        L.AveragePooling2D(2, padding="same"), L.Conv2D(3, 1, dilation_rate=1),
        L.Activation("softmax"), L.Conv2D(3, 2, dilation_rate=2, padding="same",
                                          use_bias=False),
        *top, L.ReLU(max_value=0.5, negative_slope=0.1),
        L.Dense(4, use_bias=False), L.Activation("softmax")]
    if not functional:
        return keras.Sequential(layers)
    inputs = x = layers[0]
    for layer in layers[1:]:
        x = layer(x)
    return keras.Model(inputs, x)


@pytest.fixture(scope="module", params=["flatten", "global_pooling", "functional"])
def populations(request):
    model = (_zoo("flatten", functional=True) if request.param == "functional"
             else _zoo(request.param))
    require_stacked_kernels(model)
    metrics = {"accuracy": keras.metrics.sparse_categorical_accuracy}
    return [keras_es.Population(model, N, SPACE, LOSS, engine.SGD("lr", momentum="momentum"),
                                metrics=metrics, execution=e)
            for e in ("vectorized", "stacked")]


@pytest.mark.parametrize("per_particle", [False, True])
def test_stacked_steps_equal_vectorized_steps(populations, per_particle):
    rng = np.random.default_rng(1)
    shape = (N, 6) if per_particle else (6,)
    x = tf.constant(rng.normal(size=shape + (20, 20, 3)), tf.float32)
    y = tf.constant(rng.integers(0, 4, shape), tf.int32)
    keys = tf.stack([tf.range(N), tf.zeros([N], tf.int32)], axis=1)
    theta = tf.constant(rng.normal(0, 0.3, (N, 2)) + SPACE.encode(), tf.float32)
    results = []
    for population in populations:
        state, step = population.init(keys), tf.function(population.train_step)
        for _ in range(3):
            state, loss = step(state, theta, x, y)
        results.append((loss, state, population.evaluate(state, x, y)))
    (loss_v, state_v, eval_v), (loss_s, state_s, eval_s) = results
    assert not populations[0].stacked and populations[1].stacked
    np.testing.assert_allclose(loss_s, loss_v, rtol=1e-5)
    for a, b in zip(tf.nest.flatten(state_s), tf.nest.flatten(state_v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert set(eval_s) == {"loss", "accuracy"}
    for key in eval_v:
        np.testing.assert_allclose(eval_s[key], eval_v[key], rtol=1e-5)
    # particles differ (their own weights and hyperparameters), so nothing was shared
    assert len(set(np.round(loss_s.numpy(), 5))) == N


def test_stacked_hypergradient_equals_vectorized(populations):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(6, 20, 20, 3)), tf.float32)
    y = tf.constant(rng.integers(0, 4, 6), tf.int32)
    keys = tf.stack([tf.range(N), tf.zeros([N], tf.int32)], axis=1)
    theta = tf.constant(SPACE.encode(), tf.float32)
    grads = [p.hypergradient(p.init(keys), theta, x, y, x, y, particle=1) for p in populations]
    assert grads[0].numpy()[0] != 0  # d/d log lr (momentum acts from the second step)
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4)


def test_auto_execution_and_refusals():
    def population(model, execution="auto"):
        return keras_es.Population(model, 2, SPACE, LOSS, engine.SGD("lr"),
                                   execution=execution)

    kernels = stacked.missing_kernel(_zoo()) is None
    assert population(_zoo()).stacked == kernels and population(_zoo()).xla_friendly != kernels
    dense = keras.Sequential([keras.Input((5,)), L.Dense(3)])
    assert not population(dense).stacked  # no convolution: vectorized under XLA is faster
    assert population(dense, "stacked").stacked  # but it can run stacked
    mask = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3), L.Flatten(),
                             L.Dense(4), keras_es.layers.UnitMask(), L.Dense(3)])
    assert not population(mask).stacked and population(mask).xla_friendly
    with pytest.raises(ValueError, match="execution='stacked' is invalid.*UnitMask"):
        population(mask, "stacked")
    frozen = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3),
                               L.BatchNormalization(), L.Flatten(), L.Dense(3)])
    frozen.layers[1].trainable = False
    assert "frozen" in stacked.unsupported_reason(frozen)
    inputs = keras.Input((6, 6, 1))
    chain = keras.Model(inputs, L.Dense(2)(L.Flatten()(L.Conv2D(2, 3)(inputs))))
    assert population(chain).stacked == (stacked.missing_kernel(chain) is None)  # a chain
    branch = L.Conv2D(1, 3, padding="same")(inputs)
    residual = keras.Model(inputs, L.Flatten()(L.Add()([inputs, branch])))
    assert "chain" in stacked.unsupported_reason(residual)
    assert not population(residual).stacked
    regularized = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(
        2, 3, kernel_regularizer="l2"), L.Flatten()])
    assert "regularizer" in stacked.unsupported_reason(regularized)
    half = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3, dtype="mixed_float16")])
    assert "float16" in stacked.unsupported_reason(half)
    with pytest.raises(ValueError, match="execution='fast' is invalid"):
        population(dense, "fast")


def test_devices_without_grouped_convolution_gradients_fall_back(monkeypatch):
    """On a CPU where TensorFlow leaves oneDNN off (AMD, Apple, older Intel), grouped
    convolutions have no gradient kernel: "auto" runs vectorized with one warning
    naming the reason and the oneDNN tip, and an explicit "stacked" refuses at once.
    The probe is simulated here so the test means the same on every machine."""
    two_convs = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3, name="first"),
                                  L.Conv2D(2, 3, name="second"), L.Flatten(), L.Dense(3)])
    monkeypatch.setattr(stacked, "_PROBED", {})

    def no_grouped_gradients(input_gradient, *args):  # a device with filter gradients only
        return "Gradients for grouped convolutions are not supported on CPU" \
            if input_gradient else None

    monkeypatch.setattr(stacked, "_probe", no_grouped_gradients)
    monkeypatch.setattr(population_module, "_WARNED", set())
    reason = stacked.missing_kernel(two_convs)
    assert "layer second" in reason and "grouped" in reason

    def population(execution="auto"):
        return keras_es.Population(two_convs, 2, SPACE, LOSS, engine.SGD("lr"),
                                   execution=execution)

    with pytest.warns(RuntimeWarning, match="vectorized instead of stacked.*"
                      "TF_ENABLE_ONEDNN_OPTS=1"):
        assert not population().stacked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per population
        assert not population().stacked
    with pytest.raises(ValueError, match="execution='stacked' cannot run here.*grouped"
                       ".*TF_ENABLE_ONEDNN_OPTS=1"):
        population("stacked")
    # One convolution needs no input gradient: it runs stacked on such a device.
    one_conv = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3), L.Flatten(),
                                 L.Dense(3)])
    assert stacked.missing_kernel(one_conv) is None


def test_the_probe_matches_what_this_device_can_run():
    """The real probe, on this machine: a model whose stacked form it accepts trains a
    step; one it refuses raises TensorFlow's own error when forced past the probe."""
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3),
                              L.Conv2D(2, 3, dilation_rate=2), L.Flatten(), L.Dense(3)])
    population = keras_es.Population(model, 2, SPACE, LOSS, engine.SGD("lr"),
                                     execution="vectorized")
    population.stacked = True  # bypass the choice: run the stacked step regardless
    keys = tf.constant([[0, 0], [0, 0]], tf.int32)
    x = tf.ones([3, 8, 8, 1])
    y = tf.constant([0, 1, 2])

    def step():
        return population.train_step(population.init(keys), tf.constant(
            np.tile(SPACE.encode(), [2, 1]), tf.float32), x, y)

    if stacked.missing_kernel(model) is None:
        _, loss = step()
        assert np.all(np.isfinite(loss))
    else:
        with pytest.raises(tf.errors.OpError):
            step()
