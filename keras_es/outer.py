"""The outer loop: meta-train theta for any unrolled system with a Keras optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_es import checks
from keras_es.estimators import Estimator
from keras_es.transforms import SearchSpace
from keras_es.unrolled import UnrolledSystem

# Raw theta vectors longer than this are logged by their norm, not per coordinate.
MAX_LOGGED_COORDINATES = 16


class MetaTrainer:
    """Meta-trains hyperparameters ``theta`` of an unrolled system with ES estimates.

    Each `step` runs one truncated window of K steps for every particle, forms the
    estimate, and applies it to ``theta`` with a Keras optimizer. All of it is one
    ``tf.function``, traced once. Particle and estimator states live in ``tf.Variable``
    objects, so `save` and `restore` checkpoint a run between any two steps.

    Example:

    ```python
    trainer = keras_es.MetaTrainer(
        system, keras_es.es_single(sigma=0.1, truncation_length=10, horizon=200),
        theta=space, num_particles=64, optimizer=keras.optimizers.Adam(1e-2))
    history = trainer.train(500)
    trainer.values      # {"learning_rate": ..., ...} in natural units
    ```

    Args:
        system: The `UnrolledSystem` (inner problem).
        estimator: An `Estimator` (``es_single(...)``, ...).
        theta: Initial unconstrained hyperparameters ``[dim]``, or a
            `SearchSpace` (its declared values are encoded
            and `values` decodes theta back to natural units).
        num_particles: N, an even number (antithetic pairs).
        optimizer: A Keras optimizer for theta; default ``SGD(learning_rate=0.01)``.
        seed: Integer seed from which every perturbation, data key and
            re-initialization key is derived.
        surrogate: Optional ``surrogate(theta, outer_step) -> [dim]`` tensor function,
            pushed into the guided FIFO before every window (needs ``estimator.guided``).
        jit_compile: Compile the outer step with XLA.
    """

    def __init__(self, system: UnrolledSystem, estimator: Estimator,
                 theta, num_particles: int, optimizer: keras.optimizers.Optimizer | None = None,
                 seed: int = 0, surrogate: Callable | None = None, jit_compile: bool = False):
        if not isinstance(estimator, Estimator):
            raise ValueError(f"estimator={estimator!r} is invalid; expected a keras_es Estimator "
                             "such as keras_es.es_single(...).")
        if not isinstance(system, UnrolledSystem):
            raise ValueError(f"system={system!r} is invalid; expected a keras_es.UnrolledSystem.")
        checks.num_particles(num_particles)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed={seed!r} is invalid; expected an integer.")
        if surrogate is not None and estimator.guided is None:
            raise ValueError("surrogate was given but estimator.guided is None; build the "
                             "estimator with guided=keras_es.GuidedConfig(...).")
        if estimator.objective == "final" and type(system).meta_loss is UnrolledSystem.meta_loss:
            raise ValueError(f"objective='final' needs {type(system).__name__}.meta_loss(); "
                             "implement it or use objective='sum'.")
        self.space = theta if isinstance(theta, SearchSpace) else None
        initial = self.space.encode() if self.space else np.asarray(theta, np.float32)
        if initial.ndim != 1 or initial.size == 0 or not np.all(np.isfinite(initial)):
            raise ValueError(f"theta={theta!r} is invalid; expected a non-empty finite vector.")
        self.system = system
        self.estimator = estimator
        self.num_pairs = num_particles // 2
        self.seed = int(seed)
        self.surrogate = surrogate
        self.optimizer = optimizer or keras.optimizers.SGD(learning_rate=0.01)
        self.theta = keras.Variable(initial.astype(np.float32), name="theta")
        self.optimizer.build([self.theta])
        self.outer_step = tf.Variable(0, dtype=tf.int64, name="outer_step")

        system_state = estimator.init_system(system, self.num_pairs, self.seed)
        state = estimator.init(self.num_pairs, initial.size)
        # Compiled: a burn-in can be as long as a whole episode.
        burn_in = tf.function(
            lambda s, st: estimator.burn_in(system, s, st, tf.constant(initial), self.seed),
            jit_compile=jit_compile, autograph=False)
        if int(tf.reduce_max(estimator.start_offsets(self.num_pairs))) > 0:
            system_state, state = burn_in(system_state, state)
        self._system_vars = tf.nest.map_structure(_variable, system_state)
        self._state_vars = tf.nest.map_structure(_variable, state)
        # autograph=False: keras_es writes its graph control flow explicitly
        # (tf.while_loop, tf.cond), and AutoGraph's source transformation of every
        # function reached (Keras layers included) was 3/4 of the first step's time.
        self._step_fn = tf.function(self._step, jit_compile=jit_compile, autograph=False)

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
    def state(self):
        """The estimator's current `EstimatorState`."""
        return tf.nest.map_structure(tf.convert_to_tensor, self._state_vars)

    @property
    def system_state(self):
        """The particles' current states."""
        return tf.nest.map_structure(tf.convert_to_tensor, self._system_vars)

    def step(self) -> dict:
        """One window and one update of theta; returns that window's logs."""
        result = self._step_fn()
        logs = {
            "outer_step": int(self.outer_step.numpy()),
            "loss": float(result.loss),
            "meta_loss": float(result.meta_loss),
            "gradient_norm": float(tf.norm(result.gradient)),
            "valid_pairs": int(result.valid_pairs),
            "diverged_pairs": int(result.diverged_pairs),
        }
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
        """A ``tf.train.Checkpoint`` of theta, the optimizer and every particle state."""
        return tf.train.Checkpoint(theta=self.theta, optimizer=self.optimizer,
                                   outer_step=self.outer_step,
                                   system=tf.nest.flatten(self._system_vars),
                                   estimator=tf.nest.flatten(self._state_vars))

    def save(self, path: str) -> str:
        """Writes a checkpoint; returns its path prefix."""
        return self.checkpoint().write(path)

    def restore(self, path: str) -> None:
        """Restores a checkpoint written by `save` of an identically built trainer."""
        self.checkpoint().read(path).assert_consumed()

    # ------------------------------------------------------------------ internals
    def _step(self):
        read = lambda v: tf.convert_to_tensor(v)  # noqa: E731
        system_state = tf.nest.map_structure(read, self._system_vars)
        state = tf.nest.map_structure(read, self._state_vars)
        theta = tf.convert_to_tensor(self.theta)
        if self.surrogate is not None:
            surrogate = tf.reshape(tf.cast(self.surrogate(theta, self.outer_step), tf.float32),
                                   [self.dim])
            state = self.estimator.push_surrogate(state, surrogate)
        system_state, state, result = self.estimator.window(
            self.system, system_state, state, theta, self.seed)
        # A window in which every pair diverged carries no information: skip the update,
        # or a momentum optimizer (Adam) would keep coasting on its zero gradient, out
        # of the region where the particles diverge and on into wherever it points.
        def update():
            self.optimizer.apply([result.gradient], [self.theta])
            return tf.constant(True)

        tf.cond(result.valid_pairs > 0, update, lambda: tf.constant(False))
        # A finite gradient can still overflow theta (huge learning rates): keep the old
        # value rather than let a non-finite theta poison every later step.
        updated = tf.convert_to_tensor(self.theta)
        self.theta.assign(tf.where(tf.reduce_all(tf.math.is_finite(updated)), updated, theta))
        tf.nest.map_structure(lambda v, t: v.assign(t), self._system_vars, system_state)
        tf.nest.map_structure(lambda v, t: v.assign(t), self._state_vars, state)
        self.outer_step.assign_add(1)
        return result


def _variable(t):
    return tf.Variable(t, trainable=False)
