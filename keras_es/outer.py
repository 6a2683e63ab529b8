"""The outer loop: meta-train theta for any unrolled system with a Keras optimizer."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_es import checks, keras_compat
from keras_es import distribute as distribute_lib
from keras_es.estimators import Estimator, EstimatorState, resolve
from keras_es.transforms import SearchSpace
from keras_es.unrolled import UnrolledSystem

# Raw theta vectors longer than this are logged by their norm, not per coordinate.
MAX_LOGGED_COORDINATES = 16


class MetaTrainer:
    """Meta-trains hyperparameters ``theta`` of an unrolled system with ES estimates.

    Each `step` runs one truncated window of K steps for every particle, forms the
    estimate, and applies it to ``theta`` with a Keras optimizer. All of it is one
    ``tf.function``, traced once. `save` and `restore` checkpoint a run between any
    two steps.

    Under a ``tf.distribute`` strategy (``strategy=...``, or the one whose
    ``scope()`` the trainer is built in) the pairs are sharded over the replicas: each
    runs its share, vectorized, regenerating its pairs' noise from integers, and the
    replicas exchange only a ``dim``-sized partial estimate per step. theta and the
    outer optimizer are mirrored, updated identically on every replica. The same seed
    gives the same theta trajectory on any number of replicas, up to float rounding
    (sums are taken in a different order). Checkpoints hold every pair in global order
    whatever the strategy, so a run saved under one strategy restores under another
    with the same ``num_particles``. See the distribution guide.

    Example:

    ```python
    import keras
    import keras_es
    from keras_es.systems import influence_balancing

    trainer = keras_es.MetaTrainer(
        influence_balancing(), keras_es.es_single(sigma=0.1, truncation_length=10,
                                                  horizon=100),
        theta=[0.5], num_particles=8, outer_optimizer=keras.optimizers.Adam(1e-2))
    history = trainer.train(5)      # {"loss": [...], "theta_0": [...], ...}
    trainer.values                  # theta; a {name: value} dict for a SearchSpace
    ```

    Args:
        system: The `UnrolledSystem` (inner problem).
        estimator: An `Estimator` (``keras_es.es_single(...)``, ...), or a name
            (``"es_single"``, ``"pes"``, ``"truncated_es"``, ``"full_es"``) with the
            settings below, as every front end takes it (`keras_es.estimators.resolve`).
        theta: Initial unconstrained hyperparameters ``[dim]``, or a
            `SearchSpace` (its declared values are encoded
            and `values` decodes theta back to natural units).
        num_particles: N, an even number (antithetic pairs).
        outer_optimizer: A Keras optimizer for theta; default
            `default_outer_optimizer` (``Adam(0.01)``), as in `keras_es.ESCallback` and
            `keras_es.ESOracle`: its steps are bounded by its learning rate, so no
            single estimate can throw theta far. (``optimizer=`` is its old name.)
        seed: Integer seed from which every perturbation, data key and
            re-initialization key is derived.
        surrogate: Optional tensor function pushed into the guided FIFO before every
            window (needs ``estimator.guided``): ``surrogate(theta, outer_step) -> [dim]``,
            or ``surrogate(theta, outer_step, system_state)`` to read the particles'
            current states (every particle, as `system_state` returns them; one device
            only), e.g. a one-step hypergradient of a particle's weights.
        jit_compile: Compile the particles' steps with XLA.
        strategy: A ``tf.distribute.Strategy`` to shard the particles over; default
            the current one (``tf.distribute.get_strategy()``: one device unless the
            trainer is built inside a ``strategy.scope()``). ``num_particles`` must be
            a multiple of 2 x replicas, and a given ``outer_optimizer`` must be created
            inside ``strategy.scope()``.
        **settings: With an estimator name: ``sigma``, ``truncation_length``,
            ``horizon``, ``meta_objective``, ``telescope``, ``guided`` and the other
            keywords of `keras_es.estimators.resolve`, with its defaults.
    """

    def __init__(self, system: UnrolledSystem, estimator: str | Estimator, theta,
                 num_particles: int, outer_optimizer: keras.optimizers.Optimizer | None = None,
                 seed: int = 0, surrogate: Callable | None = None, jit_compile: bool = False,
                 strategy: tf.distribute.Strategy | None = None, *, optimizer=None,
                 **settings):
        if optimizer is not None:
            if outer_optimizer is not None:
                raise ValueError("optimizer= and outer_optimizer= were both given; optimizer= "
                                 "is the old name of outer_optimizer=: pass one.")
            warnings.warn("MetaTrainer(optimizer=...) is now outer_optimizer=..., the name "
                          "every keras_es front end uses.", DeprecationWarning, stacklevel=2)
            outer_optimizer = optimizer
        estimator = resolve(estimator, **settings)
        strategy = _check_arguments(system, estimator, num_particles, outer_optimizer, seed,
                                    surrogate, jit_compile, strategy)
        self._surrogate_reads_state = surrogate is not None and _takes_state(surrogate)
        self.space = theta if isinstance(theta, SearchSpace) else None
        initial = self.space.encode() if self.space else np.asarray(theta, np.float32)
        if initial.ndim != 1 or initial.size == 0 or not np.all(np.isfinite(initial)):
            raise ValueError(f"theta={theta!r} is invalid; expected a non-empty finite vector.")
        self.system, self.estimator, self.strategy = system, estimator, strategy
        self.num_pairs = num_particles // 2
        self.seed = int(seed)
        self.surrogate = surrogate
        self.jit_compile = bool(jit_compile)
        with strategy.scope():  # mirrored meta-state: one identical copy per replica
            self.optimizer = outer_optimizer or default_outer_optimizer()
            self.theta = keras.Variable(initial.astype(np.float32), name="theta")
            self.optimizer.build([self.theta])
            self.outer_step = tf.Variable(0, dtype=tf.int64, name="outer_step")
        pairs_per_replica = self.num_pairs // strategy.num_replicas_in_sync
        # autograph=False here and below: keras_es writes its graph control flow
        # explicitly (tf.while_loop, tf.cond), and AutoGraph's source transformation of
        # every function reached (Keras layers included) was 3/4 of a first step's time.
        particles = tf.function(self._start, autograph=False)(tf.constant(initial))
        self._check_layout(particles, pairs_per_replica)
        rows = (tf.nest.map_structure(lambda _: 2 * pairs_per_replica, particles[0]),
                estimator.state_rows(particles[1], pairs_per_replica))
        self._particles = distribute_lib.ShardedParticles(strategy, particles, rows)
        self._step_fn = tf.function(self._step, autograph=False)

    def _start(self, theta):
        """Every replica's initial particle and estimator states, burned in."""
        pairs = self.num_pairs // self.strategy.num_replicas_in_sync

        def replica():
            shard = distribute_lib.replica_shard(self.num_pairs)
            system_state = self.estimator.init_system(self.system, pairs, self.seed,
                                                      first_pair=shard.first_pair)
            state = self.estimator.init(pairs, int(theta.shape[0]))
            # A burn-in can be as long as a whole episode: compiled with the step.
            return self.estimator.burn_in(self.system, system_state, state, theta,
                                          self.seed, shard, self.jit_compile)
        return self.strategy.run(replica)

    # ------------------------------------------------------------------ public
    @property
    def dim(self) -> int:
        return int(self.theta.shape[0])

    @property
    def theta_value(self) -> np.ndarray:
        """The current unconstrained theta as a NumPy array."""
        return np.asarray(self.theta.numpy())

    @property
    def values(self) -> dict | np.ndarray:
        """theta decoded to natural units (a dict when built from a SearchSpace)."""
        return self.space.decode(self.theta_value) if self.space else self.theta_value

    @property
    def state(self) -> EstimatorState:
        """The estimator's current `EstimatorState`, every pair in global order
        (gathered from the replicas under a strategy)."""
        return self._particles.gather()[1]

    @property
    def system_state(self):
        """The particles' current states, every particle in global order."""
        return self._particles.gather()[0]

    @property
    def particles(self) -> distribute_lib.ShardedParticles:
        """The per-replica particle and estimator states, as one
        `keras_es.distribute.ShardedParticles`: ``particles.gather()`` gives
        ``(system_state, state)`` with every pair in global order."""
        return self._particles

    def concrete_step(self):
        """The traced outer step (one window and one update of theta) as a
        ``tf.types.experimental.ConcreteFunction``, for reading its graph (see
        `keras_es.distribute.collective_payloads`); nothing is run."""
        return self._step_fn.get_concrete_function(self._particles.values)

    def step(self) -> dict:
        """One window and one update of theta; returns that window's logs."""
        self._particles.values, result, updated = self._step_fn(self._particles.values)
        logs = {
            "outer_step": int(self.outer_step.numpy()),
            "loss": float(result.loss),
            "meta_loss": float(result.meta_loss),
            # In float64: the norm of a huge but finite estimate must not read inf.
            "gradient_norm": float(np.linalg.norm(result.gradient.numpy().astype(np.float64))),
            "valid_pairs": int(result.valid_pairs),
            "diverged_pairs": int(result.diverged_pairs),
            "clipped_pairs": int(result.clipped_pairs),
            # False when the update was skipped or undone (see `outer_update`).
            "updated": bool(updated),
        }
        if self.estimator.learn_sigma is not None:
            logs.update(_sigma_logs(result.sigma.numpy()))
        theta = self.theta_value
        if self.space:
            logs.update(self.space.decode(theta))
        elif theta.size <= MAX_LOGGED_COORDINATES:
            logs.update({f"theta_{i}": float(v) for i, v in enumerate(theta)})
        else:
            logs["theta_norm"] = float(np.linalg.norm(theta))
        return logs

    def train(self, num_steps: int, verbose: int = 0, callback: Callable | None = None) -> dict:
        """Runs ``num_steps`` outer steps; returns a history ``{log name: [values]}``.

        Args:
            num_steps: Outer steps (windows) to run.
            verbose: 0 silent, 1 a Keras progress bar.
            callback: Optional ``callback(logs)`` called after every step.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps={num_steps!r} is invalid; expected an integer >= 0.")
        history: dict[str, list] = {}
        shown = ("loss", "meta_loss", "gradient_norm")
        # Stateful: the bar shows each step's value, not a running mean since the start.
        bar = keras.utils.Progbar(num_steps, stateful_metrics=shown) if verbose else None
        for i in range(num_steps):
            logs = self.step()
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            if callback is not None:
                callback(logs)
            if bar is not None:
                bar.update(i + 1, [(k, logs[k]) for k in shown if math.isfinite(logs[k])])
        return history

    def finalize(self) -> None:
        """Replaces theta by the outer optimizer's moving average of it, if the optimizer
        keeps one (``use_ema=True``), as Keras's ``fit`` does for model weights at the
        end of training. Averaging the last ~``1 / (1 - ema_momentum)`` updates removes
        most of the jitter ES noise leaves in theta."""
        if self.optimizer.use_ema:
            self.optimizer.finalize_variable_values([self.theta])

    def checkpoint(self) -> tf.train.Checkpoint:
        """A ``tf.train.Checkpoint`` of theta, the optimizer and every particle state
        (particles in global order, whatever the strategy)."""
        return tf.train.Checkpoint(theta=self.theta, optimizer=self.optimizer,
                                   outer_step=self.outer_step, particles=self._particles)

    def save(self, path: str) -> str:
        """Writes a checkpoint; returns its path prefix.

        Under a multi-worker strategy every worker must call it (the particle shards
        are gathered); the chief writes ``path``, the others a scratch copy they delete.
        """
        return distribute_lib.write_checkpoint(self.strategy, self.checkpoint(), path)

    def restore(self, path: str) -> None:
        """Restores a checkpoint written by `save` of an identically built trainer
        (same system, estimator, seed and ``num_particles``; any strategy), or by
        keras_es 0.1/0.2."""
        if not self._restore_earlier_layout(path):
            self.checkpoint().read(path).assert_consumed()

    # ------------------------------------------------------------------ internals
    def _step(self, particles):
        surrogate = None
        if self.surrogate is not None:
            args = [tf.convert_to_tensor(self.theta), self.outer_step]
            if self._surrogate_reads_state:
                # Passed in, not read from self: a tf.function would capture the state
                # at trace time as a constant and every later window reuse it.
                args.append(particles[0])
            surrogate = tf.reshape(tf.cast(self.surrogate(*args), tf.float32), [self.dim])

        def replica(particles):
            system_state, state = particles
            theta = tf.convert_to_tensor(self.theta)  # this replica's mirror
            if surrogate is not None:
                state = self.estimator.push_surrogate(state, surrogate)
            system_state, state, result = self.estimator.window(
                self.system, system_state, state, theta, self.seed,
                distribute_lib.replica_shard(self.num_pairs), self.jit_compile)
            # pair_gradients stay on the replica: only reduced values leave it.
            return (system_state, state), result._replace(pair_gradients=tf.zeros([0]),
                                                          pair_sigma_gradients=())

        particles, result = self.strategy.run(replica, args=(particles,))
        # Every replica holds the same reduced result; read the first local one.
        result = tf.nest.map_structure(
            lambda v: self.strategy.experimental_local_results(v)[0], result)
        applied = outer_update(self.optimizer, self.theta, result.gradient, result.valid_pairs)
        self.outer_step.assign_add(1)
        return particles, result, applied

    def _restore_earlier_layout(self, path: str) -> bool:
        """Restores a checkpoint whose particle tensors are in an earlier layout (keras_es
        0.1 and 0.2 kept one flat estimator state); False if it is in this one."""
        reader = tf.train.load_checkpoint(path)
        prefix = "particles/.ATTRIBUTES/leaf_"
        count = sum(1 for key in reader.get_variable_to_shape_map()
                    if key.startswith(prefix) and key[len(prefix):].isdigit())
        # The per-replica values have the global states' structure: no gather (an
        # all-gather across workers) unless the layout is an earlier one.
        if count == len(tf.nest.flatten(self._particles.values)):
            return False
        system_state, template = self._particles.gather()
        saved = [reader.get_tensor(f"{prefix}{i}") for i in range(count)]
        n = len(tf.nest.flatten(system_state))
        system_state = tf.nest.pack_sequence_as(
            system_state, [tf.constant(v) for v in saved[:n]])
        state = self.estimator.restore_state(saved[n:], template)
        tf.train.Checkpoint(theta=self.theta, optimizer=self.optimizer,
                            outer_step=self.outer_step).read(path).expect_partial()
        self._particles.scatter((system_state, state))
        return True

    def _check_layout(self, particles, pairs_per_replica):
        for leaf in tf.nest.flatten(particles[0]):
            local = self.strategy.experimental_local_results(leaf)[0]
            if local.shape.rank == 0 or local.shape[0] != 2 * pairs_per_replica:
                raise ValueError(
                    f"{type(self.system).__name__}.init returned a state leaf of shape "
                    f"{local.shape}; expected a leading particle dimension of "
                    f"{2 * pairs_per_replica} (num_particles per replica) on every leaf.")


#: The outer learning rate of every front end's default outer optimizer.
DEFAULT_OUTER_LEARNING_RATE = 0.01


def default_outer_optimizer(learning_rate: float = DEFAULT_OUTER_LEARNING_RATE):
    """The outer optimizer `MetaTrainer`, `keras_es.ESCallback` and `keras_es.ESOracle`
    use when none is given: ``keras.optimizers.Adam(learning_rate)`` (Adam, so the step
    in theta does not depend on the scale of the losses). Create it inside a strategy's
    scope where one is used."""
    return keras.optimizers.Adam(learning_rate)


def outer_learning_rate_for(outer_steps: int | None) -> float:
    """The outer learning rate `keras_es.ESSearch` and `keras_es.ESCallback` use when
    none is given, from the outer steps the run will take: ``1 / sqrt(outer_steps)``
    within [0.01, 0.3] (`DEFAULT_OUTER_LEARNING_RATE` when unknown). Adam moves each
    coordinate of theta by about its learning rate per step, and the middle half of a
    range is about 2.2 units of theta wide: a short run needs large steps to get
    anywhere, a long one small steps that average its estimates' noise (measured with
    ``benchmarks/tuning_quality.py``, where 0.01 left a search with the budget of six
    training runs near its start)."""
    if not outer_steps:
        return DEFAULT_OUTER_LEARNING_RATE
    return float(min(0.3, max(0.01, 1.0 / math.sqrt(outer_steps))))


_LARGEST_ESTIMATE = 1e15


def outer_update(optimizer: keras.optimizers.Optimizer, theta: keras.Variable, gradient,
                 valid_pairs) -> tf.Tensor:
    """Applies one ES estimate to ``theta`` with ``optimizer``, unless it would do harm.

    The one outer-update rule of every front end (`MetaTrainer`, `keras_es.ESCallback`
    through it, and `keras_es.ESOracle`), eager or inside a ``tf.function``:

    * no valid pair (every pair diverged): skipped, since the estimate carries no
      information and a momentum optimizer (Adam) would otherwise keep coasting on its
      zero gradient, out of the region where the particles diverge and on into
      wherever it points;
    * a non-finite estimate: skipped; one with a coordinate beyond 1e15 is scaled down
      to that size first (its square must not overflow float32 in Adam's slots);
    * an update that leaves theta or any optimizer variable non-finite (a finite but
      huge estimate overflows Adam's second moment, or a huge learning rate overflows
      theta): undone, theta *and* the optimizer's slots restored, so one outlier never
      freezes every later update.

    Returns:
        A bool tensor: whether theta was updated.
    """
    gradient = tf.convert_to_tensor(gradient, tf.float32)
    # An estimate whose square would overflow float32 (losses of 1e30 near divergence)
    # is scaled down first, its direction kept: Adam's second moment would otherwise be
    # inf and the update undone, however many pairs were valid.
    largest = tf.reduce_max(tf.abs(gradient))
    gradient = tf.where(largest > _LARGEST_ESTIMATE,
                        gradient * (_LARGEST_ESTIMATE / largest), gradient)
    variables = [theta] + list(optimizer.variables)

    def update():
        before = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
        with tf.control_dependencies(before):
            optimizer.apply([gradient], [theta])
        after = [tf.convert_to_tensor(v) for v in variables]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(v, tf.float32)))
                                for v in after])

        def undo():
            with tf.control_dependencies(after):
                for variable, value in zip(variables, before, strict=True):
                    variable.assign(value)
            return tf.constant(False)

        return tf.cond(finite, lambda: tf.constant(True), undo)

    usable = tf.logical_and(tf.convert_to_tensor(valid_pairs) > 0,
                            tf.reduce_all(tf.math.is_finite(gradient)))
    return tf.cond(usable, update, lambda: tf.constant(False))


def _check_arguments(system, estimator, num_particles, outer_optimizer, seed, surrogate,
                     jit_compile, strategy) -> tf.distribute.Strategy:
    """`MetaTrainer`'s argument checks, before any work; returns the strategy."""
    if not isinstance(system, UnrolledSystem):
        raise ValueError(f"system={system!r} is invalid; expected a keras_es.UnrolledSystem.")
    checks.num_particles(num_particles)
    checks.seed(int(seed) if isinstance(seed, np.integer) else seed)
    checks.optimizer("outer_optimizer", outer_optimizer)
    checks.boolean("jit_compile", jit_compile)
    if surrogate is not None and estimator.guided is None:
        raise ValueError("surrogate was given but estimator.guided is None; build the "
                         "estimator with guided=keras_es.GuidedConfig(...).")
    if estimator.objective == "final" and type(system).meta_loss is UnrolledSystem.meta_loss:
        raise ValueError(f"The estimator's objective 'final' (meta_objective='final') "
                         f"needs {type(system).__name__}.meta_loss(); implement it or use "
                         "'sum'.")
    strategy = distribute_lib.check_strategy(strategy, num_particles)
    if surrogate is not None and _takes_state(surrogate) and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            "surrogate takes the particles' system_state, which a strategy of "
            f"{strategy.num_replicas_in_sync} replicas keeps split across devices; use "
            "one device or a surrogate(theta, outer_step).")
    if outer_optimizer is not None and \
            keras_compat.optimizer_strategy(outer_optimizer, strategy) is not strategy:
        # Keras optimizers bind to the strategy current when they are created.
        raise ValueError(
            f"outer_optimizer={type(outer_optimizer).__name__}(...) was created outside the "
            f"scope of strategy={type(strategy).__name__}; create it inside "
            "`with strategy.scope():` (or leave it None).")
    return strategy


def _sigma_logs(sigma: np.ndarray) -> dict:
    """A learned sigma after the window's update: ``sigma`` (one shared, or the mean of
    more than `MAX_LOGGED_COORDINATES`), else ``sigma_0``, ``sigma_1``, ..."""
    if sigma.size == 1 or sigma.size > MAX_LOGGED_COORDINATES:
        return {"sigma": float(np.mean(sigma))}
    return {f"sigma_{i}": float(v) for i, v in enumerate(sigma)}


def _takes_state(function) -> bool:
    """Whether ``function`` has a third positional parameter (``system_state``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the short form
        return False
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3
