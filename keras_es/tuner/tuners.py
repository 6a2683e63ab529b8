"""The keras-tuner tuner `keras_es.ESOracle` needs, and `ESSearch`, which builds both.

`ESTuner` runs an ESOracle's trials: each continues one particle's training run from its
checkpoint for K steps (or epochs). `ESSearch` is used like ``keras_tuner.RandomSearch``:
it takes the hypermodel, the `ESOracle` arguments and the tuner's.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import time

import keras
import keras_tuner
import tensorflow as tf

from keras_es import checks
from keras_es.outer import outer_learning_rate_for
from keras_es.tuner import engine_rounds, kt_space
from keras_es.tuner.oracle import (
    ESOracle,
    start_values,
    tuned_hyperparameters,
)
from keras_es.tuner.search_state import PREFIX, distributed, plan_rounds

# The only checkpoint names ESOracle plans; anything else read back is refused.
_CHECKPOINT_NAME = re.compile(r"particle_\d{3,}/episode_\d{5,}_window_\d{5,}\.weights\.h5")
_UNITS = ("steps", "epochs")
_EXECUTIONS = ("auto", "engine", "per_trial")


class ESTuner(keras_tuner.Tuner):
    """Runs `ESOracle` trials: each continues one particle's training run.

    A trial restores particle ``i``'s checkpoint (weights, optimizer slots and
    iteration count; the optimizer's learning rate comes from the trial's
    hyperparameters, not the checkpoint), trains K steps or epochs, saves a new
    checkpoint under ``<project>/es_checkpoints`` and reports the last epoch's logs.
    Checkpoints are written to a new file and renamed, so a trial killed while saving
    leaves the previous one intact and a re-run trial starts from the same weights. In
    distributed search the project directory must be on a shared filesystem.

    The hypermodel builds and compiles the model from ``hp`` as usual; the two twins of
    a pair get the same initial weights and the same data order (common random
    numbers) through ``keras.utils.set_random_seed``.

    On one machine, when the tuned hyperparameters only set values of the compiled
    optimizer (learning rate, momentum, betas, weight decay, arguments of its
    learning-rate schedule: `keras_es.tuner.engine_rounds.probe` checks by building
    the hypermodel), a round's trials train together on the particle engine instead:
    the round's first trial trains all N particles for K steps in one compiled window
    (minibatches drawn with replacement from ``x``; the objective evaluated on all of
    the validation data), the others report their particle's logs, and the
    particles' states are saved per round under ``<project>/es_engine``. ``search``
    prints which path it takes and why.

    Args:
        oracle: An `ESOracle`.
        hypermodel: A `keras_tuner.HyperModel` or a ``build(hp)`` function.
        idle_sleep: Seconds to wait after the oracle answers IDLE (round in progress
            elsewhere), doubled on each further IDLE up to ``max_idle_sleep``.
        max_idle_sleep: Longest wait between IDLE answers, in seconds.
        execution: ``"auto"`` (default): the particle engine where the search allows it,
            else one ``fit`` per trial; ``"engine"`` (refused, saying why, where it
            cannot run); ``"per_trial"``. A search resumes on the path it started on.
        **kwargs: `keras_tuner.Tuner` arguments (``directory``, ``project_name``,
            ``overwrite``, ...).
    """

    def __init__(self, oracle: ESOracle, hypermodel=None, idle_sleep: float = 0.05,
                 max_idle_sleep: float = 2.0, execution: str = "auto", **kwargs):
        if not isinstance(oracle, ESOracle):
            raise ValueError(f"oracle={oracle!r} is invalid; expected a keras_es.ESOracle.")
        checks.positive_float("idle_sleep", idle_sleep)
        checks.positive_float("max_idle_sleep", max_idle_sleep)
        if execution not in _EXECUTIONS:
            raise ValueError(f"execution={execution!r} is invalid; expected one of "
                             f"{_EXECUTIONS}.")
        self.execution = execution
        #: The engine's rounds (`keras_es.tuner.engine_rounds.EngineRounds`) while a
        #: search runs on the particle engine, else None.
        self.engine = None
        self.idle_sleep = float(idle_sleep)
        self.max_idle_sleep = float(max_idle_sleep)
        self._asked = False
        self._idle_streak = 0
        super().__init__(oracle, hypermodel, **kwargs)

    # keras-tuner's search loop retries at once when the oracle is IDLE; back off.
    def pre_create_trial(self):
        if self._asked:
            self._idle_streak += 1
            time.sleep(min(self.max_idle_sleep,
                           self.idle_sleep * 2.0 ** (self._idle_streak - 1)))
        self._asked = True

    def on_trial_begin(self, trial):
        self._asked = False
        self._idle_streak = 0
        super().on_trial_begin(trial)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.project_dir, "es_checkpoints")

    def search(self, *fit_args, **fit_kwargs):
        """Runs the search, as `keras_tuner.Tuner.search` does.

        ``epochs`` means what it means to every keras-tuner user: the length of the
        training run being tuned. With ``horizon=None`` (the default) it sets T,
        ``epochs`` x the steps of one epoch of ``x``; each trial still trains
        ``truncation_length`` steps of one such run. Before any work starts, a
        ``max_trials`` too small for one outer step is refused, and the plan
        (trials per outer step, outer steps within ``max_trials``) is printed.
        """
        oracle = self.oracle
        if isinstance(oracle, ESOracle):  # not on a distributed worker: the chief plans
            _plan_search(oracle, fit_args, fit_kwargs)
        self.engine = _engine_rounds(self, fit_args, fit_kwargs)
        try:
            return super().search(*fit_args, **fit_kwargs)
        finally:
            self.engine = None

    @property
    def engine_dir(self) -> str:
        return os.path.join(self.project_dir, "es_engine")

    def _metadata(self, trial) -> dict:
        values = trial.hyperparameters.values
        meta = {k[len(PREFIX):]: v for k, v in values.items() if k.startswith(PREFIX)}
        if not meta and isinstance(self.oracle, ESOracle):
            meta = self.oracle.trial_metadata(trial.trial_id) or {}
        return meta


    def _path(self, relative) -> str:
        """The checkpoint file ``relative`` names, inside `checkpoint_dir`.

        Names come from oracle.json or, in distributed search, from the chief over the
        network, and a trial writes and deletes what they name: only names of the form
        ESOracle plans (``particle_NNN/episode_NNNNN_window_NNNNN.weights.h5``) pass.
        """
        if not (isinstance(relative, str) and _CHECKPOINT_NAME.fullmatch(relative)):
            raise keras_tuner.errors.FatalError(
                f"Refusing checkpoint path {relative!r} from the search state: expected "
                "particle_NNN/episode_NNNNN_window_NNNNN.weights.h5 inside "
                f"{self.checkpoint_dir}. Was oracle.json edited?")
        return os.path.join(self.checkpoint_dir, relative)

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        es = self._metadata(trial)
        if "checkpoint_out" not in es:
            raise keras_tuner.errors.FatalError(
                "ESTuner got a trial without ESOracle's values; use it with keras_es.ESOracle.")
        _check_metadata(es)
        self._check_execution()
        if self.engine is not None:
            return self._engine_trial(trial, es, kwargs.get("callbacks"))
        # Every path checked before any work.
        out = self._path(es["checkpoint_out"])
        source = self._path(es["checkpoint_in"]) if es["checkpoint_in"] else None
        stale = self._path(es["checkpoint_stale"]) if es["checkpoint_stale"] else None
        # Fresh layer names for every build; skip its gc.collect() (0.4 s a trial here).
        keras.backend.clear_session(free_memory=False)
        keras.utils.set_random_seed(es["init_seed"])
        model = self.hypermodel.build(hp)
        if not isinstance(model, keras.Model):
            raise keras_tuner.errors.FatalTypeError(
                f"The hypermodel returned {model!r}; expected a compiled keras.Model.")
        if source:
            self._restore(model, source)
        keras.utils.set_random_seed(es["data_seed"])
        kwargs = dict(kwargs)
        if es["unit"] == "steps":
            args, kwargs = _repeated(args, kwargs, es["truncation_length"], es["data_seed"])
            kwargs["epochs"] = 1
            kwargs["steps_per_epoch"] = es["truncation_length"]
        else:
            kwargs["epochs"] = es["truncation_length"]
        kwargs.setdefault("verbose", 0)
        history = self.hypermodel.fit(hp, model, *args, **kwargs)
        logs = history.history if isinstance(history, keras.callbacks.History) else history
        os.makedirs(os.path.dirname(out), exist_ok=True)
        partial = f"{out[: -len('.weights.h5')]}.partial{os.getpid()}"
        # The build config first (a Sequential without an Input is built from data, and
        # a checkpoint loads only into a built model), then the weights, each written to
        # a new file and renamed: a kill leaves the previous pair intact.
        with open(partial + ".json", "w") as f:
            json.dump(model.get_build_config(), f)
        os.replace(partial + ".json", _build_config_path(out))
        model.save_weights(partial + ".weights.h5")
        os.replace(partial + ".weights.h5", out)
        if stale:
            # A reassigned trial may run twice at once: the other run may delete it first.
            for path in (stale, _build_config_path(stale)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        if isinstance(logs, dict):
            return {k: float(v[-1]) if isinstance(v, (list, tuple)) else float(v)
                    for k, v in logs.items()}
        return logs

    def _check_execution(self) -> None:
        """Marks the search with the path it runs on; refuses to switch mid-search (a
        particle's training run continues from the other path's files)."""
        oracle = self.oracle
        if not isinstance(oracle, ESOracle) or oracle.search_state is None:
            return  # a distributed worker: the chief's search runs per trial
        es = oracle.search_state.es
        mode = "engine" if self.engine is not None else "per_trial"
        saved = es.setdefault("execution", mode)
        if saved != mode:
            raise keras_tuner.errors.FatalError(
                f"This search ran its trials on the {saved} path and cannot continue on "
                f"the {mode} path (its particles' training runs live in that path's files)"
                "; resume it as it was started, or start over with overwrite=True.")

    def _engine_trial(self, trial, es: dict, callbacks) -> dict:
        logs = self.engine.trial_logs(es["round"], es["particle"])
        for callback in callbacks or ():
            if isinstance(callback, keras.callbacks.TensorBoard):
                _write_tensorboard(callback.log_dir, trial.trial_id, logs)
        return logs

    @staticmethod
    def _restore(model: keras.Model, path: str) -> None:
        optimizer = model.optimizer
        if optimizer is None:
            raise ValueError("The hypermodel's model is not compiled; ESTuner needs an "
                             "optimizer to carry its state between trials.")
        if not model.built:
            config = _build_config_path(path)
            if not os.path.exists(config):
                raise ValueError(
                    f"The model is not built and {config} (its build config) is missing; "
                    "give the model an Input, or resume with the keras_es that saved "
                    f"{path}.")
            with open(config) as f:
                model.build_from_config(json.load(f))
        optimizer.build(model.trainable_variables)
        # The checkpoint holds the optimizer's scalars too (the learning rate): keep the
        # trial's, restore only weights, slots and the iteration count.
        scalars = [(v, v.numpy()) for v in optimizer.variables
                   if len(v.shape) == 0 and "iteration" not in v.path]
        model.load_weights(path)
        for variable, value in scalars:
            variable.assign(value)

    def load_model(self, trial):
        """The model of a particle trial, with the weights that trial saved."""
        meta = self._metadata(trial)
        if self._ran_on_engine() and meta.get("checkpoint_out"):
            return self._load_engine_model(trial, meta)
        relative = meta.get("checkpoint_out")
        if not relative:
            raise ValueError(
                f"Trial {trial.trial_id!r} has no trained weights: the mean theta is never "
                "trained as such. Build it with tuner.hypermodel.build(best_hp) and fit it, "
                "or use get_best_models(), which returns the best particle models.")
        path = self._path(relative)
        if not os.path.exists(path):
            raise ValueError(
                f"Trial {trial.trial_id!r}'s checkpoint {path} was deleted: ESTuner keeps only "
                "each particle's latest checkpoint and the last one of every inner problem.")
        keras.backend.clear_session(free_memory=False)
        model = self.hypermodel.build(trial.hyperparameters)
        self._restore(model, path)
        return model

    def _ran_on_engine(self) -> bool:
        oracle = self.oracle
        return (isinstance(oracle, ESOracle) and oracle.search_state is not None
                and oracle.search_state.es.get("execution") == "engine")

    def _round_file(self, meta: dict) -> str:
        return os.path.join(self.engine_dir, f"round_{int(meta['round']):05d}.npz")

    def _load_engine_model(self, trial, meta: dict) -> keras.Model:
        path = self._round_file(meta)
        if not os.path.exists(path):
            raise ValueError(
                f"Trial {trial.trial_id!r}'s particle states ({path}) were deleted: the "
                "engine keeps the last round's and the best trial's round.")
        keras.backend.clear_session(free_memory=False)
        model = self.hypermodel.build(trial.hyperparameters)
        engine_rounds.load_particle(path, model, int(meta["particle"]))
        return model

    def _has_weights(self, meta: dict) -> bool:
        relative = meta.get("checkpoint_out")
        if not relative:
            return False
        if self._ran_on_engine():
            return os.path.exists(self._round_file(meta))
        return os.path.exists(self._path(relative))

    def get_best_models(self, num_models=1):
        """The best particle models whose weights are still on disk, best first."""
        models = []
        for trial in self.oracle.get_best_particle_trials(len(self.oracle.trials)):
            if self._has_weights(self._metadata(trial)):
                models.append(self.load_model(trial))
            if len(models) == num_models:
                break
        return models

    def results_summary(self, num_trials=10):
        """Prints the learned mean theta, the outer-step trajectory and the best trials."""
        _print_summary(self, num_trials)


class ESSearch(ESTuner):
    """Evolution-strategies search, used like ``keras_tuner.RandomSearch``.

    Example:

    ```python
    import tempfile

    import keras
    import numpy as np

    import keras_es


    def build_model(hp):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(
            hp.Float("learning_rate", 1e-3, 0.5, sampling="log", default=0.05)),
            loss="mse")
        return model


    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1)
    tuner = keras_es.ESSearch(
        build_model, objective="val_loss", max_trials=8, estimator="es_single",
        num_particles=4, sigma=0.3, truncation_length=2, horizon=4, stagger=False,
        directory=tempfile.mkdtemp(), project_name="es_single")
    tuner.search(x, y, validation_data=(x, y), batch_size=16, verbose=0)
    best_hp = tuner.get_best_hyperparameters()[0]    # the learned mean theta, decoded
    assert len(tuner.oracle.history) == 2            # two rounds, two outer steps
    ```

    Args:
        hypermodel: A `keras_tuner.HyperModel` or a ``build(hp)`` function returning a
            compiled model.
        objective: As in `ESOracle`.
        max_trials: As in `ESOracle`.
        estimator: As in `ESOracle`.
        **kwargs: Every other `ESOracle` argument, by the same name and with the same
            default (``num_particles``, ``sigma``, ``truncation_length``, ``horizon``,
            ``meta_objective``, ...), and the `ESTuner` / `keras_tuner.Tuner` arguments
            (``directory``, ``project_name``, ``overwrite``, ``idle_sleep``, ...).
    """

    def __init__(self, hypermodel=None, objective=None, max_trials=None,
                 estimator="es_single", **kwargs):
        names = set(inspect.signature(ESOracle).parameters)
        oracle = ESOracle(objective=objective, max_trials=max_trials, estimator=estimator,
                          **{k: v for k, v in kwargs.items() if k in names})
        super().__init__(oracle, hypermodel,
                         **{k: v for k, v in kwargs.items() if k not in names})


# ---------------------------------------------------------------------- helpers
def _engine_rounds(tuner: ESTuner, fit_args, fit_kwargs):
    """`EngineRounds` for this search, or None (per-trial path), saying which."""
    oracle = tuner.oracle
    saved = oracle.search_state.es.get("execution") if (
        isinstance(oracle, ESOracle) and oracle.search_state is not None) else None
    wanted = saved or tuner.execution
    if wanted == "per_trial" or not isinstance(oracle, ESOracle):
        return None
    try:
        if distributed():
            raise engine_rounds.NotOnEngine("keras-tuner runs distributed")
        if oracle.unit != "steps" or oracle.full_unroll:
            raise engine_rounds.NotOnEngine("trials train whole epochs or training runs")
        train, validation, batch_size = engine_rounds.fit_data(fit_args, fit_kwargs)
        model, mapping = engine_rounds.probe(
            tuner.hypermodel, oracle.hyperparameters, tuned_hyperparameters(oracle),
            start_values(oracle))
        rounds = engine_rounds.EngineRounds(oracle, tuner.engine_dir, model, mapping, train,
                                            validation, batch_size, oracle.objective.name)
    except engine_rounds.NotOnEngine as reason:
        if wanted == "engine":
            raise ValueError(f"execution='engine' cannot run this search: {reason}. "
                             "Use execution='auto' or 'per_trial'.") from None
        print(f"ESSearch: each trial trains its own model with fit ({reason}).")
        return None
    shown = ", ".join(f"{h} -> {k}" for h, k in rounds.mapping.items())
    print(f"ESSearch: each round's {oracle.num_particles} particles train together on "
          f"the particle engine ({shown}).")
    return rounds


def _print_summary(tuner: ESTuner, num_trials: int) -> None:
    """`ESTuner.results_summary`."""
    oracle = tuner.oracle
    print("Results summary")
    print(f"Results in {tuner.project_dir}")
    print(f"{oracle.objective}")
    if not isinstance(oracle, ESOracle) or oracle.search_state is None:
        print("No outer step yet.")
        return
    es = oracle.search_state.es
    print(f"ES: {oracle.estimator_name}, {oracle.num_particles} particles, "
          f"sigma={oracle.sigma}, K={oracle.truncation_length} {oracle.unit}, "
          f"T={oracle.horizon} {oracle.unit}, meta-objective {oracle.meta_objective}")
    print(f"{es['outer_step']} outer steps over {es['round_index']} rounds; "
          f"{len(oracle.trials)} trials, {oracle.steps_spent} {oracle.unit} of training")
    print()
    print("Mean theta (get_best_hyperparameters()[0]):")
    tuned = set(es["config"]["names"])
    for name, value in oracle.mean_values().items():
        note = "" if name in tuned else "  (not tuned: its default)"
        print(f"  {name}: {kt_space.format_value(value)}{note}")
    history = oracle.history
    if history:
        print()
        print(f"Trajectory (outer step: mean {oracle.objective.name} of the round):")
        shown = history if len(history) <= 10 else history[:3] + [None] + history[-6:]
        for entry in shown:
            if entry is None:
                print("  ...")
                continue
            value = entry[oracle.objective.name]
            print(f"  {entry['outer_step']:5d}: {kt_space.format_value(value)}  "
                  f"(valid pairs {entry['valid_pairs']})")
    print()
    print(f"Showing {num_trials} best particle trials")
    for trial in oracle.get_best_particle_trials(num_trials):
        print()
        trial.summary()


def _steps_per_epoch(fit_args, fit_kwargs) -> int | None:
    """Batches in one epoch of ``fit``'s training data, or None if it cannot tell."""
    if fit_kwargs.get("steps_per_epoch"):
        return int(fit_kwargs["steps_per_epoch"])
    x = fit_args[0] if fit_args else fit_kwargs.get("x")
    batch_size = fit_kwargs.get("batch_size") or (fit_args[2] if len(fit_args) > 2 else None)
    if isinstance(x, tf.data.Dataset):
        count = int(x.cardinality())
        return count if count > 0 else None
    if isinstance(x, keras.utils.PyDataset):
        try:
            return len(x)
        except (TypeError, NotImplementedError):
            return None
    if isinstance(x, dict) and x:
        x = next(iter(x.values()))
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if getattr(x, "shape", None) is None or not len(x.shape):
        return None  # a generator or something else fit takes without a length
    rows = int(x.shape[0])
    split = fit_kwargs.get("validation_split") or 0.0
    rows = int(math.floor(rows * (1.0 - split)))
    return max(1, math.ceil(rows / (batch_size or 32)))


