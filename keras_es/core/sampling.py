"""Samplers: how an antithetic pair's perturbation is drawn and what it is credited with.

A sampler turns standard normal draws into a perturbation ``eps`` and its *score*, the
vector the pair's loss differences are multiplied by in the estimate. Isotropic
sampling credits ``eps`` itself; Guided ES (Maheswaranathan et al., 2019) samples from
a covariance concentrated on a subspace of surrogate gradients and credits either
``beta eps`` or ``Sigma^-1 eps`` (see `GuidedConfig`); a learned sigma (`LearnedSigma`,
variational optimization) also credits each draw's ``z^2 - 1`` to ``log sigma``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import tensorflow as tf

from keras_es import checks
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

    def score_width(self, dim: int) -> int:
        """Columns of a pair's score and accumulator."""
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

    def score_width(self, dim: int) -> int:
        return dim

    def draw(self, context, z: tf.Tensor, sigma: float, dim: int):
        eps = guided_lib.sample(context, z[:, :dim], z[:, dim:], sigma)
        if self.config.weighting == "covariance":
            return eps, self.config.beta * eps
        return eps, guided_lib.inverse_covariance(context, eps)

    @staticmethod
    def push(state, surrogate: tf.Tensor):
        """Adds a surrogate gradient to the FIFO."""
        return guided_lib.push(state, surrogate)


# ---------------------------------------------------------------------- learned sigma
@dataclasses.dataclass(frozen=True)
class LearnedSigma:
    """Learns sigma from the perturbations' own losses (variational optimization).

    ES descends the Gaussian-smoothed loss ``J(theta, sigma) = E_z L(theta + sigma z)``
    in theta. The same samples estimate its gradient with respect to ``log sigma``:
    ``dJ / d log sigma_i = E[L(theta + sigma z) (z_i^2 - 1)]`` (the score of the
    Gaussian), and both twins of a pair share ``z_i^2 - 1``, so a pair contributes
    ``((L_+ + L_-) / 2 - b) (z_i^2 - 1)``. The baseline ``b`` is the mean per-step loss
    of the window's *other* valid pairs, independent of the pair's noise, so the estimate
    stays unbiased. With PES the scores ``z^2 - 1`` accumulate over the episode as
    ``xi`` does (each window's noise is independent), with ES-Single they are drawn once
    per episode. A pair's noise is drawn with the sigma current at its draw, and its
    credit uses that draw's ``z``; a new sigma reaches a pair at its next draw.

    After every credited window, ``log sigma`` takes one Adam step (the default outer
    optimizer's rule; bias-corrected, ``beta_1 = 0.9``, ``beta_2 = 0.999``) of size
    ``learning_rate`` on the estimate, and is kept within ``[min_sigma, max_sigma]``.
    On a convex loss the smoothed loss only grows with sigma, so sigma shrinks towards
    ``min_sigma``; it grows where the loss is concave along a coordinate.

    Example:

    ```python
    import keras_es
    from keras_es.estimators import LearnedSigma

    est = keras_es.pes(0.1, 10, horizon=100, learn_sigma=LearnedSigma(learning_rate=0.02))
    state = est.init(num_pairs=4, dim=2)
    assert state.sampler.log_sigma.shape == (2,)  # one sigma per hyperparameter
    ```

    Args:
        learning_rate: Adam step size on ``log sigma`` per window (0: estimate the
            gradient, leave sigma where it is).
        per_dimension: One sigma per hyperparameter (default) or one for all of them.
        min_sigma: Lower bound on sigma; default the estimator's sigma / 10.
        max_sigma: Upper bound on sigma; default the estimator's sigma x 10.
    """

    learning_rate: float = 0.01
    per_dimension: bool = True
    min_sigma: float | None = None
    max_sigma: float | None = None

    def __post_init__(self):
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"learn_sigma learning_rate={rate!r} is invalid; expected a "
                             "finite number >= 0.")
        if not isinstance(self.per_dimension, bool):
            raise ValueError(f"learn_sigma per_dimension={self.per_dimension!r} is invalid; "
                             "expected True or False.")
        for name in ("min_sigma", "max_sigma"):
            value = getattr(self, name)
            if value is not None:
                checks.positive_float(f"learn_sigma {name}", value)
        if self.min_sigma is not None and self.max_sigma is not None \
                and self.min_sigma > self.max_sigma:
            raise ValueError(f"learn_sigma min_sigma={self.min_sigma!r} exceeds max_sigma="
                             f"{self.max_sigma!r}; expected min_sigma <= max_sigma.")

    def bounds(self, sigma: float) -> tuple[float, float]:
        """``(min_sigma, max_sigma)`` for an estimator whose initial sigma is ``sigma``."""
        low = max(sigma / 10.0, checks.MIN_SIGMA) if self.min_sigma is None else self.min_sigma
        high = sigma * 10.0 if self.max_sigma is None else self.max_sigma
        return max(low, checks.MIN_SIGMA), max(high, low)


