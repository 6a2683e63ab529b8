"""Vectorizable Conv2D / max pooling match Keras's, and a CNN population trains."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import require_stacked_kernels

import keras_es
from keras_es.engine import vectorize


@pytest.mark.parametrize("kernel, strides, padding, dilation", [
    ((3, 3), (1, 1), "valid", (1, 1)), ((3, 3), (2, 2), "same", (1, 1)),
    ((2, 3), (1, 2), "same", (1, 1)), ((3, 3), (1, 1), "valid", (2, 2)),
])
def test_im2col_matches_conv2d_and_its_gradients(kernel, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 9, 10, 3)), tf.float32)
    w = tf.constant(rng.normal(size=kernel + (3, 4)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        ours = vectorize.conv2d_im2col(x, w, strides, padding, dilation)
        # tf.nn.convolution, as Keras calls it: tf.nn.conv2d has no dilated gradient
        # on CPUs without oneDNN.
        theirs = tf.nn.convolution(x, w, strides, padding.upper(), dilations=dilation)
        a, b = tf.reduce_sum(tf.sin(ours)), tf.reduce_sum(tf.sin(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(tape.gradient(a, [x, w]), tape.gradient(b, [x, w]), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride, padding, dilation", [
    (1, "valid", 1), (2, "same", 1), (1, "same", 2), (1, "causal", 2), (3, "valid", 1)])
def test_conv1d_swap_matches_keras_conv1d_and_its_gradients(stride, padding, dilation):
    keras.utils.set_random_seed(0)
    layer = keras.layers.Conv1D(4, 3, strides=stride, padding=padding,
                                dilation_rate=dilation, activation="tanh")
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 11, 3)), tf.float32)
    layer(x)
    swapped = vectorize._conv1d_call(layer)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, theirs = swapped(x), layer(x)
        a, b = tf.reduce_sum(tf.sin(ours)), tf.reduce_sum(tf.sin(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    wrt = [x, layer.kernel, layer.bias]
    for ga, gb in zip(tape.gradient(a, wrt), tape.gradient(b, wrt), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


def test_conv1d_population_matches_keras_and_restores_layers():
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((12, 3)), keras.layers.Conv1D(4, 3, activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Conv1D(5, 2, padding="causal", dilation_rate=2),
            keras.layers.GlobalMaxPooling1D(), keras.layers.Dense(3)])

    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=(8, 12, 3)).astype("float32"), rng.integers(0, 3, 8))
               for _ in range(4)]
    template = _assert_population_matches_keras_sgd(model, batches, 0.05, jit_compile=False)
    assert "call" not in vars(template.layers[0]) and "call" not in vars(template.layers[1])


def test_max_pool1d_reshape_matches_max_pool1d():
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 11, 4)), tf.float32)
    got = vectorize.max_pool1d_reshape(x, 3)
    want = tf.reshape(tf.nn.max_pool1d(tf.reshape(x, [6, 11, 4]), 3, 3, "VALID"), [2, 3, 3, 4])
    np.testing.assert_array_equal(got, want)


def test_max_pool_reshape_matches_max_pool():
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 7, 9, 3)), tf.float32)
    np.testing.assert_array_equal(vectorize.max_pool_reshape(x, (2, 3)),
                                  tf.nn.max_pool2d(x, (2, 3), (2, 3), "VALID"))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _assert_population_matches_keras_sgd(model, batches, lr, jit_compile,
                                         execution="vectorized"):
    """Two identical particles follow ``train_on_batch`` with SGD(lr, momentum 0.9).

    Returns the population's template model."""
    reference = model()
    reference.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss=LOSS)
    for x, y in batches:
        reference.train_on_batch(x, y)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", lr, "log")])
    template = model()
    population = keras_es.Population(template, 2, space, LOSS,
                                     keras_es.engine.SGD("lr", momentum=0.9), initialize="copy",
                                     execution=execution)
    state = population.copy_state()
    step = tf.function(population.train_step, jit_compile=jit_compile)
    for x, y in batches:
        state, _ = step(state, tf.tile(space.encode()[None], [2, 1]), x, y)
    for ref, got in zip(reference.trainable_variables, state.trainable, strict=True):
        for particle in range(2):
            np.testing.assert_allclose(got.numpy()[particle], ref.numpy(), rtol=1e-4,
                                       atol=1e-5)
    return template


@pytest.mark.parametrize("execution, jit_compile", [("vectorized", True), ("stacked", False)])
def test_cnn_population_matches_keras_and_restores_layers(execution, jit_compile):
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(2), keras.layers.Conv2D(4, 2, padding="same"),
            keras.layers.Flatten(), keras.layers.Dense(3)])

    if execution == "stacked":
        require_stacked_kernels(model())
    rng = np.random.default_rng(2)
    batches = [(rng.normal(size=(8, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 8))
               for _ in range(5)]
    template = _assert_population_matches_keras_sgd(model, batches, 0.05, jit_compile,
                                                    execution)
    # The swap lasts only while the step is traced.
    assert "convolution_op" not in vars(template.layers[0])
    assert "call" not in vars(template.layers[1])


@pytest.mark.parametrize("recurrent", ["LSTM", "GRU"])
def test_embedding_and_recurrent_population_matches_keras(recurrent):
    """Checked with SGD: Keras's Adam applies the embedding's sparse (IndexedSlices)
    gradient differently from a dense one, which is what the engine computes."""
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((5,), dtype="int32"), keras.layers.Embedding(12, 4),
            getattr(keras.layers, recurrent)(6), keras.layers.Dense(3)])

    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 12, (8, 5)).astype("int32"), rng.integers(0, 3, 8))
               for _ in range(4)]
    _assert_population_matches_keras_sgd(model, batches, 0.1, jit_compile=False)
    # Fresh particles draw the recurrent kernels from their own initializers.
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.1, "log")])
    drawing = keras_es.Population(model(), 2, space, LOSS, keras_es.engine.SGD("lr"))
    fresh = drawing.init(tf.constant([[1, 2], [3, 4]], tf.int32))
    assert all(np.all(np.isfinite(v.numpy())) for v in fresh.trainable)
    assert not np.allclose(fresh.trainable[1][0], fresh.trainable[1][1])


def test_dilated_strided_cnn_population_matches_keras_on_any_cpu():
    """Dilated and strided convolutions train vectorized (im2col) with no kernel that
    only oneDNN has: the same numbers as Keras's own training."""
    def model():
        keras.utils.set_random_seed(1)
        return keras.Sequential([
            keras.Input((9, 9, 2)),
            keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", activation="relu"),
            keras.layers.Conv2D(4, (2, 3), strides=2, dilation_rate=1, activation="tanh"),
            keras.layers.Conv2D(2, 2, dilation_rate=(2, 1)),
            keras.layers.Flatten(), keras.layers.Dense(3)])

    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(6, 9, 9, 2)).astype("float32"), rng.integers(0, 3, 6))
               for _ in range(4)]
    _assert_population_matches_keras_sgd(model, batches, 0.05, jit_compile=False)


@pytest.mark.slow
def test_the_engine_pages_execution_example_runs_as_written():
    """docs/engine.md's convolutional example, verbatim, on whatever CPU this is."""
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    section = page.split("## Execution", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(code, "docs/engine.md", "exec"), namespace)  # noqa: S102
    assert namespace["loss"].shape == (32,)
    assert np.all(np.isfinite(namespace["loss"]))
