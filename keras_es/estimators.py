"""Gradient estimators for unrolled computation graphs: full ES, truncated ES, PES,
ES-Single and the general resampling interval M, with guided sampling, telescoping and
non-finite guards that compose with every one of them.

An `Estimator` is a configuration composed of four pieces (`keras_es.core`): a sampler
(isotropic or guided), a resampling rule (when noise is redrawn, whether credit
accumulates), a credit rule (every step's loss, or the telescoped final loss) and a
guard (non-finite and outlying losses). Each antithetic pair ``p`` keeps its noise
``eps_p`` (``+eps`` to particle ``2p``, ``-eps`` to ``2p + 1``), its *score* (the
weight its loss differences are credited with: ``eps_p``, ``beta eps_p`` or
``Sigma^-1 eps_p``) and an accumulator ``xi_p`` (the scores of the episode, PES, or the
current one).

It is used through a pure ask/tell interface, each step:

    state, thetas = estimator.ask(state, theta, seed)          # [2 pairs, dim]
    losses = ...                                               # run the particles
    state, sums, restart = estimator.tell(state, sums, losses)  # credit, guards

and, at the end of a window, ``finish`` (window-end credit, guards) and ``combine``
(the estimate, summed over replicas). `Estimator.window` runs that loop over an
`UnrolledSystem` in one ``tf.while_loop``; `keras_es.ESOracle` calls ask and tell itself
with the losses its trials report.

Convention (docs/estimators.md, "Normalization"): a window's loss is the **sum** of its
per-step losses, and the estimate is the **mean over valid pairs**:

    g = 1 / (2 sigma^2 pairs) * sum_p sum_steps (l_+ - l_-) xi_p

an unbiased estimate of the gradient of the smoothed sum of the window's per-step
losses. With ``objective="final"`` the window's credit is the telescoped difference
``dF_j xi_j - dF_{j-1} xi_{j-1}`` of the meta-loss at window ends, which sums over an
episode to ``dF_T xi_T``: unbiased for the final loss.

Everything is a pure function of explicit state (`EstimatorState`), traced once under
``tf.function`` with a graph loop over steps and no Python loop over particles. Under a
``tf.distribute`` strategy each replica runs the same code on its
`keras_es.distribute.Shard` of the pairs; `Estimator.combine` is the only place
replicas exchange anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from keras_es import checks
from keras_es import distribute as distribute_lib
from keras_es import noise as noise_lib
from keras_es.core import credit as credit_lib
from keras_es.core import guard as guard_lib
from keras_es.core import pairs as pairs_lib
from keras_es.core import reduce as reduce_lib
from keras_es.core import resampling as resampling_lib
from keras_es.core import sampling as sampling_lib
from keras_es.core import unroll as unroll_lib
from keras_es.core.pairs import sign as _sign
from keras_es.core.pairs import twin as _twin
from keras_es.core.sampling import GuidedConfig, LearnedSigma  # noqa: F401 (re-exported)
from keras_es.core.window import WindowPartials, WindowResult, WindowSums  # noqa: F401 (re-exported)
from keras_es.unrolled import UnrolledSystem

_OBJECTIVES = ("sum", "final")


class Counters(NamedTuple):
    """Per-pair int32 counters ``[pairs]``.

    Attributes:
        episode_step: Steps taken in the current episode.
        episode: Episodes started so far (keys re-initialization).
        draws: Noise draws so far (keys the noise).
        steps: Steps taken in total (keys minibatches and dropout).
    """

    episode_step: tf.Tensor
    episode: tf.Tensor
    draws: tf.Tensor
    steps: tf.Tensor


class EstimatorState(NamedTuple):
    """An estimator's state: one small state per piece (``()`` when a piece has none).

    Attributes:
        counters: `Counters` (per pair).
        perturbation: `keras_es.core.resampling.Perturbation` (per pair).
        sampler: The sampler's state (guided: a `keras_es.guided.GuidedState`).
        credit: The credit rule's state (``objective="final"``: a
            `keras_es.core.credit.Telescope`, per pair).
        guard: `keras_es.core.guard.GuardState` (the same on every replica).

    The counters, the noise and the guard's fields read as attributes too
    (``state.episode_step``, ``state.noise``, ``state.diverged``, ``state.guided``...).
    """

    counters: Counters
    perturbation: resampling_lib.Perturbation
    sampler: Any
    credit: Any
    guard: guard_lib.GuardState

    episode_step = property(lambda self: self.counters.episode_step)
    episode = property(lambda self: self.counters.episode)
    draws = property(lambda self: self.counters.draws)
    steps = property(lambda self: self.counters.steps)
    noise = property(lambda self: self.perturbation.noise)
    score = property(lambda self: self.perturbation.score)
    accumulator = property(lambda self: self.perturbation.accumulator)
    diverged = property(lambda self: self.guard.diverged)
    scale = property(lambda self: self.guard.scale)
    #: The guided FIFO (`keras_es.guided.GuidedState`), or None when unguided.
    guided = property(lambda self: self.sampler or None)

    @property
    def num_pairs(self) -> int:
        return int(self.counters.episode_step.shape[0])


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An ES gradient estimator for unrolled systems (built by `es_single`, `pes`,
    `truncated_es`, `full_es` or `resolve`).

    Args:
        name: Display name.
        sigma: Perturbation scale: ``eps ~ N(0, sigma^2 I)`` (guided: ``sigma^2 Sigma``
            with ``trace(Sigma) = 1``).
        truncation_length: K, steps per window (one outer update per window).
        horizon: T, steps per inner problem (episode); ``None`` never resets.
        resample: ``"window"`` (new noise every window), ``"episode"`` (once per
            episode) or an int M (every M steps of the within-episode counter).
        accumulate: Whether ``xi`` sums scores over the episode (PES) or holds only
            the current one.
        objective: ``"sum"`` of per-step losses, or the ``"final"`` meta-loss.
        telescope: With ``objective="final"``: credit the telescoped difference at every
            window end (default; information arrives every window), or, if False, the
            whole ``dF_T xi_T`` only when an episode ends. Both sum to the same unbiased
            credit per episode. Telescoped terms carry the large mid-episode
            differences that later windows cancel; when those dominate (twins that learn
            at different speeds early on and end close), crediting at the episode end
            has far lower variance per window. Needs a ``horizon``.
        stagger: Spread the pairs' start steps evenly over the horizon and burn them in,
            so resets do not line up (docs/estimators.md, "Staggered starts").
        guided: Optional `GuidedConfig`.
        clip_loss_difference: Optional bound on each credited difference: per-step
            ``|l_+ - l_-|`` (``"sum"``) or window-end ``|F_+ - F_-|`` (``"final"``).
        normalize: Divide the estimate by the spread (std over valid pairs) of the
            pairs' credited differences in the window, making the step size scale-free.
        clip_outliers: A pair whose credited difference exceeds this multiple of the
            scale of the pairs' differences is credited at that bound instead (default
            100; None turns it off; see `keras_es.core.guard`). Clipping biases the
            estimate where it acts; ``WindowResult.clipped_pairs`` counts it.
        fitness_shaping: None, or ``"rank"``: each valid pair's summed difference in
            the window is replaced by its signed rank among all pairs
            (`keras_es.core.guard.signed_ranks`, ``|u| <= 1``). **Biased**: it estimates
            a direction of descent of a rank-transformed objective, not the gradient
            (on a linear loss its mean is a positive multiple of the gradient).
        learn_sigma: None, True or a `LearnedSigma`: learn sigma by variational
            optimization from the same samples (its estimate is unbiased for the
            gradient of the smoothed loss with respect to ``log sigma``).
    """

    name: str
    sigma: float
    truncation_length: int
    horizon: int | None = None
    resample: str | int = "episode"
    accumulate: bool = False
    objective: str = "sum"
    telescope: bool = True
    stagger: bool = True
    guided: GuidedConfig | None = None
    clip_loss_difference: float | None = None
    normalize: bool = False
    clip_outliers: float | None = 100.0
    fitness_shaping: str | None = None
    learn_sigma: LearnedSigma | None = None

    def __post_init__(self):
        if isinstance(self.learn_sigma, bool):  # True: the defaults; False: None
            object.__setattr__(self, "learn_sigma", LearnedSigma() if self.learn_sigma else None)
        _check_fields(self)

    # ------------------------------------------------------------------ pieces
    @property
    def sampler(self):
        return sampling_lib.sampler(self.guided, self.learn_sigma, self.sigma)

    @property
    def resampling(self) -> resampling_lib.Resampling:
        return resampling_lib.Resampling(self.resample, self.accumulate)

    @property
    def credit(self):
        return credit_lib.credit_rule(self.objective, self.telescope, self.clip_loss_difference)

    @property
    def guard(self) -> guard_lib.Guard:
        return guard_lib.Guard(self.clip_loss_difference, self.clip_outliers)

    # ------------------------------------------------------------------ state
    def init(self, num_pairs: int, dim: int) -> EstimatorState:
        """Fresh state for ``num_pairs`` antithetic pairs and ``dim`` hyperparameters."""
        checks.positive_int("num_pairs", num_pairs)
        checks.positive_int("dim", dim)
        zeros = tf.zeros([num_pairs], tf.int32)
        return EstimatorState(
            counters=Counters(zeros, zeros, zeros, zeros),
            perturbation=resampling_lib.Resampling.init(
                num_pairs, dim, self.sampler.score_width(dim)),
            sampler=self.sampler.init(dim), credit=self.credit.init(num_pairs, dim),
            guard=guard_lib.Guard.init())

    def state_rows(self, state: EstimatorState, pairs: int):
        """A nest like ``state``: ``pairs`` for the per-pair leaves, 0 for those every
        replica holds whole (the sampler's and the guard's)."""
        return state._replace(
            counters=tf.nest.map_structure(lambda _: pairs, state.counters),
            perturbation=tf.nest.map_structure(lambda _: pairs, state.perturbation),
            sampler=tf.nest.map_structure(lambda _: 0, state.sampler),
            credit=tf.nest.map_structure(lambda _: pairs, state.credit),
            guard=tf.nest.map_structure(lambda _: 0, state.guard))

    def restore_state(self, leaves: list, template: EstimatorState) -> EstimatorState:
        """An `EstimatorState` from the flat leaves of a saved one: this version's
        layout, or that of keras_es 0.1/0.2 (13 leaves; 12 before the outlier scale),
        whatever this estimator's pieces. Raises ``ValueError`` for anything else."""
        return _restore_state(leaves, template)

    @property
    def staggered(self) -> bool:
        """Whether pairs start staggered over the horizon (``stagger`` and a horizon)."""
        return self.stagger and self.horizon is not None and self.horizon > 1

    def start_offsets(self, num_pairs: int) -> tf.Tensor:
        """Steps each pair is burned in before the first window (``stagger``)."""
        return self.offsets(tf.range(num_pairs), num_pairs)

    def offsets(self, pair_index, total_pairs: int) -> tf.Tensor:
        """`start_offsets` of the pairs ``pair_index`` of ``total_pairs``, in the graph."""
        if not self.staggered:
            return tf.zeros_like(pair_index)
        # int64: pair index times horizon can pass 2^31.
        offsets = (tf.cast(pair_index, tf.int64) * self.horizon) // total_pairs
        return tf.cast(offsets, tf.int32)

    def init_system(self, system: UnrolledSystem, num_pairs: int, seed,
                    first_pair=0) -> Any:
        """Initial system states for ``2 * num_pairs`` particles (episode 0 keys) of
        pairs ``first_pair, ..., first_pair + num_pairs - 1``."""
        return system.init(pairs_lib.episode_keys(tf.zeros([num_pairs], tf.int32), seed,
                                                  first_pair))

    def push_surrogate(self, state: EstimatorState, surrogate: tf.Tensor) -> EstimatorState:
        """Adds a surrogate gradient (same parametrization as theta) to the guided FIFO."""
        if self.guided is None:
            raise ValueError(
                "push_surrogate() needs an estimator built with guided=GuidedConfig(...).")
        return state._replace(sampler=sampling_lib.Guided.push(state.sampler, surrogate))

    # ------------------------------------------------------------------ ask / tell
    def ask(self, state: EstimatorState, theta, seed, *, active=None, window_start=None,
            first_pair=0, context=None):
        """Draws noise where the resampling rule says so; the particles' hyperparameters.

        Args:
            state: The `EstimatorState`.
            theta: float32 ``[dim]``.
            seed: int scalar, the run's seed.
            active: Optional bool ``[pairs]``: pairs that step now (default all).
            window_start: Optional bool ``[pairs]``: active pairs at a window's first
                step (default: ``active``).
            first_pair: Global index of this replica's first pair.
            context: The sampler's per-window context (default: computed).

        Returns:
            ``(state, thetas)``: ``thetas`` float32 ``[2 pairs, dim]`` is
            ``theta + eps_p`` for particle ``2p`` and ``theta - eps_p`` for ``2p + 1``.
        """
        theta = tf.convert_to_tensor(theta, tf.float32)
        num_pairs, dim = state.num_pairs, int(theta.shape[-1])
        active = _mask(active, num_pairs)
        window_start = active if window_start is None else window_start
        if context is None:
            context = self.sampler.context(state.sampler)
        counters, pert = state.counters, state.perturbation
        episode_start = active & tf.equal(counters.episode_step, 0)
        draw = self.resampling.due(counters.episode_step, active, window_start)
        pair_index = first_pair + tf.range(num_pairs)
        eps, score = tf.cond(
            tf.reduce_any(draw),
            lambda: self._draw(seed, pair_index, counters.draws, context, dim),
            lambda: (pert.noise, pert.score))
        pert = self.resampling.update(pert, draw, episode_start, eps, score)
        state = state._replace(
            perturbation=pert,
            counters=counters._replace(draws=counters.draws + tf.cast(draw, tf.int32)))
        return state, theta[None, :] + _sign(num_pairs) * _twin(pert.noise)

    def _draw(self, seed, pair_index, draws, context, dim):
        seeds = noise_lib.pair_seeds(seed, noise_lib.STREAM_PERTURBATION, pair_index, draws)
        z = noise_lib.normal_rows(seeds, self.sampler.width(dim))
        return self.sampler.draw(context, z, self.sigma, dim)

    def perturbed_theta(self, state: EstimatorState, theta, seed, active=None) -> tf.Tensor:
        """The particles' hyperparameters of the next step, ``[2 pairs, dim]``, without
        changing ``state`` (`ask`'s second output)."""
        return self.ask(state, theta, seed, active=active)[1]

    def start_window(self, state: EstimatorState) -> WindowSums:
        """Empty `WindowSums` for this replica's pairs."""
        num_pairs, dim = state.num_pairs, int(state.noise.shape[-1])
        false = tf.zeros([num_pairs], tf.bool)
        learned = () if self.learn_sigma is None else self.sampler.start(num_pairs, dim)
        return WindowSums(tf.zeros([num_pairs, dim], tf.float32),
                          tf.zeros([num_pairs], tf.float32), tf.constant(0.0),
                          tf.constant(0.0), false, false, tf.constant(0, tf.int32), learned)

    def tell(self, state: EstimatorState, sums: WindowSums, losses, *, active=None,
             done=None, meta_losses=None, credit: bool = True):
        """Credits one step's losses of every particle.

        Args:
            state: The state `ask` returned.
            sums: The window's `WindowSums` so far (`start_window`).
            losses: float ``[2 pairs]``, each particle's loss at this step.
            active: Optional bool ``[pairs]``, as given to `ask`.
            done: Optional bool ``[2 pairs]``: particles whose episode ended.
            meta_losses: With ``objective="final"``: a callable returning the meta-losses
                ``(F_+, F_-)`` (``[pairs]`` each), called only when an episode ends.
            credit: Whether the losses are credited (False for burn-in steps).

        Returns:
            ``(state, sums, restart)``: ``restart`` bool ``[pairs]`` marks pairs whose
            episode restarts (horizon or ``done`` reached, or a non-finite loss); their
            counters already say so, and their particles must be re-initialized with
            `episode_keys`.
        """
        num_pairs = state.num_pairs
        active = _mask(active, num_pairs)
        losses = tf.reshape(tf.cast(losses, tf.float32), [2 * num_pairs])
        plus, minus = losses[0::2], losses[1::2]
        difference, finite = self.guard.differences(plus, minus, active)
        ok, bad = active & finite, active & ~finite
        accumulator = state.accumulator
        if self.learn_sigma is not None:  # the log-sigma scores follow theta's
            accumulator, zeta = self.sampler.split(accumulator, int(state.noise.shape[-1]))
            if credit:
                sums = sums._replace(sigma=self.sampler.step(sums.sigma, plus, minus, ok, zeta))
        step_credit = self.credit.step(difference, accumulator)
        sums = sums._replace(
            credit=sums.credit + step_credit if credit else sums.credit,
            differences=sums.differences + difference,
            loss_sum=sums.loss_sum + tf.reduce_sum(tf.where(ok, plus + minus, 0.0)),
            loss_count=sums.loss_count + 2.0 * tf.reduce_sum(tf.cast(ok, tf.float32)),
            stepped=sums.stepped | active)
        counters = state.counters
        episode_step = counters.episode_step + tf.cast(active, tf.int32)
        ended = _ended(self.horizon, episode_step, done, num_pairs) & active & finite
        state = state._replace(counters=counters._replace(
            episode_step=episode_step, steps=counters.steps + tf.cast(active, tf.int32)))
        if self.credit.final:
            part, f_bad, telescope = self.credit.episode_end(
                state.credit, state.accumulator, ended, bad, meta_losses)
            sums = sums._replace(credit=sums.credit + part if credit else sums.credit)
            state, bad = state._replace(credit=telescope), bad | f_bad
        sums = _invalidate(sums, bad)
        return _restarted(state, ended | bad), sums, ended | bad

    def finish(self, state: EstimatorState, sums: WindowSums, *, meta_losses=None,
               finite=None, credit: bool = True):
        """Closes a window: the window-end credit (``objective="final"``) and guards.

        Args:
            state: After the window's last `tell`.
            sums: The window's `WindowSums`, after its last `tell`.
            meta_losses: With ``objective="final"``: ``(F_+, F_-)`` at the window end.
            finite: Optional bool ``[pairs]``: whether both twins' states are finite; a
                pair whose state went non-finite unseen (in the last step) restarts.
            credit: As in `tell`.

        Returns:
            ``(state, partials, restart)``: `WindowPartials` for `combine`, and the
            pairs to re-initialize, as in `tell`.
        """
        return _finish(self, state, sums, meta_losses, finite, credit)

    def combine(self, state: EstimatorState, partials: WindowPartials,
                shard: distribute_lib.Shard | None = None):
        """Sums the replicas' `WindowPartials` into the window's estimate; see
        `keras_es.core.reduce.combine`. Returns ``(state, WindowResult)``."""
        return reduce_lib.combine(self, state, partials, shard)

    # ------------------------------------------------------------------ windows
    def window(self, system: UnrolledSystem, system_state, state: EstimatorState, theta,
               seed, shard: distribute_lib.Shard | None = None, jit_compile: bool = False,
               active=None, credit: bool = True):
        """One truncated unroll of K steps and its estimate; see `keras_es.core.unroll.window`.
        Returns ``(system_state, state, WindowResult)``."""
        return unroll_lib.window(self, system, system_state, state, theta, seed, shard,
                                 jit_compile, active, credit)

    def burn_in(self, system: UnrolledSystem, system_state, state: EstimatorState, theta,
                seed, shard: distribute_lib.Shard | None = None, jit_compile: bool = False):
        """The uncredited staggered start; see `keras_es.core.unroll.burn_in`. Returns
        ``(system_state, state)``."""
        return unroll_lib.burn_in(self, system, system_state, state, theta, seed, shard,
                                  jit_compile)


