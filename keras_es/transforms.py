"""Hyperparameter transforms: natural units <-> the unconstrained theta that ES perturbs.

ES perturbs theta with Gaussian noise, so every coordinate must live on the whole real
line (trap 7, docs/traps.md): a learning rate is perturbed in log space, a
momentum in logit space (or log of one minus), a layer-width fraction in logit space.
Users declare values in natural units; `SearchSpace` encodes them into one
vector and decodes any batch of vectors back, in NumPy or inside ``tf.function``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

# exp() of more than ~88 overflows float32; clipping the unconstrained value keeps a
# wildly perturbed particle finite instead of turning its hyperparameter into inf.
_MAX_LOG = 80.0


class Transform:
    """Maps a constrained hyperparameter to and from the real line."""

    name = "identity"

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low, self.high = low, high

    def check(self, name: str, value: float) -> None:
        """Raises ``ValueError`` if ``value`` is outside this transform's open domain."""
        if not math.isfinite(value):
            raise ValueError(f"Hyperparameter {name!r}: value={value!r} must be finite.")

    def encode(self, x):
        """Natural value -> unconstrained value (NumPy or TF)."""
        return x

    def decode(self, u):
        """Unconstrained value -> natural value (NumPy or TF)."""
        return u

    def get_config(self) -> dict:
        return {"name": self.name, "low": self.low, "high": self.high}


def _lib(x):
    return tf.math if isinstance(x, (tf.Tensor, tf.Variable)) else np


class Identity(Transform):
    """No transform: the value is already unconstrained."""


class Log(Transform):
    """``u = log(x)`` for positive values (learning rates, weight decay, epsilon)."""

    name = "log"

    def check(self, name, value):
        super().check(name, value)
        if value <= 0:
            raise ValueError(
                f"Hyperparameter {name!r}: value={value!r} is not valid for a log transform; "
                "expected a value > 0.")

    def encode(self, x):
        return _lib(x).log(x)

    def decode(self, u):
        m = _lib(u)
        return m.exp(_clip(u, -_MAX_LOG, _MAX_LOG))


class Logit(Transform):
    """``u = logit((x - low) / (high - low))`` for values in an open interval.

    Defaults to (0, 1): momentum, Adam's betas, dropout rates, width fractions.
    """

    name = "logit"

    def __init__(self, low: float = 0.0, high: float = 1.0):
        if not high > low:
            raise ValueError(f"Logit transform: high={high!r} must be greater than low={low!r}.")
        super().__init__(low, high)

    def check(self, name, value):
        super().check(name, value)
        if not self.low < value < self.high:
            raise ValueError(
                f"Hyperparameter {name!r}: value={value!r} is not valid for a logit transform; "
                f"expected {self.low} < value < {self.high}.")

    def encode(self, x):
        m = _lib(x)
        p = (x - self.low) / (self.high - self.low)
        return m.log(p) - m.log1p(-p)

    def decode(self, u):
        m = _lib(u)
        p = 1.0 / (1.0 + m.exp(-_clip(u, -_MAX_LOG, _MAX_LOG)))
        return self.low + (self.high - self.low) * p


class LogOneMinus(Transform):
    """``u = log(1 - x)`` for values below one (momentum near 1, Adam's beta2)."""

    name = "log_one_minus"

    def check(self, name, value):
        super().check(name, value)
        if value >= 1:
            raise ValueError(
                f"Hyperparameter {name!r}: value={value!r} is not valid for a log_one_minus "
                "transform; expected a value < 1.")

    def encode(self, x):
        return _lib(x).log1p(-x)

    def decode(self, u):
        return 1.0 - _lib(u).exp(_clip(u, -_MAX_LOG, _MAX_LOG))


class LogRange(Transform):
    """``u = logit(log(x / low) / log(high / low))``: a positive value kept in
    ``(low, high)`` on a log scale.

    The position of ``x`` in its range is computed as keras-tuner computes it for
    ``Float(sampling="log")`` (``keras_tuner.HyperParameter.value_to_prob``), so
    `keras_es.ESCallback`'s ``tune={"learning_rate": (low, high)}`` and
    `keras_es.ESOracle`'s ``hp.Float("learning_rate", low, high, sampling="log")``
    perturb the same theta (docs/traps.md, trap 7).

    Example:

    ```python
    from keras_es.transforms import LogRange

    rate = LogRange(1e-4, 1e-1)
    theta = rate.encode(1e-2)          # two thirds of the way in log space: logit(2/3)
    assert abs(rate.decode(theta) - 1e-2) < 1e-12
    ```
    """

    name = "log_range"

    def __init__(self, low: float, high: float):
        if not 0 < low < high:
            raise ValueError(f"LogRange: expected 0 < low < high, got low={low!r}, "
                             f"high={high!r}.")
        super().__init__(low, high)
        self._unit = Logit()
        self._span = math.log(high / low)

    def check(self, name, value):
        super().check(name, value)
        if not self.low < value < self.high:
            raise ValueError(f"Hyperparameter {name!r}: value={value!r} is outside its range; "
                             f"expected {self.low} < value < {self.high}.")

    def encode(self, x):
        if isinstance(x, (tf.Tensor, tf.Variable)):
            position = tf.math.log(x / self.low) / self._span
        elif np.ndim(x) == 0:
            # libm's log for one value, as keras-tuner computes it (NumPy's vectorized
            # log may differ in the last bit).
            position = math.log(x / self.low) / self._span
        else:
            position = np.log(np.asarray(x) / self.low) / self._span
        return self._unit.encode(position)

    def decode(self, u):
        position = self._unit.decode(u)
        ratio = self.high / self.low
        if isinstance(position, (tf.Tensor, tf.Variable)):
            value = self.low * tf.pow(tf.cast(ratio, position.dtype), position)
        elif np.ndim(position) == 0:
            value = self.low * math.pow(ratio, float(position))
        else:
            value = self.low * np.power(ratio, position)
        # low * ratio ** 1 may round a hair above high.
        return _clip(value, self.low, self.high)