def _repeated(args: tuple, kwargs: dict, length: int, seed: int) -> tuple[tuple, dict]:
    """``fit``'s arguments for a trial of ``length`` steps: arrays with fewer batches
    than that become a shuffled, repeated ``tf.data.Dataset`` (Keras stops an epoch of
    arrays when they run out, so the trial would train fewer steps than planned)."""
    per_epoch = _steps_per_epoch(args, kwargs)
    if per_epoch is None or per_epoch >= length or kwargs.get("validation_split"):
        return args, kwargs
    kwargs = dict(kwargs)
    x = args[0] if args else kwargs.pop("x", None)
    y = args[1] if len(args) > 1 else kwargs.pop("y", None)
    if (len(args) > 2 or y is None or isinstance(x, dict) or not hasattr(x, "shape")
            or kwargs.get("sample_weight") is not None):
        return args, kwargs  # not plain arrays: fit's own handling
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    data = data.batch(kwargs.pop("batch_size", None) or 32).repeat()
    kwargs["shuffle"] = False  # the dataset is shuffled; fit would warn otherwise
    return (data,), kwargs


def _plan_search(oracle: ESOracle, fit_args, fit_kwargs) -> None:
    """Sets T from ``search(epochs=...)`` when the oracle has no horizon, refuses an
    ``epochs`` that contradicts a given horizon and a ``max_trials`` too small for one
    outer step, and prints the plan, all before any trial runs."""
    epochs = fit_kwargs.get("epochs", fit_args[3] if len(fit_args) > 3 else None)
    if epochs is not None:
        checks.positive_int("epochs", epochs)
    unit = oracle.unit
    per_epoch = 1 if unit == "epochs" else _steps_per_epoch(fit_args, fit_kwargs)
    asked = None if per_epoch is None else (epochs or 1) * per_epoch
    if oracle.horizon_given:
        if epochs is not None and asked is not None and asked != oracle.horizon:
            raise ValueError(
                f"search(epochs={epochs}) asks for training runs of {asked} {unit}, but this "
                f"ESSearch was built with horizon={oracle.horizon} {unit}; drop one of the "
                "two (horizon is the length of one training run).")
    else:
        if asked is None:
            raise ValueError(
                "ESSearch cannot tell how many steps one epoch of this data has (a generator "
                "or a dataset of unknown length); pass steps_per_epoch=... to search(), or "
                "horizon=... (steps of one training run) to ESSearch.")
        length = asked if oracle.full_unroll else oracle.truncation_length
        horizon = max(length, round(asked / length) * length)
        oracle.set_horizon(horizon)
        if horizon != asked:
            print(f"ESSearch: training runs of {horizon} {unit} ({asked} rounded to a "
                  f"multiple of truncation_length={length}).")
    if oracle.search_state is None and oracle.max_trials is not None:
        _check_budget(oracle)


