"""Hyperparameter transforms and counter-based noise."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es import noise, transforms


@pytest.mark.parametrize("transform, value", [
    ("log", 3e-4), ("logit", 0.9), ("log_one_minus", 0.999), ("identity", -2.5),
    (transforms.Logit(10, 100), 37.0),
])
def test_round_trip_numpy_and_tf(transform, value):
    space = keras_es.SearchSpace([keras_es.Hyperparameter("h", value, transform)])
    theta = space.encode()
    assert np.isfinite(theta).all()
    assert space.decode(theta)["h"] == pytest.approx(value, rel=1e-5)
    batch = tf.constant(np.stack([theta, theta]))
    np.testing.assert_allclose(space.decode(batch)["h"].numpy(), [value, value], rtol=1e-5)


def test_extreme_unconstrained_values_decode_finite():
    for name in ("log", "logit", "log_one_minus"):
        t = transforms.get(name)
        for u in (-1e6, 1e6):
            assert np.isfinite(t.decode(np.float64(u)))
            assert np.isfinite(t.decode(tf.constant(u)).numpy())


@pytest.mark.parametrize("transform, value, match", [
    ("log", 0.0, "expected a value > 0"),
    ("logit", 1.0, "expected 0.0 < value < 1.0"),
    ("log_one_minus", 1.5, "expected a value < 1"),
    ("identity", float("inf"), "must be finite"),
])
def test_invalid_values_raise(transform, value, match):
    with pytest.raises(ValueError, match=match):
        keras_es.Hyperparameter("h", value, transform)


def test_search_space_errors():
    with pytest.raises(ValueError, match="empty"):
        keras_es.SearchSpace([])
    h = keras_es.Hyperparameter("lr", 0.1, "log")
    with pytest.raises(ValueError, match="duplicate"):
        keras_es.SearchSpace([h, h])
    with pytest.raises(ValueError, match="transform='cube'"):
        keras_es.Hyperparameter("x", 1.0, "cube")
    with pytest.raises(ValueError, match="unknown names"):
        keras_es.SearchSpace([h]).encode({"momentum": 0.9})


def test_noise_rows_regenerate_from_integers_alone():
    """A pair's noise depends only on (seed, stream, pair, counter), not on the batch."""
    seeds = noise.pair_seeds(42, noise.STREAM_PERTURBATION, tf.range(100),
                             tf.range(100) % 7)
    full = noise.normal_rows(seeds, 6).numpy()
    shard = noise.pair_seeds(42, noise.STREAM_PERTURBATION, tf.constant([17, 63]),
                             tf.constant([17 % 7, 63 % 7]))
    np.testing.assert_array_equal(noise.normal_rows(shard, 6).numpy(), full[[17, 63]])
    other_stream = noise.pair_seeds(42, noise.STREAM_STEP, tf.range(100), tf.range(100) % 7)
    assert not np.allclose(noise.normal_rows(other_stream, 6).numpy(), full)
    # Standard normal.
    big = noise.normal_rows(noise.pair_seeds(0, 1, tf.range(20000), 0), 5).numpy()
    assert abs(big.mean()) < 4 / np.sqrt(big.size)
    assert abs(big.var() - 1) < 4 * np.sqrt(2 / big.size)
