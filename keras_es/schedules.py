"""Per-particle learning-rate schedules whose parameters can be hyperparameters.

Keras schedules take Python floats fixed at construction; here every parameter may
instead name a hyperparameter of the search space, so each particle evaluates the
schedule with its own (perturbed) values, at its own step.

A parameter is a number (a constant) or a string (the name of a hyperparameter in the
population's `SearchSpace`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


class Schedule:
    """A learning rate as a function of each particle's step and hyperparameters."""

    def parameters(self) -> list[Value]:
        """The schedule's parameters (numbers or hyperparameter names)."""
        raise NotImplementedError

    def __call__(self, step: tf.Tensor, hyperparameters: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Learning rates ``[N]`` at float steps ``[N]`` (0 at an episode's first step)."""
        raise NotImplementedError

    def _r(self, value, hyperparameters, step):
        return resolve(value, hyperparameters, tf.shape(step)[0])


class Constant(Schedule):
    """``lr``."""

    def __init__(self, learning_rate: Value):
        self.learning_rate = learning_rate

    def parameters(self):
        return [self.learning_rate]

    def __call__(self, step, hyperparameters):
        return self._r(self.learning_rate, hyperparameters, step)


class InverseTimeDecay(Schedule):
    """``lr0 / (1 + t / decay_steps) ** power`` (the ES-Single MNIST schedule).

    Args:
        initial_learning_rate: ``lr0``.
        decay_steps: ``tau``.
        power: ``p`` (Keras's ``InverseTimeDecay`` is the case ``p = 1``).
    """

    def __init__(self, initial_learning_rate: Value, decay_steps: Value, power: Value = 1.0):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.power = power

    def parameters(self):
        return [self.initial_learning_rate, self.decay_steps, self.power]

    def __call__(self, step, hyperparameters):
        lr0 = self._r(self.initial_learning_rate, hyperparameters, step)
        tau = self._r(self.decay_steps, hyperparameters, step)
        power = self._r(self.power, hyperparameters, step)
        return lr0 / tf.pow(1.0 + step / tau, power)


class ExponentialDecay(Schedule):
    """``lr0 * decay_rate ** (t / decay_steps)`` (Keras's, without staircase)."""

    def __init__(self, initial_learning_rate: Value, decay_steps: Value, decay_rate: Value):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate

    def parameters(self):
        return [self.initial_learning_rate, self.decay_steps, self.decay_rate]

    def __call__(self, step, hyperparameters):
        lr0 = self._r(self.initial_learning_rate, hyperparameters, step)
        steps = self._r(self.decay_steps, hyperparameters, step)
        rate = self._r(self.decay_rate, hyperparameters, step)
        return lr0 * tf.pow(rate, step / steps)


class PiecewiseLinear(Schedule):
    """Linear interpolation between learnable knot values at fixed steps.

    Args:
        boundaries: Increasing steps ``b_0 < b_1 < ...`` (constants).
        values: One value per boundary (numbers or hyperparameter names); constant
            before the first and after the last boundary.
    """

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

    def __call__(self, step, hyperparameters):
        knots = tf.stack([self._r(v, hyperparameters, step) for v in self.values], axis=1)
        b = tf.constant(self.boundaries, tf.float32)
        if len(self.boundaries) == 1:
            return knots[:, 0]
        t = tf.clip_by_value(step, b[0], b[-1])
        index = tf.clip_by_value(
            tf.searchsorted(b, t[:, None], side="right")[:, 0] - 1, 0, len(self.boundaries) - 2)
        left, right = tf.gather(b, index), tf.gather(b, index + 1)
        weight = (t - left) / (right - left)
        lo = tf.gather(knots, index, batch_dims=1)
        hi = tf.gather(knots, index + 1, batch_dims=1)
        return lo + weight * (hi - lo)
