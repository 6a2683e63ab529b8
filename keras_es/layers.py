"""Keras layers whose hyperparameters the particle engine can set per particle.

Each holds its hyperparameter in a scalar non-trainable variable. A `Population`
built with ``layer_hyperparameters={variable path pattern: hyperparameter name}``
overwrites that variable, per particle, with the decoded value of theta before every
step, so each particle trains with its own dropout rate or layer width. Used in a plain
Keras model, the layers behave like their fixed-value counterparts.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_es")
class UnitMask(keras.layers.Layer):
    """Keeps the first ``floor(units)`` features of the last axis and zeroes the rest.

    Build the layer before it at its maximum width ``n_max`` and place the mask *before*
    the activation, so a particle with width w computes exactly what a layer of w units
    would. Declare the width as a hyperparameter with ``Logit(0, n_max)``: then
    ``units = n_max * sigmoid(theta)`` and ``floor(units)`` units are active (at least
    one).

    Example:

    ```python
    import keras
    import keras_es

    inputs = keras.Input((20,))
    x = keras.layers.Dense(128)(inputs)
    x = keras_es.layers.UnitMask(name="width_1")(x)   # variable "width_1/units"
    x = keras.layers.Activation("relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))

    space = keras_es.SearchSpace([
        keras_es.Hyperparameter("learning_rate", 0.01, "log"),
        keras_es.Hyperparameter("width_1", 64, keras_es.transforms.Logit(0, 128)),
    ])
    population = keras_es.Population(
        model, num_particles=4, space=space, loss="mse",
        optimizer=keras_es.engine.SGD("learning_rate"),
        layer_hyperparameters={"*width_1/units": "width_1"})  # a width per particle
    ```

    Args:
        units: Initial number of active units (default: all).
    """

    def __init__(self, units: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.initial_units = units

    def build(self, input_shape):
        self.max_units = int(input_shape[-1])
        initial = self.max_units if self.initial_units is None else float(self.initial_units)
        self.units = self.add_weight(name="units", shape=(), trainable=False,
                                     initializer=keras.initializers.Constant(initial))

    def call(self, inputs):
        active = tf.clip_by_value(tf.floor(tf.cast(self.units, tf.float32)), 1.0,
                                  float(self.max_units))
        mask = tf.cast(tf.range(self.max_units, dtype=tf.float32) < active, inputs.dtype)
        return inputs * mask

    def get_config(self):
        return {**super().get_config(), "units": self.initial_units}


@keras.saving.register_keras_serializable(package="keras_es")
class Dropout(keras.layers.Layer):
    """Dropout whose rate is a variable (``"<name>/rate"``), so it can differ per particle.

    Args:
        rate: Initial fraction of inputs to drop, in ``[0, 1)``.
        seed: Optional seed of the layer's seed generator.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate={rate!r} is invalid; expected 0 <= rate < 1.")
        self.initial_rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.rate = self.add_weight(name="rate", shape=(), trainable=False,
                                    initializer=keras.initializers.Constant(self.initial_rate))

    def call(self, inputs, training=False):
        if not training:
            return inputs
        rate = tf.clip_by_value(tf.cast(self.rate, inputs.dtype), 0.0, 0.999)
        seed = tf.cast(self.seed_generator.next(), tf.int32)
        return tf.nn.experimental.stateless_dropout(inputs, rate=rate, seed=seed)

    def get_config(self):
        return {**super().get_config(), "rate": self.initial_rate, "seed": self.seed}
