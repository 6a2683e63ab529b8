"""`ESCallback`: tune hyperparameters online, inside ``model.fit``."""

from __future__ import annotations

import dataclasses
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from keras_es import backup as backup_lib
from keras_es import checks, distribute, engine, keras_compat, noise, schedules
from keras_es.estimators import ESTIMATORS, Estimator, GuidedConfig
from keras_es.keras_system import KerasSystem, as_tensors
from keras_es.outer import MetaTrainer, default_outer_optimizer
from keras_es.transforms import SearchSpace

_KERAS_OPTIMIZER = {engine.SGD: keras.optimizers.SGD, engine.Adam: keras.optimizers.Adam}
# Optimizer attributes Keras reads as Python floats when it traces the train step;
# tuned ones are served from variables instead (keras_compat.read_at_run_time).
_TRACED = {engine.SGD: ("momentum", "weight_decay"),
           engine.Adam: ("beta_1", "beta_2", "weight_decay")}


_WINDOW_KEYS = ("loss", "meta_loss", "gradient_norm", "valid_pairs", "diverged_pairs",
                "clipped_pairs", "updated")
_LOGGER = logging.getLogger("keras_es")


def _print(message: str) -> None:
    """One line to the user, where Keras's own progress output goes: stdout while
    interactive logging is on (the default), else the ``keras_es`` logger."""
    if keras.config.is_interactive_logging_enabled():
        # A new line first, as Keras's own callbacks do: the progress bar may be
        # mid-line.
        print("\n" + message, flush=True)
    else:
        _LOGGER.info(message)

# XLA compiles a window in ~3-5 s and then runs it about twice as fast as graph mode
# (MLP 784-32-32-10, N = 8, K = 10: 12 vs 23 ms): worth it from a few hundred windows.
AUTO_JIT_MIN_WINDOWS = 500


def _check_data(model: keras.Model, loss, name: str, data) -> None:
    """Refuses ``data`` the model cannot train on, naming the argument, before any
    window runs (the particles' step would fail later with TensorFlow's error, which
    names neither): inputs of the wrong shape, integer class labels outside the model's
    outputs, and targets the loss rejects (one-hot labels for a sparse loss)."""
    x, y = data
    rows = min(int(x.shape[0]), 64)

    def refuse(error):
        message = str(error).strip().splitlines()[0].split("}}")[-1].strip()[:300]
        raise ValueError(
            f"{name} does not fit the model: x of shape {tuple(x.shape)} and y of shape "
            f"{tuple(y.shape)} gave: {message}") from None

    try:
        y_pred = model(x[:rows], training=False)
    except (ValueError, TypeError, tf.errors.OpError) as error:
        refuse(error)
    classes = y_pred.shape[-1]
    if y.dtype.is_integer and classes and classes > 1 and y.shape.rank < y_pred.shape.rank:
        low, high = int(tf.reduce_min(y)), int(tf.reduce_max(y))
        if low < 0 or high >= classes:
            raise ValueError(f"{name} has class labels from {low} to {high}, but the model "
                             f"has {classes} outputs; expected labels in [0, {classes}).")
    try:
        loss(y[:rows], y_pred)
    except (ValueError, TypeError, tf.errors.OpError) as error:
        refuse(error)


