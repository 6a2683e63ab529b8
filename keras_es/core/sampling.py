"""Samplers: how an antithetic pair's perturbation is drawn and what it is credited with.

A sampler turns standard normal draws into a perturbation ``eps`` and its *score*, the
vector the pair's loss differences are multiplied by in the estimate. Isotropic
sampling credits ``eps`` itself; Guided ES (Maheswaranathan et al., 2019) samples from
a covariance concentrated on a subspace of surrogate gradients and credits either
``beta eps`` or ``Sigma^-1 eps`` (see `GuidedConfig`).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from keras_es import guided as guided_lib

_WEIGHTINGS = ("inverse_covariance", "covariance")


@dataclasses.dataclass(frozen=True)
class GuidedConfig:
    """Guided ES sampling (Maheswaranathan et al., 2019).

    Args:
        k: Number of surrogate gradients kept in the FIFO.
        alpha: Share of the variance spent isotropically, in ``(0, 1]``.
        beta: Scale of the estimate with ``weighting="covariance"``.
        weighting: ``"covariance"`` (default) credits ``beta * eps`` as in the Guided ES
            paper: ``E[g] = beta Sigma grad``, a descent direction concentrated on the
            surrogate subspace, not the gradient itself. ``"inverse_covariance"``
            credits ``Sigma^-1 eps``, which keeps every estimator, guided PES and guided
            ES-Single included, unbiased for the gradient, at a price: one pair's total
            variance is ``(g^T Sigma g) tr(Sigma^-1) + ||g||^2``, far above vanilla ES's
            ``(P + 1) ||g||^2`` when ``Sigma`` is anisotropic (``tr(Sigma^-1)`` grows
            like ``P^2 / alpha``).
    """

    k: int = 1
    alpha: float = 0.5
    beta: float = 2.0
    weighting: str = "covariance"

    def __post_init__(self):
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"guided k={self.k!r} is invalid; expected an integer >= 1.")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"guided alpha={self.alpha!r} is invalid; expected 0 < alpha <= 1.")
        if not self.beta > 0:
            raise ValueError(f"guided beta={self.beta!r} is invalid; expected beta > 0.")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(
                f"guided weighting={self.weighting!r} is invalid; expected one of {_WEIGHTINGS}.")


class Isotropic:
    """``eps ~ N(0, sigma^2 I)``, credited with ``eps``. Its state is empty."""

    def init(self, dim: int):
        return ()

    def context(self, state):
        """What every draw of one window shares (nothing here)."""
        return ()

    def width(self, dim: int) -> int:
        """Standard normals drawn per pair."""
        return dim

    def draw(self, context, z: tf.Tensor, sigma: float, dim: int):
        """``(eps, score)`` from standard normals ``z`` ``[pairs, width]``."""
        eps = sigma * z
        return eps, eps


class Guided:
    """Guided ES: ``eps ~ N(0, sigma^2 Sigma)`` with ``Sigma`` built from a FIFO of
    surrogate gradients (the state: a `keras_es.guided.GuidedState`)."""

    def __init__(self, config: GuidedConfig):
        self.config = config

    def init(self, dim: int):
        if self.config.k > dim:
            raise ValueError(
                f"guided k={self.config.k} exceeds the number of hyperparameters dim={dim}; "
                "expected k <= dim.")
        return guided_lib.init(self.config.k, dim)

    def context(self, state):
        """The subspace and covariance scales, computed once per window."""
        return guided_lib.subspace(state, self.config.alpha)

    def width(self, dim: int) -> int:
        return dim + self.config.k

    def draw(self, context, z: tf.Tensor, sigma: float, dim: int):
        eps = guided_lib.sample(context, z[:, :dim], z[:, dim:], sigma)
        if self.config.weighting == "covariance":
            return eps, self.config.beta * eps
        return eps, guided_lib.inverse_covariance(context, eps)

    @staticmethod
    def push(state, surrogate: tf.Tensor):
        """Adds a surrogate gradient to the FIFO."""
        return guided_lib.push(state, surrogate)


def sampler(guided: GuidedConfig | None) -> Isotropic | Guided:
    """The sampler of an estimator built with ``guided``."""
    return Isotropic() if guided is None else Guided(guided)