# ---------------------------------------------------------------------- factories
def full_es(sigma: float, horizon: int, objective: str = "sum", *, telescope: bool = True,
            guided: GuidedConfig | None = None, clip_loss_difference: float | None = None,
            normalize: bool = False, clip_outliers: float | None = 100.0,
            **fixed) -> Estimator:
    """Full-unroll ES: one perturbation per pair, one whole episode per estimate.

    Antithetic ES on the whole inner problem (Salimans et al., 2017, applied to
    unrolled computation graphs): unbiased for the Gaussian-smoothed objective, one
    update every ``horizon`` steps; the reference the online estimators are measured
    against.

    Args:
        sigma: Perturbation scale.
        horizon: T, steps of one inner problem (= one window).
        objective: ``"sum"`` of per-step losses or the ``"final"`` meta-loss.
        telescope: As in `Estimator`.
        guided: As in `Estimator`.
        clip_loss_difference: As in `Estimator`.
        normalize: As in `Estimator`.
        clip_outliers: As in `Estimator`.
        **fixed: ``fitness_shaping`` and ``learn_sigma``, as in `Estimator`;
            ``stagger``, ``truncation_length``, ``resample`` and ``accumulate`` are
            refused with a clear error: one window is one whole, unstaggered episode.

    Example:

    ```python
    import keras_es
    est = keras_es.full_es(sigma=0.1, horizon=50)
    assert est.truncation_length == 50 and not est.stagger
    ```
    """
    checks.positive_int("horizon", horizon)
    primer = {k: fixed.pop(k) for k in _PRIMER if k in fixed}
    for name, value in fixed.items():
        if name not in ("stagger", "truncation_length", "resample", "accumulate"):
            raise TypeError(f"full_es() got an unexpected keyword argument {name!r}")
        raise ValueError(f"full_es() sets {name} itself (got {name}={value!r}): one window "
                         "is one whole, unstaggered episode.")
    return Estimator("full_es", sigma, truncation_length=horizon, horizon=horizon,
                     resample="episode", accumulate=False, objective=objective,
                     telescope=telescope, stagger=False, guided=guided,
                     clip_loss_difference=clip_loss_difference, normalize=normalize,
                     clip_outliers=clip_outliers, **primer)


