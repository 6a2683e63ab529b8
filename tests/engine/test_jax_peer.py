"""The JAX peer of benchmarks/particles.py takes the engine's step: from the same
weights, SGD-momentum steps on the same batch give the same weights (float tolerance),
so the engine / JAX throughput ratios it reports compare equal work. jax is a
benchmark-only extra (``pip install keras_es[bench]``): without it these tests skip."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import tensorflow as tf

jax = pytest.importorskip("jax")

BENCHMARK = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "particles.py"


@pytest.fixture(scope="module")
def particles():
    spec = importlib.util.spec_from_file_location("particles_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:keras_es. running the particles vectorized")
@pytest.mark.parametrize("name", ["small_mlp", "cnn"])
def test_the_peer_takes_the_engines_steps(particles, name):
    n, steps = 2, 3
    x, y = particles.batch(name, seed=0)
    population, state, theta = particles.population(name, n, seed=0)
    start = [np.asarray(t) for t in state.trainable]
    params = [(jax.numpy.asarray(k), jax.numpy.asarray(b))
              for k, b in zip(start[::2], start[1::2], strict=True)]
    peer = particles.JaxPeer(jax, name, n, seed=0, window_steps=steps, params=params)

    step = tf.function(population.train_step, autograph=False)
    for _ in range(steps):
        state, loss = step(state, theta, x, y)
    peer_loss = np.asarray(peer.caller(peer.window, x.numpy(), y.numpy())())

    np.testing.assert_allclose(loss.numpy(), peer_loss, rtol=1e-4, atol=1e-5)
    peer_weights = [np.asarray(t) for pair in peer.state[0] for t in pair]
    for engine_weight, peer_weight in zip(state.trainable, peer_weights, strict=True):
        np.testing.assert_allclose(engine_weight.numpy(), peer_weight, rtol=1e-4, atol=1e-5)
    # the weights moved (momentum included): the comparison is not of the start
    assert not np.allclose(state.trainable[0].numpy(), start[0])


@pytest.mark.parametrize("name", ["small_mlp", "cnn"])
def test_peer_initializes_at_the_engines_scale(particles, name):
    """Glorot-uniform kernels with the fan in and out Keras uses, zero biases: the
    largest magnitude drawn per kernel is within 5% of the Keras model's own."""
    model = particles.build_model(name, seed=0)
    params = particles.jax_init(jax, name, 8, seed=0)
    kernels, biases = model.trainable_variables[::2], model.trainable_variables[1::2]
    for (kernel, bias), keras_kernel, keras_bias in zip(params, kernels, biases,
                                                        strict=True):
        assert kernel.shape[1:] == tuple(keras_kernel.shape)
        limit, keras_limit = (float(np.max(np.abs(np.asarray(k))))
                              for k in (kernel, keras_kernel))
        assert abs(limit - keras_limit) < 0.05 * keras_limit
        assert not np.any(np.asarray(bias)) and not np.any(np.asarray(keras_bias))
