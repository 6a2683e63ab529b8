"""Per-particle learning-rate schedules whose parameters can be hyperparameters.

Keras schedules take Python floats fixed at construction; here every parameter may
instead name a hyperparameter of the search space, so each particle evaluates the
schedule with its own (perturbed) values, at its own step.

A parameter is a number (a constant) or a string (the name of a hyperparameter in the
population's `SearchSpace`). A schedule whose parameters are all numbers is also a
plain Keras ``LearningRateSchedule``: a Keras optimizer takes it, and
``keras.optimizers.schedules.serialize`` / ``deserialize`` round-trip it (the classes
are registered as ``keras_es>InverseTimeDecay`` and so on), which is how
`keras_es.ESCallback.tuned_schedule` hands back a tuned schedule.

Example:

```python
import keras
import keras_es

schedule = keras_es.schedules.InverseTimeDecay(0.1, decay_steps=1000.0, power=0.5)
optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
config = keras.optimizers.schedules.serialize(schedule)
assert keras.optimizers.schedules.deserialize(config).get_config() == schedule.get_config()
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

Value = float | int | str


def resolve(value: Value, hyperparameters: Mapping[str, tf.Tensor], num_particles) -> tf.Tensor:
    """A float32 ``[num_particles]`` tensor for a constant or a hyperparameter name."""
    if isinstance(value, str):
        return tf.cast(hyperparameters[value], tf.float32)
    return tf.fill([num_particles], tf.cast(value, tf.float32))


def names(value) -> list[str]:
    """Hyperparameter names a value or schedule refers to."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Schedule):
        return [n for v in value.parameters() for n in names(v)]
    return []


def substitute(schedule: Schedule, values: Mapping[str, float]) -> Schedule:
    """``schedule`` with every hyperparameter name replaced by its value in ``values``:
    a schedule of plain numbers, usable as a Keras ``LearningRateSchedule``."""

    def number(value):
        if isinstance(value, str):
            return float(values[value])
        if isinstance(value, (list, tuple)):
            return [number(v) for v in value]
        return value

    config = schedule.get_config()
    return type(schedule).from_config({k: (v if k == "boundaries" else number(v))
                                       for k, v in config.items()})


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate as a function of each particle's step and hyperparameters.

    Called with one step and no hyperparameters (as a Keras optimizer calls its
    schedule), a schedule of numbers gives the scalar learning rate at that step.
    """

    def parameters(self) -> list[Value]:
        """The schedule's parameters (numbers or hyperparameter names)."""
        raise NotImplementedError

    def rates(self, step: tf.Tensor, hyperparameters: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Learning rates ``[N]`` at float steps ``[N]`` (0 at an episode's first step)."""
        raise NotImplementedError

    def __call__(self, step, hyperparameters: Mapping[str, tf.Tensor] | None = None):
        if hyperparameters is not None:
            return self.rates(step, hyperparameters)
        named = names(self)
        if named:
            raise ValueError(f"This schedule refers to hyperparameters {named}; a Keras "
                             "optimizer can only follow a schedule of numbers (see "
                             "keras_es.schedules.substitute).")
        step = tf.reshape(tf.cast(step, tf.float32), [1])
        return self.rates(step, {})[0]

    #: The constructor's arguments, in order (what `get_config` returns).
    arguments: tuple[str, ...] = ()

    def get_config(self) -> dict:
        return {name: getattr(self, name) for name in self.arguments}

    def _r(self, value, hyperparameters, step):
        return resolve(value, hyperparameters, tf.shape(step)[0])


@keras.saving.register_keras_serializable(package="keras_es")
class Constant(Schedule):
    """``lr``."""

    arguments = ("learning_rate",)

    def __init__(self, learning_rate: Value):
        self.learning_rate = learning_rate

    def parameters(self):
        return [self.learning_rate]

    def rates(self, step, hyperparameters):
        return self._r(self.learning_rate, hyperparameters, step)


@keras.saving.register_keras_serializable(package="keras_es")
class InverseTimeDecay(Schedule):
    """``lr0 / (1 + t / decay_steps) ** power`` (the ES-Single MNIST schedule).

    Args:
        initial_learning_rate: ``lr0``.
        decay_steps: ``tau``.
        power: ``p`` (Keras's ``InverseTimeDecay`` is the case ``p = 1``).
    """

    arguments = ("initial_learning_rate", "decay_steps", "power")

    def __init__(self, initial_learning_rate: Value, decay_steps: Value, power: Value = 1.0):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.power = power

    def parameters(self):
        return [self.initial_learning_rate, self.decay_steps, self.power]

    def rates(self, step, hyperparameters):
        lr0 = self._r(self.initial_learning_rate, hyperparameters, step)
        tau = self._r(self.decay_steps, hyperparameters, step)
        power = self._r(self.power, hyperparameters, step)
        return lr0 / tf.pow(1.0 + step / tau, power)


@keras.saving.register_keras_serializable(package="keras_es")
class ExponentialDecay(Schedule):
    """``lr0 * decay_rate ** (t / decay_steps)``, as Keras's ``ExponentialDecay``
    (with ``staircase=True`` the exponent is rounded down to an integer)."""

    arguments = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase")

    def __init__(self, initial_learning_rate: Value, decay_steps: Value, decay_rate: Value,
                 staircase: bool = False):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = bool(staircase)

    def parameters(self):
        return [self.initial_learning_rate, self.decay_steps, self.decay_rate]

    def rates(self, step, hyperparameters):
        lr0 = self._r(self.initial_learning_rate, hyperparameters, step)
        steps = self._r(self.decay_steps, hyperparameters, step)
        rate = self._r(self.decay_rate, hyperparameters, step)
        exponent = step / steps
        return lr0 * tf.pow(rate, tf.floor(exponent) if self.staircase else exponent)


@keras.saving.register_keras_serializable(package="keras_es")
class PiecewiseLinear(Schedule):
    """Linear interpolation between learnable knot values at fixed steps.

    Args:
        boundaries: Increasing steps ``b_0 < b_1 < ...`` (constants).
        values: One value per boundary (numbers or hyperparameter names); constant
            before the first and after the last boundary.
    """

    arguments = ("boundaries", "values")

    def __init__(self, boundaries: Sequence[float], values: Sequence[Value]):
        boundaries = [float(b) for b in boundaries]
        if len(boundaries) != len(values) or not boundaries:
            raise ValueError(f"boundaries={boundaries} and values={list(values)} must be "
                             "non-empty and of equal length.")
        if any(b >= c for b, c in zip(boundaries, boundaries[1:], strict=False)):
            raise ValueError(f"boundaries={boundaries} must be strictly increasing.")
        self.boundaries, self.values = boundaries, list(values)

    def parameters(self):
        return list(self.values)

    def rates(self, step, hyperparameters):
        knots = tf.stack([self._r(v, hyperparameters, step) for v in self.values], axis=1)
        b = tf.constant(self.boundaries, tf.float32)
        if len(self.boundaries) == 1:
            return knots[:, 0]
        t = tf.clip_by_value(step, b[0], b[-1])
        index = tf.clip_by_value(tf.searchsorted(b, t, side="right") - 1, 0,
                                 len(self.boundaries) - 2)
        left, right = tf.gather(b, index), tf.gather(b, index + 1)
        weight = (t - left) / (right - left)
        lo = tf.gather(knots, index, batch_dims=1)
        hi = tf.gather(knots, index + 1, batch_dims=1)
        return lo + weight * (hi - lo)