def truncated_es(sigma: float, truncation_length: int, horizon: int | None = None,
                 objective: str = "sum", *, telescope: bool = True, stagger: bool = True,
                 guided: GuidedConfig | None = None,
                 clip_loss_difference: float | None = None, normalize: bool = False,
                 clip_outliers: float | None = 100.0, **primer) -> Estimator:
    """Truncated ES: fresh noise each window, credited only to that window.

    Biased: it ignores how the window's start state depends on theta (the bias PES and
    ES-Single remove; Vicol et al., 2021). The baseline the unbiased estimators are
    measured against.

    Args:
        sigma: Perturbation scale.
        truncation_length: K, steps per window.
        horizon: T, steps per inner problem; None never resets.
        objective: ``"sum"`` or ``"final"``, as in `Estimator`.
        telescope: As in `Estimator`.
        stagger: As in `Estimator`.
        guided: As in `Estimator`.
        clip_loss_difference: As in `Estimator`.
        normalize: As in `Estimator`.
        clip_outliers: As in `Estimator`.
        **primer: ``fitness_shaping`` and ``learn_sigma``, as in `Estimator`.

    Example:

    ```python
    import keras_es
    est = keras_es.truncated_es(sigma=0.1, truncation_length=10, horizon=100)
    assert est.resample == "window" and not est.accumulate
    ```
    """
    return Estimator("truncated_es", sigma, truncation_length, horizon, resample="window",
                     accumulate=False, objective=objective, telescope=telescope,
                     stagger=stagger, guided=guided, clip_loss_difference=clip_loss_difference,
                     normalize=normalize, clip_outliers=clip_outliers,
                     **_primer("truncated_es", primer))


