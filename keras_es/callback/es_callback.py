"""`ESCallback`: tune hyperparameters online, inside ``model.fit``."""

from __future__ import annotations

import dataclasses
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from keras_es import checks, distribute, engine, keras_compat, noise, schedules
from keras_es.callback import backup as backup_lib
from keras_es.callback import keras_optimizers
from keras_es.engine.keras_system import KerasSystem, as_tensors
from keras_es.estimators import DEFAULTS, Estimator, GuidedConfig, resolve
from keras_es.outer import MetaTrainer, default_outer_optimizer, outer_learning_rate_for
from keras_es.transforms import SearchSpace

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


def _check_tune(tune, optimizer, layer_hyperparameters):
    """``tune`` and ``optimizer`` checked: ``(parsed tune, space)`` where exactly one is
    None (`keras_optimizers.parse_tune` for Keras names; the `SearchSpace` of the
    advanced form, whose names ``optimizer`` and ``layer_hyperparameters`` must read)."""
    if not isinstance(tune, SearchSpace):
        if optimizer is not None:
            raise ValueError(
                f"optimizer={optimizer!r} was given with tune={tune!r}; with Keras names "
                "the callback reads the compiled optimizer itself. Pass a keras_es."
                "SearchSpace as tune to map hyperparameters with keras_es.engine.SGD/Adam.")
        if layer_hyperparameters:
            raise ValueError("layer_hyperparameters needs the advanced form: declare every "
                             "tuned name in tune=keras_es.SearchSpace([...]) with "
                             "optimizer=keras_es.engine.SGD(...) or Adam(...).")
        return keras_optimizers.parse_tune(tune), None
    engine.check_optimizer(optimizer, tune)
    read = {n for v in optimizer.values() for n in schedules.names(v)}
    read |= set(dict(layer_hyperparameters or {}).values())
    unread = [n for n in tune.names if n not in read]
    if unread:
        raise ValueError(
            f"space declares {unread}, which neither optimizer nor layer_hyperparameters "
            "reads: tuning them would only add noise. Refer to them (e.g. "
            "SGD(learning_rate='lr', momentum='momentum')) or drop them from space.")
    if optimizer.per_variable:
        raise ValueError("optimizer has per_variable values, which a single Keras "
                         "optimizer cannot apply to the fitted model; tune them with a "
                         "keras_es.Population and MetaTrainer instead.")
    return None, tune


def _check_settings(train_data, num_particles, batch_size, meta_batch_size, outer_optimizer,
                    backup_dir, seed, verbose, jit_compile, strategy, execution) -> None:
    """Raises ``ValueError`` naming the first setting (other than the estimator's) that
    is invalid."""
    if jit_compile not in (True, False, "auto"):
        raise ValueError(f"jit_compile={jit_compile!r} is invalid; expected True, False "
                         "or 'auto'.")
    if execution not in ("auto", "vectorized", "stacked"):
        raise ValueError(f"execution={execution!r} is invalid; expected 'auto', "
                         "'vectorized' or 'stacked'.")
    checks.seed(seed)
    checks.optimizer("outer_optimizer", outer_optimizer)
    checks.positive_int("batch_size", batch_size)
    if meta_batch_size is not None:
        checks.positive_int("meta_batch_size", meta_batch_size)
    if backup_dir is not None and (not isinstance(backup_dir, (str, os.PathLike))
                                   or os.path.isfile(backup_dir)):
        raise ValueError(f"backup_dir={backup_dir!r} is invalid; expected a directory "
                         "path (it is created if missing), not a file.")
    checks.num_particles(num_particles)
    if train_data is None:
        raise ValueError("train_data=None is invalid; the particles need (x, y) data or a "
                         "tf.data.Dataset to train on.")
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose={verbose!r} is invalid; expected 0, 1 or 2.")
    if strategy is not None:
        distribute.check_strategy(strategy, num_particles)


def _read_optimizer(callback: ESCallback) -> keras_optimizers.Compiled:
    """What ``callback`` tunes in the compiled optimizer of the model being fit."""
    if callback.trainer is not None:
        # The outer optimizer is built for the first fit's theta variable, and a new
        # fit has a new length (the default horizon): continuing would be a guess.
        raise ValueError(
            "This ESCallback was already used in a fit. Create a new one for another "
            "fit (start it from the tuned values: callback.values), or resume an "
            "interrupted fit with keras.callbacks.BackupAndRestore and backup_dir.")
    model = callback.model
    if model.optimizer is None or not getattr(model, "compiled", False):
        raise ValueError("ESCallback needs a compiled model; call model.compile(...) "
                         "before fit.")
    # A fit that ended in an exception leaves its run-time values in place: undo them.
    keras_compat.restore_attributes(model.optimizer)
    if callback.tune is not None:
        return keras_optimizers.read_compiled(model.optimizer, callback.tune)
    return keras_optimizers.read_mapping(model.optimizer, callback.space,
                                         callback.inner_optimizer)