def _check_budget(oracle: ESOracle) -> None:
    """Refuses a ``max_trials`` too small for one outer step; prints the plan: the
    outer steps ``max_trials`` buys and the training steps they spend."""
    first = oracle.trials_before_first_update()
    length, unit, particles = oracle.truncation_length, oracle.unit, oracle.num_particles
    if oracle.max_trials < first:
        raise ValueError(
            f"max_trials={oracle.max_trials} is too small: each trial trains one particle "
            f"for {length} {unit}, and the first outer step needs {first} trials (a round "
            f"of the pairs that start first). Pass max_trials >= {first} (one more outer "
            f"step per {particles} trials), or fewer num_particles.")
    sizes = plan_rounds(oracle.estimator, particles, oracle.max_trials)
    used, steps = sum(sizes), len(sizes)
    rate = ""
    if oracle.auto_outer_rate:
        value = outer_learning_rate_for(steps)
        oracle.outer_optimizer.learning_rate = value  # not built yet: no slots to redo
        rate = (f" Outer learning rate {value:.3g}, from {steps} outer steps (pass "
                "outer_learning_rate= to choose it).")
    short = sum(s < particles for s in sizes)
    staggered = (f" ({short} round{'s' if short != 1 else ''} of the staggered start with "
                 "fewer pairs)" if short else "")
    unused = (f"; the last {oracle.max_trials - used} cannot complete a round and are not "
              "run" if used < oracle.max_trials else "")
    print(f"ESSearch: {particles} particles, training runs of {oracle.horizon} {unit}, "
          f"{length} {unit} per trial, one outer step per round of trials{staggered}: "
          f"max_trials={oracle.max_trials} gives {steps} outer step"
          f"{'s' if steps != 1 else ''} from {used} trials ({used * length} {unit} of "
          f"training){unused}.{rate}")