def pes(sigma: float, truncation_length: int, horizon: int | None = None,
        resample_interval: int | None = None, objective: str = "sum", *,
        telescope: bool = True, stagger: bool = True, guided: GuidedConfig | None = None,
        clip_loss_difference: float | None = None, normalize: bool = False,
        clip_outliers: float | None = 100.0, **primer) -> Estimator:
    """Persistent ES (Vicol et al., 2021, "Unbiased Gradient Estimation in Unrolled
    Computation Graphs with Persistent Evolution Strategies").

    Fresh noise each window (or every ``resample_interval`` = M steps of the episode),
    accumulated over the episode: unbiased for the PES-smoothed objective, with a
    variance that grows with the number of windows in an episode.

    Args:
        sigma: Perturbation scale.
        truncation_length: K, steps per window.
        horizon: T, steps per inner problem; None never resets.
        resample_interval: Optional M: ``1`` is per-step PES, ``>= horizon`` is
            ES-Single.
        objective: ``"sum"`` or ``"final"``, as in `Estimator`.
        telescope: As in `Estimator`.
        stagger: As in `Estimator`.
        guided: As in `Estimator`.
        clip_loss_difference: As in `Estimator`.
        normalize: As in `Estimator`.
        clip_outliers: As in `Estimator`.
        **primer: ``fitness_shaping`` and ``learn_sigma``, as in `Estimator`.

    Example:

    ```python
    import keras_es
    est = keras_es.pes(sigma=0.1, truncation_length=10, horizon=100)
    assert est.accumulate and est.resample == "window"
    ```
    """
    resample = "window" if resample_interval is None else resample_interval
    return Estimator("pes", sigma, truncation_length, horizon, resample=resample,
                     accumulate=True, objective=objective, telescope=telescope,
                     stagger=stagger, guided=guided, clip_loss_difference=clip_loss_difference,
                     normalize=normalize, clip_outliers=clip_outliers,
                     **_primer("pes", primer))