class SigmaState(NamedTuple):
    """Learned sigma and its Adam moments (the same on every replica).

    Attributes:
        log_sigma: float32 ``[s]``: ``s = dim`` per dimension, else 1.
        first_moment: float32 ``[s]``.
        second_moment: float32 ``[s]``.
        updates: int32 scalar, Adam steps taken.
    """

    log_sigma: tf.Tensor
    first_moment: tf.Tensor
    second_moment: tf.Tensor
    updates: tf.Tensor


class SigmaSums(NamedTuple):
    """What a window adds up per pair for the log-sigma estimate.

    Attributes:
        credit: float32 ``[pairs, s]``: sum over credited steps of the twins' mean loss
            times the log-sigma score accumulator ``zeta``.
        score: float32 ``[pairs, s]``: sum of ``zeta`` over the same steps.
        loss: float32 ``[pairs]``: sum of the twins' mean loss over those steps.
        steps: float32 ``[pairs]``: number of those steps.
    """

    credit: tf.Tensor
    score: tf.Tensor
    loss: tf.Tensor
    steps: tf.Tensor


class SigmaPartials(NamedTuple):
    """One replica's share of the log-sigma estimate (see `SigmaSums`).

    Attributes:
        credit: float32 ``[pairs, s]`` (zeros for pairs not counted).
        score: float32 ``[pairs, s]`` (zeros for pairs not counted).
        mean_loss: float32 ``[pairs]``, the pair's mean per-step loss in the window.
        valid: bool ``[pairs]``, pairs counted (valid, credited, finite).
    """

    credit: tf.Tensor
    score: tf.Tensor
    mean_loss: tf.Tensor
    valid: tf.Tensor


_BETA_1, _BETA_2, _ADAM_EPSILON = 0.9, 0.999, 1e-8
# An estimate whose square would overflow float32 in Adam's second moment is scaled
# down to this size first, its direction kept (as keras_es.outer.outer_update does).
_LARGEST_ESTIMATE = 1e15


