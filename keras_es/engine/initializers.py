"""Per-particle re-initialization of Keras weights from stateless seeds.

An episode restart re-initializes a particle's weights inside the compiled step, with a
key that both twins of a pair share. Keras initializers draw from an integer seed or a
``SeedGenerator`` and accept no tensor seed, so they cannot be called per particle
inside a graph. This module reads each weight's Keras initializer (its class and
config) and samples the same distribution with TensorFlow's stateless ops; deterministic
ones (zeros, ones, constants) are computed, not read from the model, whose weights may
have trained since. Weights whose initializer it cannot find or does not know (an LSTM's
forget-gate bias, custom initializers) are copied from the model's current value.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

# Weight name -> layer attribute holding its initializer, where it is not
# "<name>_initializer".
_ATTRIBUTE = {"recurrent_kernel": "recurrent_initializer"}


def find_initializer(layer, variable):
    """The Keras initializer ``layer`` used for ``variable``, or ``None``."""
    name = variable.name.split("/")[-1]
    if name == "bias" and getattr(layer, "unit_forget_bias", False):
        return None  # LSTM's forget-gate ones: deterministic, copied
    initializer = getattr(layer, _ATTRIBUTE.get(name, f"{name}_initializer"), None)
    return initializer if isinstance(initializer, keras.initializers.Initializer) else None


def _fans(shape):
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def sample(initializer, shape, seed, fallback):
    """A stateless draw from ``initializer``'s distribution.

    Args:
        initializer: A Keras initializer (or ``None``).
        shape: The weight's shape.
        seed: int32 ``[2]`` stateless seed.
        fallback: Tensor returned when the initializer is unknown or deterministic.
    """
    shape = list(shape)
    dtype = fallback.dtype
    init = keras.initializers
    if isinstance(initializer, init.Zeros):
        return tf.zeros(shape, dtype)
    if isinstance(initializer, init.Ones):
        return tf.ones(shape, dtype)
    if isinstance(initializer, init.Constant):
        return tf.fill(shape, tf.cast(initializer.value, dtype))
    if isinstance(initializer, init.VarianceScaling):
        fan_in, fan_out = _fans(shape)
        scale = initializer.scale / max(1.0, {"fan_in": fan_in, "fan_out": fan_out,
                                              "fan_avg": (fan_in + fan_out) / 2.0}
                                        [initializer.mode])
        if initializer.distribution == "truncated_normal":
            stddev = math.sqrt(scale) / 0.87962566103423978
            return tf.random.stateless_truncated_normal(shape, seed, stddev=stddev, dtype=dtype)
        if initializer.distribution == "untruncated_normal":
            return tf.random.stateless_normal(shape, seed, stddev=math.sqrt(scale), dtype=dtype)
        limit = math.sqrt(3.0 * scale)
        return tf.random.stateless_uniform(shape, seed, -limit, limit, dtype=dtype)
    if isinstance(initializer, init.RandomNormal):
        return tf.random.stateless_normal(shape, seed, initializer.mean, initializer.stddev,
                                          dtype=dtype)
    if isinstance(initializer, init.TruncatedNormal):
        return tf.random.stateless_truncated_normal(shape, seed, initializer.mean,
                                                    initializer.stddev, dtype=dtype)
    if isinstance(initializer, init.RandomUniform):
        return tf.random.stateless_uniform(shape, seed, initializer.minval, initializer.maxval,
                                           dtype=dtype)
    if isinstance(initializer, init.Orthogonal) and len(shape) >= 2:
        rows = int(np.prod(shape[:-1]))
        cols = shape[-1]
        flat = tf.random.stateless_normal([max(rows, cols), min(rows, cols)], seed, dtype=dtype)
        q, r = tf.linalg.qr(flat)
        q *= tf.sign(tf.linalg.diag_part(r))
        if rows < cols:
            q = tf.transpose(q)
        return initializer.gain * tf.reshape(q, shape)
    return fallback