def es_single(sigma: float, truncation_length: int, horizon: int | None = None,
              objective: str = "sum", *, telescope: bool = True, stagger: bool = True,
              guided: GuidedConfig | None = None, clip_loss_difference: float | None = None,
              normalize: bool = False, clip_outliers: float | None = 100.0,
              **primer) -> Estimator:
    """ES-Single / Noise-Reuse ES (Li et al., 2023, "Noise-Reuse in Online Evolution
    Strategies").

    One perturbation per pair and episode, reused in every window: unbiased for the
    same smoothed objective as full ES, with a variance that does not grow with the
    number of windows. Its online estimates over an episode sum to the full-unroll ES
    estimate on the same noise.

    Args:
        sigma: Perturbation scale.
        truncation_length: K, steps per window.
        horizon: T, steps per inner problem; None never resets.
        objective: ``"sum"`` or ``"final"``, as in `Estimator`.
        telescope: As in `Estimator`.
        stagger: As in `Estimator`.
        guided: As in `Estimator`.
        clip_loss_difference: As in `Estimator`.
        normalize: As in `Estimator`.
        clip_outliers: As in `Estimator`.
        **primer: ``fitness_shaping`` and ``learn_sigma``, as in `Estimator`.

    Example:

    ```python
    import keras_es
    est = keras_es.es_single(sigma=0.1, truncation_length=10, horizon=100)
    assert est.resample == "episode" and not est.accumulate
    ```
    """
    return Estimator("es_single", sigma, truncation_length, horizon, resample="episode",
                     accumulate=False, objective=objective, telescope=telescope,
                     stagger=stagger, guided=guided, clip_loss_difference=clip_loss_difference,
                     normalize=normalize, clip_outliers=clip_outliers,
                     **_primer("es_single", primer))