class Learned:
    """``eps ~ N(0, diag(sigma)^2)`` with sigma learned (`LearnedSigma`).

    A pair's score is ``[eps * sigma_0^2 / sigma^2, zeta]``: the first ``dim`` columns
    are credited with loss differences (divided by ``2 sigma_0^2`` like every
    estimator's, which leaves ``eps / (2 sigma^2)``), the last ``s`` with the twins'
    mean loss, ``zeta = z^2 - 1`` (``||z||^2 - dim`` for one shared sigma).
    """

    def __init__(self, config: LearnedSigma, sigma: float):
        self.config, self.sigma = config, float(sigma)
        self.low, self.high = config.bounds(self.sigma)

    def size(self, dim: int) -> int:
        """``s``, the number of learned sigmas."""
        return dim if self.config.per_dimension else 1

    def init(self, dim: int) -> SigmaState:
        s = self.size(dim)
        zeros = tf.zeros([s], tf.float32)
        log_sigma = tf.fill([s], tf.constant(math.log(self.sigma), tf.float32))
        return SigmaState(log_sigma, zeros, zeros, tf.constant(0, tf.int32))

    def context(self, state: SigmaState) -> tf.Tensor:
        """The sigma of this window's draws, ``[s]``."""
        return tf.exp(state.log_sigma)

    def width(self, dim: int) -> int:
        return dim

    def score_width(self, dim: int) -> int:
        return dim + self.size(dim)

    def draw(self, context, z: tf.Tensor, sigma: float, dim: int):
        eps = context * z
        mu_score = eps * ((sigma / context) ** 2)
        zeta = tf.square(z) - 1.0
        if not self.config.per_dimension:
            zeta = tf.reduce_sum(zeta, axis=-1, keepdims=True)
        return eps, tf.concat([mu_score, zeta], axis=-1)

    def split(self, accumulator: tf.Tensor, dim: int):
        """``(theta part [pairs, dim], zeta [pairs, s])`` of an accumulator."""
        return accumulator[:, :dim], accumulator[:, dim:]

    def start(self, num_pairs: int, dim: int) -> SigmaSums:
        s = self.size(dim)
        zeros = tf.zeros([num_pairs], tf.float32)
        return SigmaSums(tf.zeros([num_pairs, s]), tf.zeros([num_pairs, s]), zeros, zeros)

    @staticmethod
    def step(sums: SigmaSums, plus, minus, ok, zeta) -> SigmaSums:
        """Adds one step: the twins' mean loss where ``ok`` (halves first: no overflow)."""
        mean = tf.where(ok, 0.5 * plus + 0.5 * minus, 0.0)
        counted = tf.cast(ok, tf.float32)
        return SigmaSums(sums.credit + mean[:, None] * zeta,
                         sums.score + counted[:, None] * zeta,
                         sums.loss + mean, sums.steps + counted)

    @staticmethod
    def partials(sums: SigmaSums, valid, credit: bool) -> SigmaPartials:
        """Pairs counted: valid, with a credited step and finite sums (none when the
        window is not credited, e.g. a burn-in)."""
        finite = (tf.reduce_all(tf.math.is_finite(sums.credit), axis=1)
                  & tf.reduce_all(tf.math.is_finite(sums.score), axis=1)
                  & tf.math.is_finite(sums.loss))
        ok = valid & finite & (sums.steps > 0)
        if not credit:
            ok = tf.zeros_like(ok)
        mean = tf.where(ok, sums.loss / tf.maximum(sums.steps, 1.0), 0.0)
        return SigmaPartials(tf.where(ok[:, None], sums.credit, 0.0),
                             tf.where(ok[:, None], sums.score, 0.0), mean, ok)

    @staticmethod
    def totals(partials: SigmaPartials) -> dict:
        """This replica's sums for the one all-reduce of `keras_es.core.reduce.combine`."""
        return {"credit": tf.reduce_sum(partials.credit, 0),
                "score": tf.reduce_sum(partials.score, 0),
                "weighted_score": tf.reduce_sum(partials.mean_loss[:, None] * partials.score, 0),
                "mean_loss": tf.reduce_sum(partials.mean_loss),
                "valid": tf.reduce_sum(tf.cast(partials.valid, tf.float32))}

    def combine(self, state: SigmaState, partials: SigmaPartials, total: dict):
        """The log-sigma estimate from the replicas' summed `totals`, and one Adam step.

        Pair ``p``'s baseline is the mean per-step loss of the other counted pairs,
        ``b_p = (M - m_p) / (n - 1)``, so its estimate is ``credit_p - b_p score_p``
        and their mean needs only sums.

        Returns:
            ``(state, pair estimates [pairs, s], estimate [s], sigma [s])``.
        """
        n = total["valid"]
        others = tf.maximum(n - 1.0, 1.0)
        has_others = tf.cast(n > 1.0, tf.float32)
        baseline = has_others * (total["mean_loss"] - partials.mean_loss) / others
        pairs = tf.where(partials.valid[:, None],
                         partials.credit - baseline[:, None] * partials.score, 0.0)
        summed = total["credit"] - has_others * (
            total["mean_loss"] * total["score"] - total["weighted_score"]) / others
        gradient = summed / tf.maximum(n, 1.0)
        state = self._adam(state, gradient, n > 0.0)
        return state, pairs, gradient, tf.exp(state.log_sigma)

    def _adam(self, state: SigmaState, gradient, counted) -> SigmaState:
        """One bias-corrected Adam step on log sigma, skipped without a counted pair or
        with a non-finite estimate."""
        largest = tf.reduce_max(tf.abs(gradient))
        gradient = tf.where(largest > _LARGEST_ESTIMATE,
                            gradient * (_LARGEST_ESTIMATE / largest), gradient)
        usable = counted & tf.reduce_all(tf.math.is_finite(gradient))
        updates = state.updates + 1
        t = tf.cast(updates, tf.float32)
        m = _BETA_1 * state.first_moment + (1.0 - _BETA_1) * gradient
        v = _BETA_2 * state.second_moment + (1.0 - _BETA_2) * tf.square(gradient)
        step = (self.config.learning_rate * (m / (1.0 - _BETA_1 ** t))
                / (tf.sqrt(v / (1.0 - _BETA_2 ** t)) + _ADAM_EPSILON))
        log_sigma = tf.clip_by_value(state.log_sigma - step, math.log(self.low),
                                     math.log(self.high))
        new = SigmaState(log_sigma, m, v, updates)
        return tf.nest.map_structure(lambda a, b: tf.where(usable, a, b), new, state)


def sampler(guided: GuidedConfig | None, learn_sigma: LearnedSigma | None = None,
            sigma: float = 0.1) -> Isotropic | Guided | Learned:
    """The sampler of an estimator built with ``guided`` or ``learn_sigma`` (and
    ``sigma``, a learned sigma's initial value)."""
    if learn_sigma is not None:
        return Learned(learn_sigma, sigma)
    return Isotropic() if guided is None else Guided(guided)
