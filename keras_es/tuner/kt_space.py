"""A keras-tuner search space as keras_es transforms: how `keras_es.ESOracle` maps
``HyperParameters`` to the unconstrained theta that ES perturbs, and back.

Every numeric hyperparameter is one coordinate, the logit of its position in its range:

* ``Float`` (no ``step``), linear: `keras_es.transforms.Logit` ``(min_value, max_value)``;
* ``Float`` (no ``step``), log: `keras_es.transforms.LogRange` ``(min_value, max_value)``,
  the transform `keras_es.ESCallback` uses for ``tune={name: (low, high)}`` of a rate:
  the same value is the same theta in both front ends;
* ``Int``, ``reverse_log`` and a ``Float`` with a ``step``: the logit of keras-tuner's own
  continuous relaxation (``HyperParameter.value_to_prob`` / ``prob_to_value``, the one its
  Bayesian optimization uses): an ``Int`` range is cut into equal buckets, one per
  allowed value, and a ``step`` rounds.

A ``Choice`` or ``Boolean`` is a categorical distribution: one logit per value, drawn
with Gumbel noise (a draw from the softmax of the logits), decoded without noise to the
most likely value. ``Fixed`` is not part of theta.
"""

from __future__ import annotations

import math

import keras_tuner
import numpy as np

from keras_es.transforms import Logit, LogRange, Transform

_HP = keras_tuner.engine.hyperparameters
#: Searched as a categorical distribution (one logit per value).
CATEGORICAL = (_HP.Choice, _HP.Boolean)
# Initial values at a range's edge (keras-tuner's default Float is its minimum) would
# sit at theta = -inf; they start this far inside instead.
EDGE = 0.05
_UNIT = Logit()
_START_BOUNDS = (float(_UNIT.encode(np.float64(EDGE))),
                 float(_UNIT.encode(np.float64(1.0 - EDGE))))
_MIDDLE = float(_UNIT.encode(np.float64(0.5)))


def transform(hp) -> Transform | None:
    """The keras_es transform of a numeric keras-tuner hyperparameter, or None where
    keras-tuner's own relaxation is used (``Int``, ``reverse_log``, ``step``, a range of
    one value) or for a ``Choice``/``Boolean``/``Fixed``.

    Example:

    ```python
    import keras_tuner as kt
    from keras_es.tuner import kt_space
    from keras_es.transforms import LogRange

    hp = kt.HyperParameters()
    hp.Float("lr", 1e-4, 1e-1, sampling="log", default=1e-2)
    assert isinstance(kt_space.transform(hp.space[0]), LogRange)
    ```
    """
    if not isinstance(hp, _HP.Float) or hp.step is not None or \
            not hp.max_value > hp.min_value:
        return None
    if hp.sampling == "linear":
        return Logit(hp.min_value, hp.max_value)
    if hp.sampling == "log":
        return LogRange(hp.min_value, hp.max_value)
    return None


def choices(hp) -> list:
    """The values of a ``Choice`` or ``Boolean``, in declaration order."""
    return [False, True] if isinstance(hp, _HP.Boolean) else list(hp.values)


def width(hp) -> int:
    """theta coordinates of ``hp``: one logit per value of a Choice or Boolean, else
    one."""
    return len(choices(hp)) if isinstance(hp, CATEGORICAL) else 1