ESTIMATORS = {"full_es": full_es, "truncated_es": truncated_es, "pes": pes,
              "es_single": es_single}


#: The front ends' shared defaults (`MetaTrainer`, `keras_es.ESCallback`,
#: `keras_es.ESOracle`): one place, so the same settings mean the same estimator.
DEFAULTS = {"sigma": 0.1, "truncation_length": 10, "meta_objective": "sum",
            "telescope": True}


def resolve(estimator: str | Estimator = "es_single", *, sigma: float | None = None,
            truncation_length: int | None = None, horizon: int | None = None,
            meta_objective: str | None = None, telescope: bool | None = None,
            guided: GuidedConfig | None = None, **options) -> Estimator:
    """The one way every front end turns its settings into an `Estimator`.

    Args:
        estimator: A factory name (``"es_single"``, ``"pes"``, ``"truncated_es"``,
            ``"full_es"``) or an `Estimator`, which is returned as it is (then every
            other setting must be left unset: the estimator carries its own).
        sigma: Perturbation scale (default ``DEFAULTS["sigma"]``).
        truncation_length: K (default ``DEFAULTS["truncation_length"]``; ``full_es``
            uses the horizon).
        horizon: T, or None (never resets).
        meta_objective: ``"sum"`` or ``"final"`` (the factories' ``objective``; the front
            ends say ``meta_objective`` because their ``objective`` is Keras's metric).
        telescope: As in `Estimator`.
        guided: Optional `GuidedConfig`.
        **options: Further `Estimator` fields (``stagger``, ``clip_loss_difference``,
            ``normalize``, ``clip_outliers``, ``fitness_shaping``, ``learn_sigma``) and
            ``resample_interval`` for ``"pes"``.

    Example:

    ```python
    import keras_es
    est = keras_es.estimators.resolve("pes", sigma=0.05, truncation_length=20,
                                      horizon=200)
    assert est == keras_es.pes(0.05, 20, horizon=200)
    ```
    """
    settings = {"sigma": sigma, "truncation_length": truncation_length,
                "meta_objective": meta_objective, "telescope": telescope, "guided": guided,
                "horizon": horizon, **options}
    _check_settings(estimator, settings)
    if isinstance(estimator, Estimator):
        return estimator
    values = {k: (DEFAULTS[k] if settings.get(k) is None else settings[k]) for k in DEFAULTS}
    extra = {k: v for k, v in options.items() if v is not None}
    common = {"objective": values["meta_objective"], "telescope": values["telescope"],
              "guided": guided, **extra}
    if estimator == "full_es":
        if truncation_length is not None and horizon is not None \
                and truncation_length != horizon:
            raise ValueError(
                f"truncation_length={truncation_length!r} with estimator='full_es' and "
                f"horizon={horizon!r} is invalid: a full-unroll window is the whole "
                "horizon; leave truncation_length unset.")
        return full_es(values["sigma"], horizon=horizon or values["truncation_length"],
                       **common)
    return ESTIMATORS[estimator](values["sigma"], values["truncation_length"],
                                 horizon=horizon, **common)


# ---------------------------------------------------------------------- helpers
# What `resolve` passes on to the factories besides its named settings.
_OPTIONS = ("stagger", "clip_loss_difference", "normalize", "clip_outliers",
            "resample_interval", "fitness_shaping", "learn_sigma")
# The options from the ES primer every factory passes on to `Estimator`.
_PRIMER = ("fitness_shaping", "learn_sigma")
_SHAPINGS = (None, "rank")


def _primer(factory: str, options: dict) -> dict:
    """The factories' ``**primer``: only `_PRIMER` names (a typo is a TypeError, as for
    any keyword)."""
    for name in options:
        if name not in _PRIMER:
            raise TypeError(f"{factory}() got an unexpected keyword argument {name!r}")
    return options