def _clip(u, low, high):
    if isinstance(u, (tf.Tensor, tf.Variable)):
        return tf.clip_by_value(u, low, high)
    return np.clip(u, low, high)


TRANSFORMS = {t.name: t for t in (Identity, Log, Logit, LogOneMinus)}
# LogRange needs its range, so it is not built by name: pass LogRange(low, high).


def get(transform: str | Transform) -> Transform:
    """Returns a `Transform` from a name (``"log"``, ``"logit"``, ...) or instance."""
    if isinstance(transform, Transform):
        return transform
    if transform not in TRANSFORMS:
        raise ValueError(
            f"transform={transform!r} is not known; expected one of {sorted(TRANSFORMS)} "
            "or a keras_es.transforms.Transform instance.")
    return TRANSFORMS[transform]()


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One scalar hyperparameter declared in natural units.

    Args:
        name: Unique name, e.g. ``"learning_rate"``.
        value: Initial value in natural units.
        transform: ``"log"``, ``"logit"``, ``"log_one_minus"``, ``"identity"`` or a
            `Transform`.
    """

    name: str
    value: float
    transform: Transform | str = "identity"

    def __post_init__(self):
        object.__setattr__(self, "transform", get(self.transform))
        self.transform.check(self.name, float(self.value))


class SearchSpace:
    """An ordered set of hyperparameters and their map to one unconstrained vector.

    Example:

    ```python
    import keras_es

    space = keras_es.SearchSpace([
        keras_es.Hyperparameter("learning_rate", 0.1, "log"),
        keras_es.Hyperparameter("momentum", 0.9, "logit"),
    ])
    theta = space.encode()            # float32 [2]
    space.decode(theta)               # {"learning_rate": 0.1, "momentum": 0.9}
    ```
    """

    def __init__(self, hyperparameters: Sequence[Hyperparameter]):
        if isinstance(hyperparameters, (str, Hyperparameter)) or not all(
                isinstance(h, Hyperparameter) for h in hyperparameters):
            raise ValueError(f"hyperparameters={hyperparameters!r} is invalid; expected a list "
                             "of keras_es.Hyperparameter, e.g. SearchSpace([Hyperparameter("
                             "'learning_rate', 0.01, 'log')]).")
        hyperparameters = list(hyperparameters)
        if not hyperparameters:
            raise ValueError("hyperparameters=[] is empty; expected at least one Hyperparameter.")
        names = [h.name for h in hyperparameters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"hyperparameters has duplicate names {duplicates}; names must be unique.")
        self.hyperparameters = hyperparameters

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hyperparameters]

    @property
    def dim(self) -> int:
        return len(self.hyperparameters)

    def encode(self, values: Mapping[str, float] | None = None) -> np.ndarray:
        """Natural values (default: the declared ones) -> unconstrained float32 ``[dim]``."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ValueError(f"values has unknown names {unknown}; expected names in {self.names}.")
        out = []
        for h in self.hyperparameters:
            v = float(values.get(h.name, h.value))
            h.transform.check(h.name, v)
            out.append(h.transform.encode(np.float64(v)))
        return np.asarray(out, np.float32)

    def decode(self, theta) -> dict:
        """Unconstrained ``[..., dim]`` -> ``{name: natural value}``.

        NumPy input of shape ``[dim]`` gives plain Python floats; TF input gives tensors of
        shape ``[...]`` (usable inside ``tf.function`` for batches of particles).
        """
        if isinstance(theta, (tf.Tensor, tf.Variable)):
            return {h.name: h.transform.decode(theta[..., i])
                    for i, h in enumerate(self.hyperparameters)}
        theta = np.asarray(theta, np.float64)
        if theta.shape[-1] != self.dim:
            raise ValueError(f"theta has shape {theta.shape}; expected last dimension {self.dim}.")
        out = {h.name: h.transform.decode(theta[..., i])
               for i, h in enumerate(self.hyperparameters)}
        if theta.ndim == 1:
            out = {k: float(v) for k, v in out.items()}
        return out

    def get_config(self) -> dict:
        return {"hyperparameters": [
            {"name": h.name, "value": h.value, "transform": h.transform.get_config()}
            for h in self.hyperparameters]}
