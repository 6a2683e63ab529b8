"""Gradient estimators for unrolled computation graphs: full ES, truncated ES, PES,
ES-Single and the general resampling interval M, with guided sampling, telescoping and
non-finite guards that compose with every one of them.

One mechanism covers all estimators. Each antithetic pair ``p`` keeps

* its noise ``eps_p`` (the perturbation currently applied: ``+eps`` to particle ``2p``,
  ``-eps`` to particle ``2p + 1``) and its *score*, the weight its loss differences are
  credited with: ``eps_p`` (vanilla), ``Sigma^-1 eps_p`` or ``beta eps_p`` (guided);
* an accumulator ``xi_p``: the sum of the scores of every perturbation applied since
  the pair's episode began (PES), or just the current one (ES-Single, truncated ES).

The estimators differ only in *when* noise is redrawn and whether ``xi`` accumulates:

| estimator | new noise | ``xi`` |
|---|---|---|
| `full_es` | at episode start; window = episode | current score |
| `truncated_es` | at every window start | current score (biased) |
| `pes` | at every window start | sum over the episode |
| `pes(resample_interval=M)` | every M steps of the within-episode counter | sum over the episode |
| `es_single` | at episode start | current score |

Convention (trap 6): a window's loss is the **sum** of its per-step losses, and the
estimate is the **mean over valid pairs**:

    g = 1 / (2 sigma^2 pairs) * sum_p sum_steps (l_+ - l_-) xi_p

so it is an unbiased estimate of the gradient of the smoothed sum of the window's
per-step losses. With ``objective="final"`` the window's credit is the telescoped
difference ``dF_j xi_j - dF_{j-1} xi_{j-1}`` of the meta-loss at window ends, which sums
over an episode to ``dF_T xi_T``: unbiased for the final loss.

Everything is a pure function of explicit state (`EstimatorState`), traced
once under ``tf.function`` with a graph loop over steps and no Python loop over
particles. Under a ``tf.distribute`` strategy each replica runs the same code on its
`keras_es.distribute.Shard` of the pairs; `Estimator.combine` is the only place
replicas exchange anything (one ``dim``-sized all-reduce per window).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import tensorflow as tf

from keras_es import checks
from keras_es import distribute as distribute_lib
from keras_es import guided as guided_lib
from keras_es import noise as noise_lib
from keras_es.unrolled import UnrolledSystem, select

_OBJECTIVES = ("sum", "final")
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


class EstimatorState(NamedTuple):
    """Per-pair bookkeeping of an estimator (leading dimension: pairs).

    Attributes:
        episode_step: int32, steps taken in the current episode.
        episode: int32, episodes started so far (keys re-initialization).
        draws: int32, noise draws so far (keys the noise).
        steps: int32, steps taken in total (keys minibatches and dropout).
        noise: float32 ``[pairs, dim]``, the perturbation currently applied.
        score: float32 ``[pairs, dim]``, the credit weight of ``noise``.
        accumulator: float32 ``[pairs, dim]``, ``xi``.
        final_difference: float32, ``F_+ - F_-`` at the last window end (telescoping).
        final_accumulator: float32 ``[pairs, dim]``, ``xi`` at the last window end.
        guided: `GuidedState` (``k = 0`` when unguided).
        diverged: int32 scalar, pairs reset after a non-finite loss, in total.
        scale: float32 scalar, the running scale of the pairs' loss differences
            (``clip_outliers``); 0 before the first window.
    """

    episode_step: tf.Tensor
    episode: tf.Tensor
    draws: tf.Tensor
    steps: tf.Tensor
    noise: tf.Tensor
    score: tf.Tensor
    accumulator: tf.Tensor
    final_difference: tf.Tensor
    final_accumulator: tf.Tensor
    guided: guided_lib.GuidedState
    diverged: tf.Tensor
    scale: tf.Tensor


class WindowPartials(NamedTuple):
    """One replica's share of a window, before `Estimator.combine` sums over replicas.

    Attributes:
        pair_gradients: float32 ``[pairs, dim]``, each local pair's estimate (zeros for
            invalid pairs).
        differences: float32 ``[pairs]``, the credited loss differences (for
            ``normalize``).
        valid: bool ``[pairs]``, pairs whose window was finite and credited.
        loss_sum: Sum of the finite particles' per-step losses.
        loss_count: Number of those losses.
        meta_sum: Sum of the finite window-end meta-losses (``objective="final"``).
        meta_count: Number of those meta-losses.
        diverged: int32, local pairs reset after a non-finite loss.
    """

    pair_gradients: tf.Tensor
    differences: tf.Tensor
    valid: tf.Tensor
    loss_sum: tf.Tensor
    loss_count: tf.Tensor
    meta_sum: tf.Tensor
    meta_count: tf.Tensor
    diverged: tf.Tensor


class WindowResult(NamedTuple):
    """What one window of K steps produced.

    Attributes:
        gradient: float32 ``[dim]``, the estimate (zeros if no pair was valid).
        loss: Mean per-step loss of the finite particles over the window (NaN when
            no particle had a finite loss).
        meta_loss: Mean meta-loss at window end (``objective="final"``; else NaN, and
            NaN when no meta-loss was finite).
        valid_pairs: int32, pairs whose window was finite and credited (a pair whose
            huge but finite losses overflow their difference or credit is not).
        diverged_pairs: int32, pairs reset in this window after a non-finite loss.
        clipped_pairs: int32, valid pairs whose loss difference was clipped
            (``clip_outliers``).
        pair_gradients: float32 ``[pairs, dim]``, each pair's own estimate (zeros for
            invalid pairs); ``gradient`` is their mean over valid pairs. Under a
            strategy: only this replica's pairs.
    """

    gradient: tf.Tensor
    loss: tf.Tensor
    meta_loss: tf.Tensor
    valid_pairs: tf.Tensor
    diverged_pairs: tf.Tensor
    pair_gradients: tf.Tensor
    clipped_pairs: tf.Tensor


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An ES gradient estimator for unrolled systems (use the factory functions).

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
        stagger: Spread the pairs' start steps evenly over the horizon and burn them in
            (trap 5), so resets do not line up.
        guided: Optional `GuidedConfig`.
        clip_loss_difference: Optional bound on each credited difference: per-step
            ``|l_+ - l_-|`` (``"sum"``) or window-end ``|F_+ - F_-|`` (``"final"``).
        normalize: Divide the estimate by the spread (std over valid pairs) of the
            pairs' credited differences in the window (summed per-step differences, or
            the window-end meta-loss differences), making the step size scale-free.
        clip_outliers: A pair whose credited difference (as ``normalize`` measures it)
            exceeds this multiple of the scale of the pairs' differences is credited
            at that bound instead (default 100; None turns it off). The scale is the
            larger of the window's (upper) median difference over valid pairs and a
            running average of past windows' medians, so one outlier (a particle
            reporting 1e30) cannot throw theta or overflow the outer optimizer's
            slots, while ordinary differences are not touched (measured on a tuned
            MLP with 4 pairs: 10 medians clipped a pair in about 1 window of 3, 100 in
            none of 12 at a stable rate). Clipping biases the estimate where it acts;
            the number of clipped pairs is reported (``WindowResult.clipped_pairs``).
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

    def __post_init__(self):
        checks.sigma(self.sigma)
        for flag in ("stagger", "normalize", "telescope"):
            checks.boolean(flag, getattr(self, flag))
        checks.positive_int("truncation_length", self.truncation_length)
        if self.horizon is not None:
            checks.positive_int("horizon", self.horizon)
        if isinstance(self.resample, str):
            if self.resample not in ("window", "episode"):
                raise ValueError(
                    f"resample={self.resample!r} is invalid; expected 'window', 'episode' or "
                    "a positive integer M.")
        else:
            checks.positive_int("resample", self.resample)
        if self.objective not in _OBJECTIVES:
            raise ValueError(
                f"objective={self.objective!r} is invalid; expected one of {_OBJECTIVES}.")
        if not self.telescope and (self.objective != "final" or self.horizon is None):
            raise ValueError(
                f"telescope=False with objective={self.objective!r} and horizon="
                f"{self.horizon!r} is invalid; crediting at episode ends needs "
                "objective='final' and a horizon.")
        if self.clip_loss_difference is not None:
            checks.positive_float("clip_loss_difference", self.clip_loss_difference)
        if self.clip_outliers is not None:
            checks.positive_float("clip_outliers", self.clip_outliers)
            if self.clip_outliers < 1:
                raise ValueError(f"clip_outliers={self.clip_outliers!r} is invalid; expected "
                                 "a multiple >= 1 of the median difference (or None).")
        if self.guided is not None and not isinstance(self.guided, GuidedConfig):
            raise ValueError(f"guided={self.guided!r} is invalid; expected a GuidedConfig or None.")

    # ------------------------------------------------------------------ state
    def init(self, num_pairs: int, dim: int) -> EstimatorState:
        """Fresh state for ``num_pairs`` antithetic pairs and ``dim`` hyperparameters."""
        checks.positive_int("num_pairs", num_pairs)
        checks.positive_int("dim", dim)
        if self.guided is not None and self.guided.k > dim:
            raise ValueError(
                f"guided k={self.guided.k} exceeds the number of hyperparameters dim={dim}; "
                "expected k <= dim.")
        zeros_i = tf.zeros([num_pairs], tf.int32)
        zeros_v = tf.zeros([num_pairs, dim], tf.float32)
        k = self.guided.k if self.guided is not None else 0
        return EstimatorState(
            episode_step=zeros_i, episode=zeros_i, draws=zeros_i, steps=zeros_i,
            noise=zeros_v, score=zeros_v, accumulator=zeros_v,
            final_difference=tf.zeros([num_pairs], tf.float32), final_accumulator=zeros_v,
            guided=guided_lib.init(k, dim), diverged=tf.constant(0, tf.int32),
            scale=tf.constant(0.0))

    def _staggered(self) -> bool:
        return self.stagger and self.horizon is not None and self.horizon > 1

    def start_offsets(self, num_pairs: int) -> tf.Tensor:
        """Steps each pair is burned in before the first window (trap 5)."""
        return self._offsets(tf.range(num_pairs), num_pairs)

    def init_system(self, system: UnrolledSystem, num_pairs: int, seed,
                    first_pair=0) -> Any:
        """Initial system states for ``2 * num_pairs`` particles (episode 0 keys) of
        pairs ``first_pair, ..., first_pair + num_pairs - 1``."""
        pair_index = first_pair + tf.range(num_pairs)
        keys = _twin(noise_lib.pair_seeds(seed, noise_lib.STREAM_EPISODE,
                                          pair_index, tf.zeros([num_pairs], tf.int32)))
        return system.init(keys)

    def push_surrogate(self, state: EstimatorState, surrogate: tf.Tensor) -> EstimatorState:
        """Adds a surrogate gradient (same parametrization as theta) to the guided FIFO."""
        if self.guided is None:
            raise ValueError(
                "push_surrogate() needs an estimator built with guided=GuidedConfig(...).")
        return state._replace(guided=guided_lib.push(state.guided, surrogate))

    # ------------------------------------------------------------------ windows
    def burn_in(self, system: UnrolledSystem, system_state, state: EstimatorState,
                theta: tf.Tensor, seed, shard: distribute_lib.Shard | None = None,
                jit_compile: bool = False):
        """Advances pair ``p`` by ``start_offsets[p]`` uncredited steps.

        The steps use the pair's perturbations and build its accumulator exactly as
        credited steps would, so later windows stay unbiased; only their losses are not
        credited. ``shard`` and ``jit_compile`` are as in `window`. Returns
        ``(system_state, state)``.
        """
        num_pairs = int(state.episode_step.shape[0])
        shard = shard or distribute_lib.single(num_pairs)
        total = shard.total_pairs
        # Python arithmetic (not a tensor), so no graph conditional ever wraps the
        # cross-replica reduction below. Offsets ascend: the last pair's is the longest.
        longest = (total - 1) * self.horizon // total if self._staggered() else 0
        if longest == 0:
            return system_state, state
        wait = longest - self._offsets(shard.first_pair + tf.range(num_pairs), total)
        system_state, state, partials = self._local(
            system, system_state, state, theta, seed, shard.first_pair, longest, wait,
            credit=False, jit_compile=jit_compile)
        state, _ = self.combine(state, partials, shard)
        return system_state, state

    def window(self, system: UnrolledSystem, system_state, state: EstimatorState,
               theta: tf.Tensor, seed, shard: distribute_lib.Shard | None = None,
               jit_compile: bool = False, active: tf.Tensor | None = None,
               credit: bool = True):
        """Runs one truncated unroll of K steps and estimates the gradient.

        Args:
            system: The `UnrolledSystem`.
            system_state: Its particles' states.
            state: This estimator's `EstimatorState`.
            theta: float32 ``[dim]`` unconstrained hyperparameters.
            seed: int scalar, the run's seed.
            shard: The pairs this replica holds (`keras_es.distribute.replica_shard`
                inside ``strategy.run``); default: all of them, on one device.
            jit_compile: Compile the particles' steps with XLA (the cross-replica
                reduction stays outside the compiled part).
            active: Optional bool ``[pairs]``: pairs that take part in this window
                (default all). The others wait: their states, noise and counters do
                not move and they are not credited (a staggered start run window by
                window, as `ESOracle` does).
            credit: Whether the window's losses are credited to the estimate
                (``False`` for burn-in windows).

        Returns:
            ``(system_state, state, WindowResult)``.
        """
        num_pairs = state.episode_step.shape[0]
        shard = shard or distribute_lib.single(num_pairs)
        wait = tf.zeros([num_pairs], tf.int32)
        if active is not None:
            wait = tf.where(tf.convert_to_tensor(active, tf.bool), 0, self.truncation_length + 1)
        system_state, state, partials = self._local(
            system, system_state, state, theta, seed, shard.first_pair,
            self.truncation_length, wait, credit=credit, jit_compile=jit_compile)
        state, result = self.combine(state, partials, shard)
        return system_state, state, result

    def perturbed_theta(self, state: EstimatorState, theta: tf.Tensor, seed,
                        active: tf.Tensor | None = None) -> tf.Tensor:
        """The particle hyperparameters the first step of the next `window` applies.

        Args:
            state: The `EstimatorState` the next window starts from.
            theta: float32 ``[dim]``.
            seed: int scalar, the run's seed.
            active: Optional bool ``[pairs]``, as in `window`.

        Returns:
            float32 ``[2 pairs, dim]``: ``theta + eps_p`` for particle ``2p`` and
            ``theta - eps_p`` for ``2p + 1``. The same noise draw `window` makes, so a
            caller that runs particles elsewhere (`ESOracle`) can hand each one its
            hyperparameters before the losses exist; the state is not changed.
            Single-device pair indices (``0 .. pairs - 1``).
        """
        theta = tf.convert_to_tensor(theta, tf.float32)
        num_pairs = int(state.episode_step.shape[0])
        if active is None:
            active = tf.ones([num_pairs], tf.bool)
        active = tf.convert_to_tensor(active, tf.bool)
        subspace = (guided_lib.subspace(state.guided, self.guided.alpha)
                    if self.guided is not None else None)
        state = self._advance_noise(state, active, active, seed, tf.range(num_pairs),
                                    subspace, int(theta.shape[-1]))
        return theta[None, :] + _sign(num_pairs) * _twin(state.noise)

    def combine(self, state: EstimatorState, partials: WindowPartials,
                shard: distribute_lib.Shard):
        """Sums the replicas' `WindowPartials` into the window's estimate.

        With ``clip_outliers`` or ``normalize``, one all-reduce gathers every pair's
        credited difference (two floats per pair over all replicas) first; then one of
        ``dim + 7`` floats (the partial estimate, counts and loss sums). Every replica
        gets the same result, and the same ``state.diverged`` and ``state.scale``.

        Returns:
            ``(state, WindowResult)``.
        """
        dim = int(partials.pair_gradients.shape[-1])
        pair_gradients = partials.pair_gradients
        spread = clipped = None
        new_scale = state.scale
        if self.normalize or self.clip_outliers is not None:
            # Every pair's difference: each replica writes its own into a zero vector over
            # all pairs, so one sum carries them (x + 0 is exact) with static shapes.
            index = (shard.first_pair + tf.range(tf.shape(partials.valid)[0]))[:, None]
            size = [shard.total_pairs]
            gathered = shard.all_reduce(tf.stack([
                tf.scatter_nd(index, tf.where(partials.valid, partials.differences, 0.0), size),
                tf.scatter_nd(index, tf.cast(partials.valid, tf.float32), size)]))
            differences, valid = gathered[0], gathered[1] > 0.5
            if self.normalize:
                spread = _masked_std(differences, valid)
            if self.clip_outliers is not None:
                median = _masked_median(tf.abs(differences), valid & (differences != 0.0))
                bound = self.clip_outliers * tf.maximum(state.scale, median)
                magnitude = tf.abs(partials.differences)
                over = partials.valid & (bound > 0.0) & (magnitude > bound)
                factor = tf.where(over, bound / tf.where(over, magnitude, 1.0), 1.0)
                pair_gradients = pair_gradients * factor[:, None]
                clipped = tf.reduce_sum(tf.cast(over, tf.float32))
                # The running scale follows the windows' medians (robust to the outliers
                # it exists for); a window without a nonzero difference leaves it.
                new_scale = tf.where(median > 0.0,
                                     tf.where(state.scale > 0.0,
                                              0.9 * state.scale + 0.1 * median, median),
                                     state.scale)
        valid_count = tf.reduce_sum(tf.cast(partials.valid, tf.float32))
        counts = [valid_count, partials.loss_sum, partials.loss_count, partials.meta_sum,
                  partials.meta_count, tf.cast(partials.diverged, tf.float32),
                  clipped if clipped is not None else tf.constant(0.0)]
        total = shard.all_reduce(tf.concat([tf.reduce_sum(pair_gradients, 0),
                                            tf.stack(counts)], 0))
        valid_count = total[dim]
        gradient = total[:dim] / tf.maximum(valid_count, 1.0)
        if spread is not None:
            gradient = tf.math.divide_no_nan(gradient, spread)
        gradient = tf.where(tf.math.is_finite(gradient), gradient, 0.0)
        # Counts are exact in float32 up to 2^24.
        diverged = tf.cast(tf.round(total[dim + 5]), tf.int32)
        nan = tf.constant(float("nan"))
        # A window without one finite loss has no mean loss: NaN, never 0 (which a
        # ModelCheckpoint(save_best_only=True) would take for the best epoch).
        meta_mean = (tf.where(total[dim + 4] > 0, tf.math.divide_no_nan(total[dim + 3],
                                                                         total[dim + 4]), nan)
                     if self.objective == "final" else nan)
        state = state._replace(diverged=state.diverged + diverged, scale=new_scale)
        return state, WindowResult(
            gradient=gradient,
            loss=tf.where(total[dim + 2] > 0,
                          tf.math.divide_no_nan(total[dim + 1], total[dim + 2]), nan),
            meta_loss=meta_mean,
            valid_pairs=tf.cast(tf.round(valid_count), tf.int32),
            diverged_pairs=diverged,
            pair_gradients=pair_gradients,
            clipped_pairs=tf.cast(tf.round(total[dim + 6]), tf.int32))

    # ------------------------------------------------------------------ internals
    def _offsets(self, pair_index, total_pairs):
        """`start_offsets` of the given global pair indices, in the graph."""
        if not self._staggered():
            return tf.zeros_like(pair_index)
        # int64: pair index times horizon can pass 2^31.
        offsets = (tf.cast(pair_index, tf.int64) * self.horizon) // total_pairs
        return tf.cast(offsets, tf.int32)

    def _draw(self, seed, pair_index, draws, subspace, dim):
        """Noise and score for every pair at its current draw count."""
        seeds = noise_lib.pair_seeds(seed, noise_lib.STREAM_PERTURBATION, pair_index, draws)
        if self.guided is None:
            z = noise_lib.normal_rows(seeds, dim)
            eps = self.sigma * z
            return eps, eps
        z = noise_lib.normal_rows(seeds, dim + self.guided.k)
        eps = guided_lib.sample(subspace, z[:, :dim], z[:, dim:], self.sigma)
        if self.guided.weighting == "covariance":
            return eps, self.guided.beta * eps
        return eps, guided_lib.inverse_covariance(subspace, eps)

    def _advance_noise(self, st, active, window_start, seed, pair_index, subspace, dim):
        """Draws new noise where this estimator's rule says so, updates ``xi``.

        ``active``: pairs stepping now; ``window_start``: active pairs at the first
        step of a window; ``pair_index``: their global indices. The one place the
        resampling rule lives (`_run` and `perturbed_theta` both use it).
        """
        episode_start = active & tf.equal(st.episode_step, 0)
        if self.resample == "episode":
            draw = episode_start
        elif self.resample == "window":
            draw = window_start
        else:
            draw = active & tf.equal(st.episode_step % self.resample, 0)
        eps_new, score_new = tf.cond(
            tf.reduce_any(draw),
            lambda: self._draw(seed, pair_index, st.draws, subspace, dim),
            lambda: (st.noise, st.score))
        drawn = draw[:, None]
        noise = tf.where(drawn, eps_new, st.noise)
        score = tf.where(drawn, score_new, st.score)
        if self.accumulate:
            base = tf.where(episode_start[:, None], 0.0, st.accumulator)
        else:
            base = tf.zeros_like(st.accumulator)
        accumulator = tf.where(
            drawn, base + score_new,
            tf.where(episode_start[:, None], score, st.accumulator))
        return st._replace(noise=noise, score=score, accumulator=accumulator,
                           draws=st.draws + tf.cast(draw, tf.int32))

    def _local(self, system, system_state, state, theta, seed, first_pair, num_steps, wait,
               credit, jit_compile):
        """`_run`, compiled with XLA when asked (a fresh function per trace of the
        caller, which traces once)."""
        if not jit_compile:
            return self._run(system, system_state, state, theta, seed, first_pair, num_steps,
                             wait, credit)
        run = tf.function(
            lambda s, st, th, w, f: self._run(system, s, st, th, seed, f, num_steps, w, credit),
            jit_compile=True, autograph=False)
        return run(system_state, state, tf.convert_to_tensor(theta, tf.float32), wait,
                   tf.convert_to_tensor(first_pair, tf.int32))

    def _run(self, system, system_state, state, theta, seed, first_pair, num_steps, wait,
             credit):
        """Runs ``num_steps`` steps of this replica's pairs; returns
        ``(system_state, state, WindowPartials)``."""
        theta = tf.convert_to_tensor(theta, tf.float32)
        dim = int(theta.shape[-1])
        num_pairs = int(state.episode_step.shape[0])
        pair_index = first_pair + tf.range(num_pairs)
        sign = _sign(num_pairs)
        subspace = (guided_lib.subspace(state.guided, self.guided.alpha)
                    if self.guided is not None else None)
        horizon = self.horizon
        final = self.objective == "final"

        def meta_losses(sys_state, st):
            keys = _twin(noise_lib.pair_seeds(seed, noise_lib.STREAM_EPISODE, pair_index,
                                              st.episode))
            f = system.meta_loss(sys_state, keys)
            return f[0::2], f[1::2]

        def body(s, sys_state, st, credit_sum, diff_sum, loss_sum, loss_count, invalid, diverged):
            active = s >= wait
            # Window starts; in a burn-in, every K steps after the pair wakes up.
            window_start = active & tf.equal((s - wait) % self.truncation_length, 0)
            st = self._advance_noise(st, active, window_start, seed, pair_index, subspace,
                                     dim)
            accumulator, noise = st.accumulator, st.noise

            particle_theta = theta[None, :] + sign * _twin(noise)
            step_keys = _twin(noise_lib.pair_seeds(seed, noise_lib.STREAM_STEP, pair_index,
                                                   st.steps))
            new_sys, loss, done = system.step(sys_state, particle_theta, step_keys)
            loss = tf.reshape(tf.cast(loss, tf.float32), [2 * num_pairs])
            sys_state = select(_twin(active), new_sys, sys_state)

            plus, minus = loss[0::2], loss[1::2]
            finite = tf.math.is_finite(plus) & tf.math.is_finite(minus)
            ok = active & finite
            difference = tf.where(ok, plus - minus, 0.0)
            if self.clip_loss_difference is not None:
                c = self.clip_loss_difference
                difference = tf.clip_by_value(difference, -c, c)
            if credit and not final:
                credit_sum += difference[:, None] * accumulator
            diff_sum += difference
            loss_sum += tf.reduce_sum(tf.where(ok, plus + minus, 0.0))
            loss_count += 2.0 * tf.reduce_sum(tf.cast(ok, tf.float32))
            bad = active & ~finite
            invalid |= bad
            diverged += tf.reduce_sum(tf.cast(bad, tf.int32))

            episode_step = st.episode_step + tf.cast(active, tf.int32)
            ended = tf.zeros_like(active)
            if horizon is not None:
                ended = episode_step >= horizon
            if done is not None:
                done = tf.reshape(tf.cast(done, tf.bool), [2 * num_pairs])
                ended = ended | done[0::2] | done[1::2]
            ended = active & ended & finite
            st = st._replace(episode_step=episode_step,
                             steps=st.steps + tf.cast(active, tf.int32))

            if final:
                # Telescoping at an episode end inside the window: credit the episode's
                # final difference against the one stored at the previous window end.
                def telescope_end():
                    _, part, f_ok = _telescoped(st, *meta_losses(sys_state, st),
                                                self.clip_loss_difference)
                    return tf.where((ended & f_ok)[:, None], part, 0.0), ended & ~f_ok

                part, f_bad = tf.cond(tf.reduce_any(ended), telescope_end,
                                      lambda: (tf.zeros_like(credit_sum), tf.zeros_like(ended)))
                if credit:
                    credit_sum += part
                invalid |= f_bad
                diverged += tf.reduce_sum(tf.cast(f_bad, tf.int32))
                bad = bad | f_bad
                st = st._replace(
                    final_difference=tf.where(ended | bad, 0.0, st.final_difference),
                    final_accumulator=tf.where((ended | bad)[:, None], 0.0, st.final_accumulator))

            restart = ended | bad
            sys_state, st = self._restart(system, sys_state, st, restart, seed, pair_index)
            return (s + 1, sys_state, st, credit_sum, diff_sum, loss_sum, loss_count,
                    invalid, diverged)

        zeros_pairs = tf.zeros([num_pairs], tf.float32)
        carry = (tf.constant(0), system_state, state,
                 tf.zeros([num_pairs, dim], tf.float32), zeros_pairs,
                 tf.constant(0.0), tf.constant(0.0),
                 tf.zeros([num_pairs], tf.bool), tf.constant(0, tf.int32))
        carry = tf.while_loop(lambda s, *_: s < num_steps, body, carry,
                              maximum_iterations=num_steps)
        (_, system_state, state, credit_sum, diff_sum, loss_sum, loss_count, invalid,
         diverged) = carry

        meta_sum = meta_count = tf.constant(0.0)
        if final:
            # Window-end telescoping term for pairs inside an episode (a pair that has
            # just restarted is at F_0 = 0 and contributes nothing).
            f_plus, f_minus = meta_losses(system_state, state)
            inside = state.episode_step > 0
            d, part, f_ok = _telescoped(state, f_plus, f_minus, self.clip_loss_difference)
            # The spread used by ``normalize`` is that of the credited differences.
            diff_sum = tf.where(inside & f_ok, d, 0.0)
            if self.telescope:
                if credit:
                    credit_sum += tf.where((inside & f_ok)[:, None], part, 0.0)
                state = state._replace(
                    final_difference=tf.where(inside & f_ok, d, 0.0),
                    final_accumulator=tf.where((inside & f_ok)[:, None], state.accumulator,
                                               0.0))
            f_bad = inside & ~f_ok
            invalid |= f_bad
            diverged += tf.reduce_sum(tf.cast(f_bad, tf.int32))
            system_state, state = self._restart(system, system_state, state, f_bad, seed,
                                                pair_index)
            both = tf.concat([f_plus, f_minus], 0)
            both_ok = tf.concat([f_ok, f_ok], 0)
            meta_sum = tf.reduce_sum(tf.where(both_ok, both, 0.0))
            meta_count = tf.reduce_sum(tf.cast(both_ok, tf.float32))

        # A state that went non-finite in the window's last step (its loss, computed
        # before the update, was still finite) would be caught only in the next window,
        # after a checkpoint could have saved it: restart that pair now.
        broken = ~_finite_particles(system_state, num_pairs) & ~invalid & (wait < num_steps)
        invalid |= broken
        diverged += tf.reduce_sum(tf.cast(broken, tf.int32))
        system_state, state = self._restart(system, system_state, state, broken, seed,
                                            pair_index)
        # Pairs that waited the whole window (`window(active=...)`) are not counted, nor
        # pairs whose finite losses overflowed their difference or their credit (huge
        # but finite losses): left out by name rather than zeroing the whole estimate.
        overflowed = ~(tf.reduce_all(tf.math.is_finite(credit_sum), axis=1)
                       & tf.math.is_finite(diff_sum))
        valid = ~invalid & ~overflowed & (wait < num_steps)
        pair_gradients = tf.where(valid[:, None], credit_sum, 0.0) / (2.0 * self.sigma ** 2)
        partials = WindowPartials(
            pair_gradients=pair_gradients, differences=diff_sum, valid=valid,
            loss_sum=loss_sum, loss_count=loss_count, meta_sum=meta_sum,
            meta_count=meta_count, diverged=diverged)
        return system_state, state, partials

    def _restart(self, system, sys_state, st, restart, seed, pair_index):
        """Starts a new episode for the pairs in ``restart`` (both twins, same key)."""
        episode = st.episode + tf.cast(restart, tf.int32)
        keys = _twin(noise_lib.pair_seeds(seed, noise_lib.STREAM_EPISODE, pair_index, episode))
        sys_state = tf.cond(tf.reduce_any(restart),
                            lambda: system.reset(sys_state, _twin(restart), keys),
                            lambda: sys_state)
        st = st._replace(episode=episode,
                         episode_step=tf.where(restart, 0, st.episode_step))
        return sys_state, st


# ---------------------------------------------------------------------- factories
def full_es(sigma: float, horizon: int, objective: str = "sum", **kwargs) -> Estimator:
    """Full-unroll ES: one perturbation per pair, one whole episode per estimate.

    Unbiased for the Gaussian-smoothed objective; one update every ``horizon`` steps.
    """
    checks.positive_int("horizon", horizon)
    for fixed in ("stagger", "truncation_length", "resample", "accumulate"):
        if fixed in kwargs:
            raise ValueError(f"full_es() sets {fixed} itself (got {fixed}={kwargs[fixed]!r}): "
                             "one window is one whole, unstaggered episode.")
    return Estimator("full_es", sigma, truncation_length=horizon, horizon=horizon,
                     resample="episode", accumulate=False, objective=objective,
                     stagger=False, **kwargs)


def truncated_es(sigma: float, truncation_length: int, horizon: int | None = None,
                 objective: str = "sum", **kwargs) -> Estimator:
    """Truncated ES: fresh noise each window, credited only to that window.

    Biased: it ignores how the window's start state depends on theta. Provided as the
    baseline the unbiased estimators are measured against.
    """
    return Estimator("truncated_es", sigma, truncation_length, horizon, resample="window",
                     accumulate=False, objective=objective, **kwargs)


def pes(sigma: float, truncation_length: int, horizon: int | None = None,
        resample_interval: int | None = None, objective: str = "sum", **kwargs) -> Estimator:
    """Persistent ES (Vicol et al., 2021): fresh noise each window (or every
    ``resample_interval`` = M steps of the episode), accumulated over the episode.

    Unbiased for the PES-smoothed objective. ``resample_interval=1`` is per-step PES;
    ``resample_interval >= horizon`` is ES-Single.
    """
    resample = "window" if resample_interval is None else resample_interval
    return Estimator("pes", sigma, truncation_length, horizon, resample=resample,
                     accumulate=True, objective=objective, **kwargs)


def es_single(sigma: float, truncation_length: int, horizon: int | None = None,
              objective: str = "sum", **kwargs) -> Estimator:
    """ES-Single / Noise-Reuse ES (Li et al., 2023): one perturbation per pair and
    episode, reused in every window.

    Unbiased for the same smoothed objective as full ES, with a variance that does not
    grow with the number of windows. Its online estimates over an episode sum to the
    full-unroll ES estimate on the same noise.
    """
    return Estimator("es_single", sigma, truncation_length, horizon, resample="episode",
                     accumulate=False, objective=objective, **kwargs)


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
            ``normalize``, ``clip_outliers``) and ``resample_interval`` for ``"pes"``.

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
    if isinstance(estimator, Estimator):
        given = sorted(k for k, v in settings.items() if v is not None)
        if given:
            raise ValueError(
                f"estimator={estimator.name!r} is an Estimator, which carries its own "
                f"settings, but {given} were given too; pass them to its factory instead "
                f"(e.g. keras_es.{estimator.name}(sigma=...)).")
        return estimator
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid; expected one of "
                         f"{sorted(ESTIMATORS)} or a keras_es Estimator.")
    values = {k: (DEFAULTS[k] if settings.get(k) is None else settings[k]) for k in DEFAULTS}
    extra = {k: v for k, v in options.items() if v is not None}
    common = {"objective": values["meta_objective"], "telescope": values["telescope"],
              "guided": guided, **extra}
    if estimator == "full_es":
        return full_es(values["sigma"], horizon=horizon or values["truncation_length"],
                       **common)
    return ESTIMATORS[estimator](values["sigma"], values["truncation_length"],
                                 horizon=horizon, **common)


# ---------------------------------------------------------------------- helpers
def _sign(num_pairs: int) -> tf.Tensor:
    """``[2 pairs, 1]``: +1 for particle ``2p``, -1 for ``2p + 1``."""
    return tf.tile(tf.constant([1.0, -1.0]), [num_pairs])[:, None]


def _twin(x: tf.Tensor) -> tf.Tensor:
    """Repeats per-pair rows for the two twins: ``[pairs, ...] -> [2 pairs, ...]``."""
    return tf.repeat(x, 2, axis=0)


def _telescoped(state, f_plus, f_minus, clip):
    """Telescoping term ``dF_j xi_j - dF_{j-1} xi_{j-1}`` per pair.

    Returns ``(dF_j, term, finite)`` where ``finite`` marks pairs whose meta-losses are
    finite (the others get ``dF_j = 0`` and must not be credited). ``dF_j`` is clipped
    to ``[-clip, clip]`` when ``clip`` is set.
    """
    finite = tf.math.is_finite(f_plus) & tf.math.is_finite(f_minus)
    difference = tf.where(finite, f_plus - f_minus, 0.0)
    if clip is not None:
        difference = tf.clip_by_value(difference, -clip, clip)
    term = (difference[:, None] * state.accumulator
            - state.final_difference[:, None] * state.final_accumulator)
    return difference, term, finite


def _finite_particles(system_state, num_pairs: int) -> tf.Tensor:
    """bool ``[pairs]``: both twins' floating-point state leaves are finite."""
    ok = tf.ones([2 * num_pairs], tf.bool)
    for leaf in tf.nest.flatten(system_state):
        leaf = tf.convert_to_tensor(leaf)
        if leaf.dtype.is_floating and leaf.shape.rank and leaf.shape[0] == 2 * num_pairs:
            flat = tf.reshape(leaf, [2 * num_pairs, -1])
            ok &= tf.reduce_all(tf.math.is_finite(flat), axis=1)
    return ok[0::2] & ok[1::2]


def _masked_median(x, mask):
    """The upper median of ``x`` where ``mask``; 0 where ``mask`` is empty. (Upper: with
    few pairs, the lower one of an even count understates the scale.)"""
    count = tf.reduce_sum(tf.cast(mask, tf.int32))
    ordered = tf.sort(tf.where(mask, x, tf.float32.max))
    return tf.where(count > 0, tf.gather(ordered, count // 2), 0.0)


def _masked_std(x, mask):
    m = tf.cast(mask, tf.float32)
    n = tf.maximum(tf.reduce_sum(m), 1.0)
    mean = tf.reduce_sum(x * m) / n
    return tf.sqrt(tf.reduce_sum(tf.square(x - mean) * m) / n)