_METADATA_TYPES = {"init_seed": int, "data_seed": int, "truncation_length": int, "unit": str,
                   "checkpoint_in": str, "checkpoint_out": str, "checkpoint_stale": str}


def _check_metadata(meta: dict) -> None:
    """Refuses trial metadata (read from storage or the network) of the wrong shape."""
    for key, kind in _METADATA_TYPES.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise keras_tuner.errors.FatalError(
                f"Refusing the trial's {key}={value!r} from the search state: expected "
                f"{kind.__name__}. Was oracle.json edited?")
    if meta["unit"] not in _UNITS or meta["truncation_length"] < 1:
        raise keras_tuner.errors.FatalError(
            f"Refusing the trial's unit={meta['unit']!r} / truncation_length="
            f"{meta['truncation_length']!r} from the search state.")


def _write_tensorboard(log_dir: str, trial_id: str, logs: dict) -> None:
    """A trial's logs where Keras's TensorBoard callback writes a fit's epoch logs
    (``<log_dir>/<trial id>/train`` and ``/validation``), for a trial that ran on the
    engine, where no fit calls the callback."""
    for split, prefix in (("train", ""), ("validation", "val_")):
        values = {k[len(prefix):]: v for k, v in logs.items()
                  if (k.startswith("val_") if prefix else not k.startswith("val_"))}
        if not values:
            continue
        writer = tf.summary.create_file_writer(os.path.join(str(log_dir), trial_id, split))
        with writer.as_default():
            for name, value in values.items():
                tf.summary.scalar(f"epoch_{name}", value, step=0)
        writer.close()


def _build_config_path(checkpoint: str) -> str:
    """Where the build config of a ``.weights.h5`` checkpoint is kept."""
    return checkpoint[: -len(".weights.h5")] + ".build.json"