def plain(value):
    """numpy scalars -> Python bool/int/float/str (keras-tuner's gRPC needs plain values)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def initial_logits(hp, value=None) -> list[float]:
    """Starting logits of a Choice or Boolean: the default value gets probability 0.6
    of two, or 1/2 of more, and the others share the rest. So the mean decodes to the
    default, and every value is drawn from the first round on (a bucket of
    keras-tuner's [0, 1] relaxation would start several sigmas from the next value
    and almost never cross it). ``value``: the likely value instead of the default."""
    values = choices(hp)
    value = hp.default if value is None else value
    default = values.index(value) if value in values else 0
    first = 0.6 if len(values) == 2 else 0.5
    rest = (1.0 - first) / max(len(values) - 1, 1)
    return [math.log(first if k == default else rest) for k in range(len(values))]


class KerasTunerSpace:
    """theta <-> values for an ordered list of tunable keras-tuner hyperparameters.

    Args:
        hyperparameters: The ``keras_tuner.HyperParameter`` objects theta covers (no
            ``Fixed``), in order.

    Example:

    ```python
    import keras_tuner as kt
    from keras_es.tuner.kt_space import KerasTunerSpace

    hp = kt.HyperParameters()
    hp.Float("lr", 1e-4, 1e-1, sampling="log", default=1e-2)
    hp.Choice("activation", ["relu", "tanh"], default="tanh")
    space = KerasTunerSpace(hp.space)
    theta, moved = space.start()                    # [1 + 2] coordinates, at the defaults
    values = space.decode(theta)
    assert values["activation"] == "tanh" and abs(values["lr"] - 1e-2) < 1e-8
    ```
    """

    def __init__(self, hyperparameters):
        self.hyperparameters = list(hyperparameters)
        self.transforms = [transform(hp) for hp in self.hyperparameters]

    @property
    def names(self) -> list[str]:
        return [hp.name for hp in self.hyperparameters]

    @property
    def dim(self) -> int:
        return sum(width(hp) for hp in self.hyperparameters)

    def encode(self, values: dict | None = None) -> np.ndarray:
        """Values (default: the declared defaults) -> float32 theta ``[dim]``: each
        numeric value through its transform, each Choice/Boolean value as the likely one
        of its logits. (`start` is where a search starts: defaults kept off the edges.)"""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ValueError(f"values has unknown names {unknown}; expected names in "
                             f"{self.names}.")
        theta = []
        for hp, t in zip(self.hyperparameters, self.transforms, strict=True):
            value = values.get(hp.name, hp.default)
            if isinstance(hp, CATEGORICAL):
                theta.extend(initial_logits(hp, value))
            else:
                theta.append(self._encode(hp, t, value))
        return np.asarray(theta, np.float32)

    @staticmethod
    def _encode(hp, t, value) -> float:
        """One numeric hyperparameter's value -> its theta coordinate."""
        if t is not None:
            return float(t.encode(np.float64(value)))
        return float(_UNIT.encode(np.float64(float(hp.value_to_prob(value)))))

    def start(self) -> tuple[list[float], list[str]]:
        """theta at the defaults (float32 values) and the ranges moved to mid-range.

        A range whose default is its minimum (keras-tuner's default when none is given,
        and it keeps no record of whether one was) starts mid-range, and every start is
        kept inside ``[EDGE, 1 - EDGE]`` of its range (an edge is at theta = +-inf).
        """
        theta, moved = [], []
        for hp, t in zip(self.hyperparameters, self.transforms, strict=True):
            if isinstance(hp, CATEGORICAL):
                theta.extend(initial_logits(hp))
                continue
            if hp.default == hp.min_value and hp.max_value > hp.min_value:
                value = _MIDDLE
                moved.append(f"{hp.name}={format_value(self._numeric(hp, t, _MIDDLE))}")
            else:
                value = self._encode(hp, t, hp.default)
            theta.append(min(max(value, _START_BOUNDS[0]), _START_BOUNDS[1]))
        return [float(v) for v in np.asarray(theta, np.float32)], moved

    @staticmethod
    def _numeric(hp, t, u):
        if t is not None:
            return plain(t.decode(np.float64(u)))
        prob = float(np.clip(_UNIT.decode(np.float64(u)), 0.0, 1.0 - 1e-9))
        return plain(hp.prob_to_value(prob))

    def decode(self, theta, gumbel=None) -> dict:
        """theta ``[dim]`` -> ``{name: plain value}`` of every hyperparameter it covers.

        A Choice or Boolean takes the value whose logit (plus ``gumbel``, when given) is
        largest: with Gumbel noise that is a draw from the softmax of its logits; without,
        the most likely value.
        """
        theta = np.asarray(theta, np.float64)
        decoded, start = {}, 0
        for hp, t in zip(self.hyperparameters, self.transforms, strict=True):
            size = width(hp)
            coordinates = theta[start:start + size]
            if isinstance(hp, CATEGORICAL):
                if gumbel is not None:
                    coordinates = coordinates + gumbel[start:start + size]
                decoded[hp.name] = plain(choices(hp)[int(np.argmax(coordinates))])
            else:
                decoded[hp.name] = self._numeric(hp, t, coordinates[0])
            start += size
        return decoded


def active_values(hyperparameters, decoded: dict) -> dict:
    """The values of the hyperparameters of ``hyperparameters`` (a
    ``keras_tuner.HyperParameters``) active for ``decoded``, in space order: decoded
    values where given, defaults elsewhere (conditional children are sent only when their
    parents' values make them active)."""
    hps = keras_tuner.HyperParameters()
    values = {}
    for hp in hyperparameters.space:
        hps.merge([hp])
        if hps.is_active(hp):
            value = decoded.get(hp.name, plain(hp.default))
            hps.values[hp.name] = value
            values[hp.name] = value
    return values


def complete(hyperparameters, values: dict) -> dict:
    """``values`` plus the default of every hyperparameter that appeared in the space
    after they were planned (e.g. ``units_1`` once a model with two layers was built) and
    is active for them: such entries are not tuned, and a trial must not be left to fill
    them in by itself."""
    values = dict(values)
    hps = keras_tuner.HyperParameters()
    for hp in hyperparameters.space:
        hps.merge([hp])
        hps.values[hp.name] = values.get(hp.name, plain(hp.default))
        if hp.name not in values and hps.is_active(hp):
            values[hp.name] = plain(hp.default)
    return values


def format_value(value) -> str:
    """A hyperparameter value as the search's messages and summaries print it."""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)