class ESCallback(keras.callbacks.Callback):
    """Tunes the hyperparameters of the model being fit with ES on particle unrolls.

    While ``fit`` trains the model with the current (mean) hyperparameters, a population
    of N particles (copies of the model, each with perturbed hyperparameters) trains on
    ``train_data`` in truncated unrolls of K steps, one window every K batches of
    ``fit``. Each window gives an ES estimate of the hypergradient (ES-Single by
    default); an outer Keras optimizer updates theta, and the callback applies the new
    values to the model: its learning rate (evaluated from the schedule at the model's
    own step every batch), momentum, Adam betas and weight decay (after every window,
    read by the traced train step from variables), and `keras_es.layers` widths and
    dropout rates.

    Example:

    ```python
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.01, "log"),
                                  keras_es.Hyperparameter("momentum", 0.5, "logit")])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.5), loss=...)
    model.fit(train_ds, epochs=5, callbacks=[keras_es.ESCallback(
        space, keras_es.engine.SGD("lr", momentum="momentum"),
        train_data=(x_train, y_train), meta_data=(x_val, y_val))])
    ```

    Args:
        space: The `SearchSpace` of tuned hyperparameters, in natural units.
        optimizer: `keras_es.engine.SGD` or `keras_es.engine.Adam` naming which
            hyperparameter drives which optimizer value; it must match the type of the
            optimizer the model is compiled with.
        train_data: The particles' training data: ``(x, y)`` arrays or a finite
            ``tf.data.Dataset`` (a callback cannot see ``fit``'s data).
        meta_data: Data for the meta-objective (validation data).
        estimator: ``"es_single"`` (default), ``"pes"``, ``"truncated_es"``,
            ``"full_es"``, or an `Estimator` (then sigma, K, horizon, objective and
            guided are its).
        guided: A `GuidedConfig` for Guided ES with the callback's own surrogate: before
            every window, the one-step hypergradient of the validation loss with respect
            to theta (GradientTape through one optimizer step of a particle, see
            `keras_es.Population.hypergradient`) enters the guiding subspace.
        num_particles: N, even.
        sigma: Perturbation scale in unconstrained units.
        truncation_length: K, particle steps per window (and ``fit`` batches per update,
            counted in optimizer steps: with ``compile(steps_per_execution=S)`` the
            windows fall due at the end of the execution that completes them, and the
            learning rate is set once per execution of S steps).
        horizon: T, steps of a particle's inner problem; default: the steps of the fit.
        objective: ``"sum"`` of per-step validation losses or the ``"final"`` one.
        telescope: With ``objective="final"``, credit telescoped differences every
            window (True) or the final difference once per episode (False; much lower
            variance when particles learn at different speeds, see `keras_es.Estimator`).
        batch_size: The particles' minibatch size.
        meta_batch_size: Validation batch size per step or episode.
        outer_optimizer: Keras optimizer for theta (default ``Adam(0.01)``). With
            ``use_ema=True`` the fit ends with its moving average of theta (less ES
            jitter), as ``fit`` does for model weights.
        layer_hyperparameters: ``{variable path pattern: name}`` for `keras_es.layers`
            (see `keras_es.Population`).
        backup_dir: Directory where the ES state is saved at every epoch end and
            restored from at the first batch (`keras_es.backup`); use the
            ``backup_dir`` of the ``keras.callbacks.BackupAndRestore`` in the same fit.
        seed: Integer seed of all noise and particle data.
        verbose: 0 silent, 1 one line per epoch, 2 one line per window (the values
            are in the epoch's ``logs`` either way, so the progress bar shows them).
        jit_compile: Compile the particles' window with XLA: ``True``, ``False``, or
            ``"auto"`` (default: when the fit has at least 500 windows, since XLA's
            compile time of a few seconds pays off only over many windows, and the
            population is `keras_es.Population.xla_friendly`).
        strategy: ``tf.distribute.Strategy`` to shard the particles over; default the
            fitted model's ``distribute_strategy`` (the strategy whose ``scope()`` the
            model was built in). ``num_particles`` must be a multiple of 2 x replicas,
            and an ``outer_optimizer`` must be created inside ``strategy.scope()``.
        execution: How the particles run, as in `keras_es.Population`: ``"auto"``
            (default), ``"vectorized"`` or ``"stacked"``.
    """

    def __init__(self, space: SearchSpace, optimizer, train_data, meta_data=None,
                 estimator: str | Estimator = "es_single", guided: GuidedConfig | None = None,
                 num_particles: int = 8,
                 sigma: float = 0.1, truncation_length: int = 10, horizon: int | None = None,
                 objective: str = "sum", telescope: bool = True, batch_size: int = 32,
                 meta_batch_size: int | None = None,
                 outer_optimizer: keras.optimizers.Optimizer | None = None,
                 layer_hyperparameters: dict | None = None, backup_dir: str | None = None,
                 seed: int = 0, verbose: int = 0, jit_compile: bool | str = "auto",
                 strategy: tf.distribute.Strategy | None = None, execution: str = "auto"):
        super().__init__()
        if jit_compile not in (True, False, "auto"):
            raise ValueError(f"jit_compile={jit_compile!r} is invalid; expected True, False "
                             "or 'auto'.")
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space={space!r} is invalid; expected a keras_es.SearchSpace.")
        if execution not in ("auto", "vectorized", "stacked"):
            raise ValueError(f"execution={execution!r} is invalid; expected 'auto', "
                             "'vectorized' or 'stacked'.")
        engine.check_optimizer(optimizer, space)
        read = {n for v in optimizer.values() for n in schedules.names(v)}
        read |= set(dict(layer_hyperparameters or {}).values())
        unread = [n for n in space.names if n not in read]
        if unread:
            raise ValueError(
                f"space declares {unread}, which neither optimizer nor layer_hyperparameters "
                "reads: tuning them would only add noise. Refer to them (e.g. "
                "SGD(learning_rate='lr', momentum='momentum')) or drop them from space.")
        if optimizer.per_variable:
            raise ValueError("optimizer has per_variable values, which a single Keras "
                             "optimizer cannot apply to the fitted model; tune them with a "
                             "keras_es.Population and MetaTrainer instead.")
        if not isinstance(estimator, (str, Estimator)) or (
                isinstance(estimator, str) and estimator not in ESTIMATORS):
            raise ValueError(f"estimator={estimator!r} is invalid; expected one of "
                             f"{sorted(ESTIMATORS)} or an Estimator.")
        checks.boolean("telescope", telescope)
        checks.seed(seed)
        checks.optimizer("outer_optimizer", outer_optimizer)
        checks.positive_int("batch_size", batch_size)
        if meta_batch_size is not None:
            checks.positive_int("meta_batch_size", meta_batch_size)
        if backup_dir is not None and (not isinstance(backup_dir, (str, os.PathLike))
                                       or os.path.isfile(backup_dir)):
            raise ValueError(f"backup_dir={backup_dir!r} is invalid; expected a directory "
                             "path (it is created if missing), not a file.")
        if guided is not None and not isinstance(guided, GuidedConfig):
            raise ValueError(f"guided={guided!r} is invalid; expected a keras_es.GuidedConfig "
                             "or None.")
        if guided is not None and not isinstance(estimator, str):
            raise ValueError("guided was given with an Estimator instance; build the "
                             "estimator with guided=... instead.")
        checks.num_particles(num_particles)
        if isinstance(estimator, str):
            checks.positive_int("truncation_length", truncation_length)
            if horizon is not None:
                checks.positive_int("horizon", horizon)
                if horizon < truncation_length:
                    raise ValueError(f"horizon={horizon} is shorter than truncation_length="
                                     f"{truncation_length}; expected horizon >= "
                                     "truncation_length.")
            checks.sigma(sigma)
        if train_data is None:
            raise ValueError("train_data=None is invalid; the particles need (x, y) data or a "
                             "tf.data.Dataset to train on.")
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose={verbose!r} is invalid; expected 0, 1 or 2.")
        if strategy is not None:
            distribute.check_strategy(strategy, num_particles)
        self.strategy = strategy
        self.space, self.inner_optimizer = space, optimizer
        self.train_data, self.meta_data = train_data, meta_data
        self.estimator, self.guided, self.num_particles = estimator, guided, num_particles
        self.sigma, self.truncation_length = sigma, truncation_length
        self.horizon, self.objective, self.telescope = horizon, objective, bool(telescope)
        self.batch_size, self.meta_batch_size = batch_size, meta_batch_size
        self.outer_optimizer = outer_optimizer
        self.layer_hyperparameters = dict(layer_hyperparameters or {})
        self.backup_dir, self.seed, self.verbose = backup_dir, int(seed), verbose
        self.jit_compile, self.execution = jit_compile, execution
        self.trainer: MetaTrainer | None = None
        self._window_logs: dict = {}
        #: One entry per window of the current ``fit`` call (after a resume: since the
        #: restart): ``batches`` (fit batches so far), ``theta`` (unconstrained, after
        #: the update), ``loss`` (mean per-step loss of the particles: their
        #: validation loss when ``meta_data`` is given and ``objective="sum"``),
        #: ``meta_loss`` (window-end validation loss, ``objective="final"`` only; else
        #: NaN), ``gradient_norm``, ``valid_pairs``, ``diverged_pairs``,
        #: ``clipped_pairs`` (``Estimator.clip_outliers``) and ``updated``
        #: (False when the update was skipped or undone, see
        #: `keras_es.outer.outer_update`).
        self.window_history: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, logs=None):
        if self.trainer is not None:
            # The outer optimizer is built for the first fit's theta variable, and a new
            # fit has a new length (the default horizon): continuing would be a guess.
            raise ValueError(
                "This ESCallback was already used in a fit. Create a new one for another "
                "fit (start it from the tuned values: callback.values), or resume an "
                "interrupted fit with keras.callbacks.BackupAndRestore and backup_dir.")
        model = self.model
        if model.optimizer is None or not getattr(model, "compiled", False):
            raise ValueError("ESCallback needs a compiled model; call model.compile(...) "
                             "before fit.")
        expected = _KERAS_OPTIMIZER[type(self.inner_optimizer)]
        if type(model.optimizer) is not expected:
            raise ValueError(
                f"The model is compiled with {type(model.optimizer).__name__}, but optimizer="
                f"{type(self.inner_optimizer).__name__}(...) tunes a {expected.__name__}; "
                "compile the model with the matching Keras optimizer.")
        if isinstance(model.optimizer._learning_rate,
                      keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError("The model's optimizer has a LearningRateSchedule; compile it "
                             "with a float learning rate: ESCallback sets the rate every batch "
                             "from its own (tuned) schedule.")
        if (isinstance(self.inner_optimizer, engine.SGD)
                and bool(model.optimizer.nesterov) != self.inner_optimizer.nesterov):
            raise ValueError(
                f"The model's SGD has nesterov={bool(model.optimizer.nesterov)}, but optimizer="
                f"keras_es.engine.SGD(..., nesterov={self.inner_optimizer.nesterov}); the "
                "particles must train as the model does: pass the same nesterov.")
        if (isinstance(self.inner_optimizer, engine.SGD)
                and isinstance(self.inner_optimizer.momentum, str)
                and not model.optimizer.momentum):
            raise ValueError("optimizer tunes momentum, but the model's SGD was compiled with "
                             "momentum=0, so Keras built no momentum buffers; compile with a "
                             "non-zero momentum.")
        estimator = self.estimator
        if isinstance(estimator, str):
            horizon = self.horizon
            # With the whole fit as the horizon the particles never restart during it, so
            # staggering (and its burn-in) has nothing to spread out.
            stagger = horizon is not None
            if horizon is None:
                steps = self.params.get("steps") or 0
                horizon = steps * self.params.get("epochs", 1) or None
                if horizon is not None and horizon < self.truncation_length:
                    raise ValueError(
                        f"The fit has {horizon} steps in all, fewer than truncation_length="
                        f"{self.truncation_length}; lower truncation_length or set horizon.")
            factory = ESTIMATORS[estimator]
            if estimator == "full_es":
                estimator = factory(self.sigma, horizon=horizon or self.truncation_length,
                                    objective=self.objective, telescope=self.telescope,
                                    guided=self.guided)
            else:
                estimator = factory(self.sigma, self.truncation_length, horizon=horizon,
                                    objective=self.objective, telescope=self.telescope,
                                    stagger=stagger, guided=self.guided)
        try:
            loss = engine.resolve_loss(model.loss)
        except ValueError as error:
            raise ValueError(f"The model was compiled with {error}; ESCallback supports "
                             "single-output models.") from None
        strategy = distribute.check_strategy(self.strategy or model.distribute_strategy,
                                             self.num_particles)
        train_data = as_tensors(self.train_data, "train_data")
        meta_data = (None if self.meta_data is None
                     else as_tensors(self.meta_data, "meta_data"))
        if not model.built or not getattr(model, "inputs", None):
            # A Sequential model without an Input (as most Keras guides write them):
            # fit has built its layers from the first batch, but not the model itself.
            model.build((None, *train_data[0].shape[1:]))
        for name, data in (("train_data", train_data), ("meta_data", meta_data)):
            if data is not None:
                _check_data(model, loss, name, data)
        outer_optimizer = self.outer_optimizer
        if outer_optimizer is None:
            with strategy.scope():
                outer_optimizer = default_outer_optimizer()
        population = engine.Population(
            model, self.num_particles, self.space, loss, self.inner_optimizer,
            layer_hyperparameters=self.layer_hyperparameters, execution=self.execution)
        # The telescoped final objective credits only meta-losses at window ends: per-step
        # validation losses would be computed for nothing.
        step_loss = ("meta" if self.meta_data is not None and estimator.objective == "sum"
                     else "train")
        with strategy.scope():  # the particles' data: one copy per replica
            system = KerasSystem(
                population, train_data, meta_data, batch_size=self.batch_size,
                meta_batch_size=self.meta_batch_size, step_loss=step_loss)
        surrogate = None
        if estimator.guided is not None:
            if strategy.num_replicas_in_sync > 1:
                raise ValueError(
                    "guided=... with a strategy of "
                    f"{strategy.num_replicas_in_sync} replicas is not supported: the "
                    "one-step hypergradient is taken on one particle's state, which lives "
                    "on one replica; use one device or an Estimator without guided.")

            def surrogate(theta, outer_step, system_state):
                # The step's own key: a restored run draws the same surrogate batches.
                key = noise.pair_seeds(self.seed, noise.STREAM_SURROGATE,
                                       tf.constant([0]), tf.cast(outer_step, tf.int32)[None])[0]
                return system.hypergradient(system_state, theta, key)
        self.trainer = MetaTrainer(
            system, estimator, self.space, self.num_particles, optimizer=outer_optimizer,
            seed=self.seed, surrogate=surrogate, jit_compile=self._use_xla(estimator, population),
            strategy=strategy)
        tuned = [a for a in _TRACED[type(self.inner_optimizer)]
                 if isinstance(getattr(self.inner_optimizer, a), str)]
        with model.distribute_strategy.scope():
            self._knobs = keras_compat.read_at_run_time(model.optimizer, tuned)
        if tuned:
            # Traced once more, now reading them from variables; never again this fit.
            model.make_train_function(force=True)
        self._batches = self._windows = 0
        self._last_iterations = None
        # The ES state is restored at the first batch, once Keras's BackupAndRestore
        # (whatever its place in the callback list) has restored the model's step count.
        self._restore_pending = bool(self.backup_dir)
        self.window_history = []
        self._apply()

    def _use_xla(self, estimator, population) -> bool:
        if self.jit_compile != "auto":
            return bool(self.jit_compile)
        if not population.xla_friendly:
            return False
        steps = (self.params.get("steps") or 0) * self.params.get("epochs", 1)
        return steps // estimator.truncation_length >= AUTO_JIT_MIN_WINDOWS

    # ------------------------------------------------------------------ training
    def on_train_batch_begin(self, batch, logs=None):
        if self._last_iterations is None:
            # Read here, not at train begin: BackupAndRestore may restore the optimizer
            # in its own on_train_begin, after this callback's.
            self._last_iterations = int(self.model.optimizer.iterations.numpy())
            if self._restore_pending:
                self._restore()
        self._set_learning_rate()

    def _restore(self):
        """Resumes the ES state saved in ``backup_dir`` at the model's step count,
        replaying the windows a kill between the two epoch-end saves cut off."""
        self._restore_pending = False
        backup = backup_lib.ESBackup(self.backup_dir)
        restored, target = backup.restore(self.trainer, self._last_iterations)
        if target is None:  # a new ES run
            backup.mark_start(self._last_iterations)
            return
        self._windows = restored // self.trainer.estimator.truncation_length
        self._batches = target
        self._run_due_windows()
        self.window_history = []  # only this fit's windows since the restart
        self._apply()

    def on_train_batch_end(self, batch, logs=None):
        # Count optimizer steps, not calls: with compile(steps_per_execution=S) Keras
        # calls back once per S batches, and a window is K batches whatever S is.
        iterations = int(self.model.optimizer.iterations.numpy())
        self._batches += iterations - self._last_iterations
        self._last_iterations = iterations
        self._run_due_windows()

    def _run_due_windows(self):
        """Runs every window whose K batches are complete."""
        length = self.trainer.estimator.truncation_length
        while self._windows < self._batches // length:
            self._windows += 1
            self._window_logs = self.trainer.step()
            self.window_history.append({"batches": self._windows * length,
                                        "theta": self.trainer.theta_value.tolist(),
                                        **{k: self._window_logs[k] for k in _WINDOW_KEYS}})
            self._apply()
            if self.verbose == 2:
                _print("ESCallback window: " + self._summary())

    def on_epoch_end(self, epoch, logs=None):
        if self.trainer is None:
            return
        if logs is not None:
            logs.update(self.epoch_logs())
        if self.backup_dir:
            self._save()
        if self.verbose == 1:
            _print(f"Epoch {epoch + 1}: ESCallback " + self._summary())

    def on_train_end(self, logs=None):
        if self.trainer is None:
            return
        if self.trainer.optimizer.use_ema:
            # Like Keras's fit for model weights: end with the outer optimizer's moving
            # average of theta (use_ema=True), and apply it to the model.
            self.trainer.finalize()
            self._apply()
        if self._knobs:
            # Hand back a plain Keras optimizer holding the tuned floats; a later fit
            # traces its own step with them.
            keras_compat.restore_attributes(self.model.optimizer)
            self.model.make_train_function(force=True)

    def epoch_logs(self) -> dict:
        """``es_<name>`` hyperparameter values (natural units) and the last window's
        ``es_meta_loss``, ``es_gradient_norm`` and ``es_diverged_pairs``."""
        out = {f"es_{k}": float(v) for k, v in self.values.items()}
        w = self._window_logs
        if w:
            out["es_meta_loss"] = w["meta_loss"] if np.isfinite(w["meta_loss"]) else w["loss"]
            out["es_gradient_norm"] = w["gradient_norm"]
            out["es_diverged_pairs"] = float(int(self.trainer.state.diverged))
        return out

    @property
    def values(self) -> dict:
        """The current hyperparameters in natural units."""
        if self.trainer is None:
            return self.space.decode(self.space.encode())
        return self.trainer.values

    def _summary(self):
        return ", ".join(f"{k}={v:.4g}" for k, v in self.epoch_logs().items())

    # ------------------------------------------------------------------ applying theta
    def _set_learning_rate(self):
        # The schedule is TensorFlow code; evaluating it eagerly on every batch cost
        # ~1 ms, more than a small model's train step. theta only changes at windows, so
        # evaluate it for the next K steps at once and only look the value up per batch.
        optimizer = self.model.optimizer
        step = int(optimizer.iterations.numpy())
        index = step - self._lr_start
        if not 0 <= index < len(self._lr_table):
            self._lr_start, index = step, 0
            steps = tf.range(step, step + self.trainer.estimator.truncation_length,
                             dtype=tf.float32)
            hp = {k: tf.broadcast_to(v, steps.shape) for k, v in self._hp.items()}
            self._lr_table = self.inner_optimizer.learning_rate(steps, hp).numpy().tolist()
        optimizer.learning_rate.assign(self._lr_table[index])

    def _apply(self):
        # theta changes only in a window or a restore, each followed by _apply: decode
        # it here once instead of on every batch.
        hp = self._hp = self.space.decode(tf.constant(self.trainer.theta_value[None]))
        self._lr_start, self._lr_table = 0, []  # theta changed: recompute the rates
        self._set_learning_rate()
        population = self.trainer.system.population
        for index, name in population.layer_hyperparameter_indices.items():
            self.model.non_trainable_variables[index].assign(float(hp[name][0]))
        # Momentum, betas, weight decay: read by the traced step from variables.
        for attribute, knob in self._knobs.items():
            knob.assign(float(hp[getattr(self.inner_optimizer, attribute)][0]))

    # ------------------------------------------------------------------ backups
    def _save(self):
        backup_lib.ESBackup(self.backup_dir).save(
            self.trainer, self._batches, int(self.model.optimizer.iterations.numpy()))

    def get_config(self) -> dict:
        estimator = self.estimator if isinstance(self.estimator, str) else self.estimator.name
        guided = None if self.guided is None else dataclasses.asdict(self.guided)
        return {"space": self.space.get_config(), "estimator": estimator, "guided": guided,
                "num_particles": self.num_particles, "sigma": self.sigma,
                "truncation_length": self.truncation_length, "horizon": self.horizon,
                "objective": self.objective, "telescope": self.telescope,
                "batch_size": self.batch_size,
                "meta_batch_size": self.meta_batch_size,
                "layer_hyperparameters": self.layer_hyperparameters,
                "backup_dir": self.backup_dir, "seed": self.seed, "verbose": self.verbose,
                "jit_compile": self.jit_compile, "execution": self.execution}