def _check_settings(estimator, settings: dict) -> None:
    """`resolve`'s checks: each named for what the user typed."""
    if isinstance(estimator, Estimator):
        given = sorted(k for k, v in settings.items() if v is not None)
        if given:
            raise ValueError(
                f"estimator={estimator.name!r} is an Estimator, which carries its own "
                f"settings, but {given} were given too; pass them to its factory instead "
                f"(e.g. keras_es.{estimator.name}({given[0]}=...)).")
        return
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid; expected one of "
                         f"{sorted(ESTIMATORS)} or a keras_es Estimator.")
    unknown = sorted(set(settings) - set(_OPTIONS) - {
        "sigma", "truncation_length", "meta_objective", "telescope", "guided", "horizon"})
    if "objective" in unknown:
        raise ValueError(
            f"objective={settings['objective']!r} is not a setting here; the estimator's "
            "objective is meta_objective= ('sum' or 'final') in every keras_es front end.")
    if unknown:
        raise ValueError(f"{unknown} are not estimator settings; expected some of sigma, "
                         f"truncation_length, horizon, meta_objective, telescope, guided, "
                         f"{', '.join(_OPTIONS)}.")
    meta = settings.get("meta_objective")
    if meta is not None and meta not in _OBJECTIVES:
        raise ValueError(f"meta_objective={meta!r} is invalid; expected one of {_OBJECTIVES}.")
    if settings.get("resample_interval") is not None and estimator != "pes":
        raise ValueError(f"resample_interval={settings['resample_interval']!r} is a setting "
                         f"of 'pes'; estimator={estimator!r} has none.")


def _check_fields(est: Estimator) -> None:
    checks.sigma(est.sigma)
    for flag in ("stagger", "normalize", "telescope"):
        checks.boolean(flag, getattr(est, flag))
    checks.positive_int("truncation_length", est.truncation_length)
    if est.horizon is not None:
        checks.positive_int("horizon", est.horizon)
    if isinstance(est.resample, str):
        if est.resample not in ("window", "episode"):
            raise ValueError(f"resample={est.resample!r} is invalid; expected 'window', "
                             "'episode' or a positive integer M.")
    else:
        checks.positive_int("resample", est.resample)
    if est.objective not in _OBJECTIVES:
        raise ValueError(f"objective={est.objective!r} is invalid; expected one of "
                         f"{_OBJECTIVES}.")
    if not est.telescope and (est.objective != "final" or est.horizon is None):
        raise ValueError(
            f"telescope=False with objective={est.objective!r} and horizon={est.horizon!r} "
            "is invalid; crediting at episode ends needs objective='final' and a horizon.")
    if est.clip_loss_difference is not None:
        checks.positive_float("clip_loss_difference", est.clip_loss_difference)
    if est.clip_outliers is not None:
        checks.positive_float("clip_outliers", est.clip_outliers)
        if est.clip_outliers < 1:
            raise ValueError(f"clip_outliers={est.clip_outliers!r} is invalid; expected a "
                             "multiple >= 1 of the median difference (or None).")
    if est.guided is not None and not isinstance(est.guided, GuidedConfig):
        raise ValueError(f"guided={est.guided!r} is invalid; expected a GuidedConfig or None.")
    _check_primer(est)


def _check_primer(est: Estimator) -> None:
    """The options from the ES primer, and the combinations they cannot serve."""
    if est.fitness_shaping not in _SHAPINGS:
        raise ValueError(f"fitness_shaping={est.fitness_shaping!r} is invalid; expected None "
                         "or 'rank'.")
    if est.fitness_shaping == "rank" and est.objective != "sum":
        raise ValueError(
            f"fitness_shaping='rank' with objective={est.objective!r} is not supported: a "
            "telescoped window credits the change of a difference, which has no rank; use "
            "objective='sum' (meta_objective='sum').")
    if est.fitness_shaping == "rank" and est.normalize:
        raise ValueError("fitness_shaping='rank' with normalize=True is invalid: ranks are "
                         "already scale-free; leave normalize=False.")
    learned = est.learn_sigma
    if learned is None:
        return
    if not isinstance(learned, LearnedSigma):
        raise ValueError(f"learn_sigma={learned!r} is invalid; expected None, True or a "
                         "keras_es.estimators.LearnedSigma.")
    if est.guided is not None:
        raise ValueError("learn_sigma with guided=... is not supported: Guided ES shapes its "
                         "covariance from surrogate gradients and sigma is its total radius; "
                         "use one of them.")
    if est.objective != "sum":
        raise ValueError(
            f"learn_sigma with objective={est.objective!r} is not supported: the log-sigma "
            "estimate credits every step's loss; use objective='sum' (meta_objective='sum').")
    if est.resample == "episode" and est.horizon is None:
        raise ValueError(
            f"learn_sigma with estimator {est.name!r} and horizon=None is invalid: noise "
            "drawn once per episode is never redrawn without a horizon, so a learned sigma "
            "would never reach the perturbations; give a horizon or use 'pes'.")


# The flat layout of an EstimatorState saved by keras_es 0.1 and 0.2 (tf.nest order of
# the single NamedTuple it was then); 0.1 lacked the last field.
_LEGACY_FIELDS = ("episode_step", "episode", "draws", "steps", "noise", "score",
                  "accumulator", "final_difference", "final_accumulator", "surrogates",
                  "count", "diverged", "scale")


