"""Argument checks shared by keras_es's public constructors.

Each raises ``ValueError`` naming the argument, the value received and what was
expected, before any work starts.
"""

from __future__ import annotations

import math


def positive_int(name: str, value) -> None:
    """``value`` must be an ``int`` (not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected a positive integer.")


def positive_float(name: str, value) -> None:
    """``value`` must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name}={value!r} is invalid; expected a finite number > 0.")


def num_particles(value) -> None:
    """``value`` must be an even integer >= 2: particles come in antithetic pairs."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise ValueError(f"num_particles={value!r} is invalid; expected an even integer >= 2 "
                         "(particles come in antithetic pairs).")


def boolean(name: str, value) -> None:
    """``value`` must be a ``bool``: ``"False"`` or ``"no"`` would otherwise act as
    True."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; expected True or False.")


# Seeds key TensorFlow's stateless random ops as int32: larger ones would wrap.
MAX_SEED = 2**31 - 1


def seed(value, name: str = "seed", allow_none: bool = False) -> None:
    """``value`` must be an integer in ``[0, 2**31 - 1]`` (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer in "
                         f"[0, {MAX_SEED}]{' or None' if allow_none else ''}.")


# Below this, theta + sigma * eps rounds back to theta in float32 for |theta| ~ 1 (the
# spacing of float32 there is 1.2e-7): the estimate is rounding noise and theta never
# moves.
MIN_SIGMA = 1e-5


def sigma(value) -> None:
    """``value`` must be a finite number >= `MIN_SIGMA`."""
    positive_float("sigma", value)
    if value < MIN_SIGMA:
        raise ValueError(f"sigma={value!r} is invalid; expected sigma >= {MIN_SIGMA}: smaller "
                         "perturbations are lost to float32 rounding of theta.")


def optimizer(name: str, value, allow_none: bool = True) -> None:
    """``value`` must be a ``keras.optimizers.Optimizer`` instance (or None)."""
    import keras  # here, not at import: checks stays importable without Keras

    if value is None and allow_none:
        return
    if not isinstance(value, keras.optimizers.Optimizer):
        raise ValueError(f"{name}={value!r} is invalid; expected a keras.optimizers.Optimizer "
                         "instance such as keras.optimizers.Adam(0.01)"
                         f"{' or None' if allow_none else ''}.")