def _fit_length(params: dict, truncation_length: int) -> int | None:
    """The fit's steps in all (the default horizon), or None when unknown."""
    horizon = (params.get("steps") or 0) * params.get("epochs", 1) or None
    if horizon is not None and horizon < truncation_length:
        raise ValueError(
            f"The fit has {horizon} steps in all, fewer than truncation_length="
            f"{truncation_length}; lower truncation_length or set horizon.")
    return horizon


def _surrogate(system: KerasSystem, seed: int):
    """Guided ES's surrogate: the one-step hypergradient of the validation loss."""

    def surrogate(theta, outer_step, system_state):
        # The step's own key: a restored run draws the same surrogate batches.
        key = noise.pair_seeds(seed, noise.STREAM_SURROGATE, tf.constant([0]),
                               tf.cast(outer_step, tf.int32)[None])[0]
        return system.hypergradient(system_state, theta, key)

    return surrogate


def _build_trainer(callback: ESCallback, estimator: Estimator) -> MetaTrainer:
    """The particles (a `Population` of the fitted model on ``train_data``) and the
    `MetaTrainer` that runs their windows."""
    model = callback.model
    try:
        loss = engine.resolve_loss(model.loss)
    except ValueError as error:
        raise ValueError(f"The model was compiled with {error}; ESCallback supports "
                         "single-output models.") from None
    strategy = distribute.check_strategy(callback.strategy or model.distribute_strategy,
                                         callback.num_particles)
    train_data = as_tensors(callback.train_data, "train_data")
    meta_data = (None if callback.meta_data is None
                 else as_tensors(callback.meta_data, "meta_data"))
    if not model.built or not getattr(model, "inputs", None):
        # A Sequential model without an Input (as most Keras guides write them):
        # fit has built its layers from the first batch, but not the model itself.
        model.build((None, *train_data[0].shape[1:]))
    for name, data in (("train_data", train_data), ("meta_data", meta_data)):
        if data is not None:
            _check_data(model, loss, name, data)
    outer_optimizer = callback.outer_optimizer
    if outer_optimizer is None:  # a rate for the windows this fit will run
        steps = (callback.params.get("steps") or 0) * callback.params.get("epochs", 1)
        with strategy.scope():
            outer_optimizer = default_outer_optimizer(
                outer_learning_rate_for(steps // estimator.truncation_length))
    population = engine.Population(
        model, callback.num_particles, callback.space, loss, callback.compiled.update,
        layer_hyperparameters=callback.layer_hyperparameters, execution=callback.execution)
    # The telescoped final objective credits only meta-losses at window ends: per-step
    # validation losses would be computed for nothing.
    step_loss = ("meta" if meta_data is not None and estimator.objective == "sum"
                 else "train")
    with strategy.scope():  # the particles' data: one copy per replica
        system = KerasSystem(population, train_data, meta_data, batch_size=callback.batch_size,
                             meta_batch_size=callback.meta_batch_size, step_loss=step_loss)
    surrogate = None
    if estimator.guided is not None:
        if strategy.num_replicas_in_sync > 1:
            raise ValueError(
                f"guided=... with a strategy of {strategy.num_replicas_in_sync} replicas is "
                "not supported: the one-step hypergradient is taken on one particle's "
                "state, which lives on one replica; use one device or no guided.")
        surrogate = _surrogate(system, callback.seed)
    return MetaTrainer(system, estimator, callback.space, callback.num_particles,
                       outer_optimizer=outer_optimizer, seed=callback.seed, surrogate=surrogate,
                       jit_compile=callback._use_xla(estimator, population),
                       strategy=strategy)


def _serve_at_run_time(model: keras.Model, compiled) -> list:
    """Makes the model's train step read every tuned optimizer value except the learning
    rate (set every batch) from variables: momentum, betas, weight decay and the tuned
    arguments of a compiled schedule (whose copy is installed in the optimizer).
    Returns ``[(hyperparameter name, RuntimeValue)]``."""
    optimizer = model.optimizer
    knobs = []
    with model.distribute_strategy.scope():
        served = keras_compat.read_at_run_time(optimizer, compiled.traced)
        knobs += [(getattr(compiled.update, a), knob) for a, knob in served.items()]
        if compiled.schedule is not None:
            optimizer.learning_rate = compiled.schedule  # Keras's public setter
            served = keras_compat.read_at_run_time(compiled.schedule, compiled.schedule_names)
            knobs += list(served.items())
    if knobs or compiled.schedule is not None:
        # Traced once more, now reading them from variables; never again this fit.
        model.make_train_function(force=True)
    return knobs


class ESCallback(keras.callbacks.Callback):
    """Tunes the compiled optimizer's hyperparameters during ``fit`` with ES.

    While ``fit`` trains the model at the current hyperparameters, N particles (copies
    of it at perturbed ones) train on ``train_data`` in windows of K steps, one every K
    batches; each window's ES estimate (ES-Single by default) updates theta through an
    outer Keras optimizer, and the new values go to the model: the learning rate every
    batch, the rest (momentum, betas, weight decay, schedule arguments, `keras_es.layers`
    widths and dropout rates) after every window.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_es

    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    model = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.5),
                  loss="sparse_categorical_crossentropy")
    callback = keras_es.ESCallback(["learning_rate", "momentum"], train_data=(x, y),
                                   meta_data=(x[:64], y[:64]), truncation_length=4)
    model.fit(x, y, epochs=2, callbacks=[callback], verbose=0)
    print(callback.values)  # {'learning_rate': ..., 'momentum': ...}
    optimizer = callback.tuned_optimizer()  # a fresh SGD holding the tuned values
    ```

    Args:
        tune: What to tune, by Keras name, starting from the compiled optimizer's
            values: a name or list of names (``"learning_rate"``, ``"momentum"``,
            ``"beta_1"``, ``"beta_2"``, ``"weight_decay"``, or the arguments of the
            compiled learning-rate schedule, e.g. ``"initial_learning_rate"``,
            ``"decay_rate"``), or a dict ``{name: None | start value | (low, high)}``
            (a range keeps the value inside it: log scale for positive values, linear
            for momentum and betas). Advanced form: a `SearchSpace` with ``optimizer``.
        optimizer: Advanced form only: `keras_es.engine.SGD` or `keras_es.engine.Adam`
            naming which hyperparameter of ``tune`` drives which value (schedules with
            tuned parameters, `keras_es.schedules`); it must match the compiled class.
        train_data: The particles' training data: ``(x, y)`` arrays or a finite
            ``tf.data.Dataset`` (a callback cannot see ``fit``'s data).
        meta_data: Data for the meta-objective (validation data).
        estimator: ``"es_single"`` (default), ``"pes"``, ``"truncated_es"``,
            ``"full_es"``, or an `Estimator` (which carries sigma, K, horizon,
            meta-objective, telescope and guided: leave those unset).
        num_particles: N, even.
        sigma: As in `keras_es.estimators.resolve`.
        truncation_length: K, as in `keras_es.estimators.resolve`, in optimizer steps.
        horizon: T in optimizer steps; default the fit's length (no restarts); a given
            one staggers restarts.
        meta_objective: ``"sum"`` or ``"final"``, as in `keras_es.estimators.resolve`.
        telescope: As in `keras_es.estimators.resolve`.
        guided: A `keras_es.GuidedConfig`; the surrogate is the one-step
            hypergradient.
        batch_size: The particles' batch size.
        meta_batch_size: The validation batch size.
        outer_optimizer: Keras optimizer for theta (default: Adam at the rate
            `keras_es.outer.outer_learning_rate_for` gives the fit's windows); with
            ``use_ema=True`` the fit ends with its moving average of theta.
        layer_hyperparameters: Advanced form: as in `keras_es.Population`.
        backup_dir: The ``backup_dir`` of the ``keras.callbacks.BackupAndRestore`` in
            the same fit: the ES state is saved there every epoch and resumed from.
        seed: Integer seed of all noise and particle data.
        verbose: 0 silent, 1 one line per epoch, 2 one line per window (the values
            are in the epoch's ``logs`` either way).
        jit_compile: XLA for the particles: True, False or ``"auto"`` (500+ windows).
        strategy: ``tf.distribute.Strategy`` for the particles (default the model's).
        execution: ``"auto"``, ``"vectorized"`` or ``"stacked"`` (`keras_es.Population`).
    """

    def __init__(self, tune, optimizer=None, train_data=None, meta_data=None, *,  # noqa: PLR0913
                 estimator: str | Estimator = "es_single", num_particles: int = 8,
                 sigma: float | None = None, truncation_length: int | None = None,
                 horizon: int | None = None, meta_objective: str | None = None,
                 telescope: bool | None = None, guided: GuidedConfig | None = None,
                 batch_size: int = 32, meta_batch_size: int | None = None,
                 outer_optimizer: keras.optimizers.Optimizer | None = None,
                 layer_hyperparameters: dict | None = None, backup_dir: str | None = None,
                 seed: int = 0, verbose: int = 0, jit_compile: bool | str = "auto",
                 strategy: tf.distribute.Strategy | None = None, execution: str = "auto"):
        super().__init__()
        self.tune, self.space = _check_tune(tune, optimizer, layer_hyperparameters)
        _check_settings(train_data, num_particles, batch_size, meta_batch_size,
                        outer_optimizer, backup_dir, seed, verbose, jit_compile, strategy,
                        execution)
        self.inner_optimizer, self.strategy = optimizer, strategy
        self.train_data, self.meta_data = train_data, meta_data
        self.estimator, self.num_particles = estimator, num_particles
        self._settings = {"sigma": sigma, "truncation_length": truncation_length,
                          "meta_objective": meta_objective, "telescope": telescope,
                          "guided": guided}
        self.horizon = horizon
        # Every estimator setting checked now (with a stand-in for the fit's length).
        length = truncation_length or DEFAULTS["truncation_length"]
        self.truncation_length = self._estimator(horizon or length).truncation_length
        if horizon is not None and horizon < self.truncation_length:
            raise ValueError(f"horizon={horizon} is shorter than truncation_length="
                             f"{self.truncation_length}; expected horizon >= "
                             "truncation_length.")
        self.batch_size, self.meta_batch_size = batch_size, meta_batch_size
        self.outer_optimizer = outer_optimizer
        self.layer_hyperparameters = dict(layer_hyperparameters or {})
        self.backup_dir, self.seed, self.verbose = backup_dir, int(seed), verbose
        self.jit_compile, self.execution = jit_compile, execution
        self.trainer: MetaTrainer | None = None
        #: What was read from the compiled optimizer (`keras_optimizers.Compiled`).
        self.compiled = None
        self._window_logs: dict = {}
        #: One entry per window of this ``fit`` (since the restart after a resume):
        #: ``batches``, ``theta`` (after the update) and `MetaTrainer.step`'s logs
        #: ``loss``, ``meta_loss``, ``gradient_norm``, ``valid_pairs``,
        #: ``diverged_pairs``, ``clipped_pairs``, ``updated``.
        self.window_history: list[dict] = []

    def _estimator(self, horizon: int | None) -> Estimator:
        """The estimator, through the front ends' shared `resolve`; staggered only when
        the user gave a horizon (over the whole fit, restarts never happen)."""
        if isinstance(self.estimator, Estimator):
            return resolve(self.estimator, horizon=self.horizon,
                           **{k: v for k, v in self._settings.items() if v is not None})
        options = {} if self.estimator == "full_es" else {"stagger": self.horizon is not None}
        try:
            return resolve(self.estimator, horizon=horizon, **self._settings, **options)
        except ValueError as error:
            if self.horizon is None and horizon is not None:
                raise ValueError(f"{error} (horizon={horizon} is the fit's length, the "
                                 "default when no horizon is given)") from None
            raise

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, logs=None):
        self.compiled = _read_optimizer(self)
        self.space = self.compiled.space
        horizon = self.horizon
        if horizon is None and not isinstance(self.estimator, Estimator):
            horizon = _fit_length(self.params, self.truncation_length)
        self.trainer = _build_trainer(self, self._estimator(horizon))
        self._knobs = _serve_at_run_time(self.model, self.compiled)
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
        # The step count as the last batch left it: no second read of it per batch.
        self._set_learning_rate(self._last_iterations)

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
        self._apply(self._last_iterations)

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
            self._apply(self._last_iterations)
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
            # Hand back a plain Keras optimizer (and schedule) holding the tuned floats;
            # a later fit traces its own step with them.
            keras_compat.restore_attributes(self.model.optimizer)
            if self.compiled.schedule is not None:
                keras_compat.restore_attributes(self.compiled.schedule)
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
        """The current hyperparameters in natural units (by Keras name, or the names
        of the advanced form's space; empty before a fit reads the compiled optimizer)."""
        if self.trainer is not None:
            return self.trainer.values
        return {} if self.space is None else self.space.decode(self.space.encode())

    def tuned_schedule(self) -> keras.optimizers.schedules.LearningRateSchedule:
        """The learning-rate schedule at the tuned values: the compiled schedule's class,
        or the `keras_es.schedules` one the particles followed (``Constant`` for a float
        rate); ``keras.optimizers.schedules.serialize`` / ``deserialize`` round-trip it."""
        return keras_optimizers.tuned_schedule(_fitted(self, "tuned_schedule"), self.values)

    def tuned_optimizer(self) -> keras.optimizers.Optimizer:
        """A fresh optimizer of the compiled class and settings with the tuned values
        (a float learning rate where the schedule is constant), for a plain ``fit``."""
        return keras_optimizers.tuned_optimizer(_fitted(self, "tuned_optimizer"), self.values)

    def _summary(self):
        return ", ".join(f"{k}={v:.4g}" for k, v in self.epoch_logs().items())

    # ------------------------------------------------------------------ applying theta
    def _set_learning_rate(self, step: int | None = None):
        if self.compiled.schedule is not None:
            return  # the model's own schedule, its tuned arguments served from variables
        # The schedule is TensorFlow code; evaluating it eagerly on every batch cost
        # ~1 ms, more than a small model's train step. theta only changes at windows, so
        # evaluate it for the next K steps at once and only look the value up per batch.
        optimizer = self.model.optimizer
        if step is None:
            step = int(optimizer.iterations.numpy())
        index = step - self._lr_start
        if not 0 <= index < len(self._lr_table):
            self._lr_start, index = step, 0
            self._lr_table = _rates(self.compiled.update.learning_rate, self._hp, step,
                                    self.trainer.estimator.truncation_length)
        optimizer.learning_rate.assign(self._lr_table[index])

    def _apply(self, step: int | None = None):
        # theta changes only in a window or a restore, each followed by _apply: decode
        # it here once instead of on every batch. (Eagerly, with the particles' float32
        # ops: a traced function saved ~1 ms a window but cost ~0.1 s to trace.)
        hp = self._hp = self.space.decode(tf.constant(self.trainer.theta_value[None]))
        self._lr_start, self._lr_table = 0, []  # theta changed: recompute the rates
        self._set_learning_rate(step)
        population = self.trainer.system.population
        for index, name in population.layer_hyperparameter_indices.items():
            self.model.non_trainable_variables[index].assign(float(hp[name][0]))
        # Momentum, betas, weight decay, schedule arguments: read by the traced step.
        for name, knob in self._knobs:
            knob.assign(float(hp[name][0]))

    # ------------------------------------------------------------------ backups
    def _save(self):
        backup_lib.ESBackup(self.backup_dir).save(
            self.trainer, self._batches, int(self.model.optimizer.iterations.numpy()))

    def get_config(self) -> dict:
        return _config(self)


def _rates(schedule, hp: dict, step: int, count: int) -> list[float]:
    """The learning rates of ``count`` steps from ``step`` at hyperparameters ``hp``."""
    steps = tf.range(step, step + count, dtype=tf.float32)
    hp = {k: tf.broadcast_to(v, steps.shape) for k, v in hp.items()}
    return schedule(steps, hp).numpy().tolist()


def _fitted(callback: ESCallback, method: str):
    """What ``callback`` read from the compiled optimizer; raises before a fit."""
    if callback.trainer is None:
        raise ValueError(f"{method}() is available once a fit with this callback has "
                         "started: the callback reads the compiled optimizer then.")
    return callback.compiled


def _config(callback: ESCallback) -> dict:
    """`ESCallback.get_config`: its settings, JSON-compatible."""
    estimator = callback.estimator
    tune = callback.tune and {k: list(v) if isinstance(v, tuple) else v
                              for k, v in callback.tune.items()}
    settings = {k: (dataclasses.asdict(v) if k == "guided" and v is not None else v)
                for k, v in callback._settings.items()}
    space = callback.space
    return {"tune": tune, "space": None if space is None else space.get_config(),
            "estimator": estimator if isinstance(estimator, str) else estimator.name,
            **settings, "horizon": callback.horizon, "num_particles": callback.num_particles,
            **{k: getattr(callback, k) for k in (
                "batch_size", "meta_batch_size", "layer_hyperparameters", "backup_dir",
                "seed", "verbose", "jit_compile", "execution")}}
