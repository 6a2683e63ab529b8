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