def _restore_state(leaves: list, template: EstimatorState) -> EstimatorState:
    flat = tf.nest.flatten(template)
    if len(leaves) == len(flat):
        return tf.nest.pack_sequence_as(template, [_like(v, t) for v, t in
                                                   zip(leaves, flat, strict=True)])
    if len(leaves) not in (len(_LEGACY_FIELDS), len(_LEGACY_FIELDS) - 1):
        raise ValueError(f"The saved estimator state has {len(leaves)} tensors; this "
                         f"estimator's has {len(flat)} (or {len(_LEGACY_FIELDS)} in the "
                         "layout of keras_es 0.2): it was saved by a different estimator.")
    if isinstance(template.sampler, sampling_lib.SigmaState):
        raise ValueError("The saved estimator state is in the layout of keras_es 0.1/0.2, "
                         "which had no learned sigma; this estimator learns sigma "
                         "(learn_sigma): it was saved by a different estimator.")
    if np.shape(leaves[5]) != np.shape(leaves[4]):
        raise ValueError("The saved estimator state is of an estimator that learns sigma "
                         "(learn_sigma); this one does not.")
    old = dict(zip(_LEGACY_FIELDS, leaves, strict=False))
    old.setdefault("scale", np.float32(0.0))  # 0.1: the running scale starts at 0
    t = template
    counters = Counters(*[_like(old[f], getattr(t.counters, f)) for f in Counters._fields])
    perturbation = type(t.perturbation)(
        *[_like(old[f], getattr(t.perturbation, f)) for f in t.perturbation._fields])
    sampler, credit = t.sampler, t.credit
    if len(sampler):
        sampler = type(sampler)(_like(old["surrogates"], sampler.surrogates),
                                _like(old["count"], sampler.count))
    elif np.asarray(old["surrogates"]).size:
        raise ValueError("The saved estimator state is of a guided estimator; this one "
                         "is not.")
    if len(credit):
        credit = type(credit)(*[_like(old[f], getattr(credit, f)) for f in credit._fields])
    guard = guard_lib.GuardState(_like(old["diverged"], t.guard.diverged),
                                 _like(old["scale"], t.guard.scale))
    return EstimatorState(counters, perturbation, sampler, credit, guard)


def _like(value, template) -> tf.Tensor:
    """``value`` as a tensor of ``template``'s dtype and shape (a clear error if the
    shapes differ)."""
    array = np.asarray(value, template.dtype.as_numpy_dtype)
    if array.size != int(np.prod(template.shape)):
        raise ValueError(f"The saved estimator state holds a tensor of shape {array.shape} "
                         f"where this estimator's has {tuple(template.shape)}: a different "
                         "number of pairs or hyperparameters.")
    return tf.constant(array.reshape(template.shape), template.dtype)


def _mask(mask, num_pairs: int) -> tf.Tensor:
    if mask is None:
        return tf.ones([num_pairs], tf.bool)
    return tf.convert_to_tensor(mask, tf.bool)


def _ended(horizon, episode_step, done, num_pairs):
    ended = tf.zeros_like(episode_step, tf.bool)
    if horizon is not None:
        ended = episode_step >= horizon
    if done is not None:
        done = tf.reshape(tf.cast(done, tf.bool), [2 * num_pairs])
        ended = ended | done[0::2] | done[1::2]
    return ended

def _finish(est: Estimator, state: EstimatorState, sums: WindowSums, meta_losses, finite,
            credit: bool):
    """`Estimator.finish`."""
    meta_sum = meta_count = tf.constant(0.0)
    restart = tf.zeros_like(sums.invalid)
    if est.credit.final:
        f_plus, f_minus = meta_losses
        part, d, f_ok, telescope = est.credit.window_end(
            state.credit, state.accumulator, state.episode_step > 0, f_plus, f_minus)
        f_bad = (state.episode_step > 0) & ~f_ok
        sums = _invalidate(sums._replace(
            credit=sums.credit + part if credit else sums.credit, differences=d), f_bad)
        state, restart = state._replace(credit=telescope), f_bad
        both_ok = tf.concat([f_ok, f_ok], 0)
        meta_sum = tf.reduce_sum(tf.where(both_ok, tf.concat([f_plus, f_minus], 0), 0.0))
        meta_count = tf.reduce_sum(tf.cast(both_ok, tf.float32))
    if finite is not None:
        # A state that went non-finite in the window's last step (its loss, computed
        # before the update, was still finite) would be caught only in the next
        # window, after a checkpoint could have saved it: restart that pair now.
        broken = ~finite & ~sums.invalid & sums.stepped
        sums, restart = _invalidate(sums, broken), restart | broken
    # Pairs that waited the whole window are not counted, nor pairs whose finite
    # losses overflowed their difference or credit: left out by name rather than
    # zeroing the whole estimate.
    overflowed = ~(tf.reduce_all(tf.math.is_finite(sums.credit), axis=1)
                   & tf.math.is_finite(sums.differences))
    valid = ~sums.invalid & ~overflowed & sums.stepped
    learned = () if est.learn_sigma is None else est.sampler.partials(sums.sigma, valid, credit)
    partials = WindowPartials(
        pair_gradients=tf.where(valid[:, None], sums.credit, 0.0) / (2.0 * est.sigma ** 2),
        differences=sums.differences, valid=valid, loss_sum=sums.loss_sum,
        loss_count=sums.loss_count, meta_sum=meta_sum, meta_count=meta_count,
        diverged=sums.diverged, sigma=learned)
    return _restarted(state, restart), partials, restart


def _restarted(state: EstimatorState, restart) -> EstimatorState:
    counters = state.counters
    return state._replace(counters=counters._replace(
        episode=counters.episode + tf.cast(restart, tf.int32),
        episode_step=tf.where(restart, 0, counters.episode_step)))


def _invalidate(sums: WindowSums, bad) -> WindowSums:
    """Marks ``bad`` pairs invalid for the window and counts them as diverged."""
    return sums._replace(invalid=sums.invalid | bad,
                         diverged=sums.diverged + tf.reduce_sum(tf.cast(bad, tf.int32)))
