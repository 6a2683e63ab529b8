"""`ESSearch` on the particle engine: a round's N trials train together.

Each ES trial trains one particle for K steps. Run one at a time through ``fit``, a
trial rebuilds a Keras model, loads a checkpoint and traces a new train step, which
costs far more than the K steps themselves for the models most searches tune. When the
tuned hyperparameters only set values of the compiled optimizer (learning rate,
momentum, betas, weight decay, arguments of its learning-rate schedule), every
particle has the same model, and the round's N particles train together as one
`keras_es.engine.Population` in one compiled window.

`probe` finds out whether a hypermodel is such a one, by building it at the search's
start values and once more per hyperparameter at another value, and comparing what
changed (``get_config`` of the model, of its compile settings and of its optimizer).
`EngineRounds` then runs rounds: the first trial of a round trains the whole round
(fresh particles where the search starts a new training run, the others continue) and
every trial reports its particle's logs. The particles' states are saved at the end of
every round under ``<project>/es_engine`` (written to a new file and renamed), so a
search killed mid-round resumes without training anything twice, and
`keras_es.ESTuner.load_model` rebuilds any trial whose round file is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

import keras
import numpy as np
import tensorflow as tf

from keras_es import engine
from keras_es.callback import keras_optimizers
from keras_es.engine.keras_system import as_tensors
from keras_es.engine.population import per_key
from keras_es.transforms import Hyperparameter, SearchSpace
from keras_es.unrolled import select

_ROUND_FILE = re.compile(r"round_(\d{5,})\.npz")
# fit's arguments the engine reproduces; any other is a reason for the per-trial path.
_FIT_ARGUMENTS = ("x", "y", "batch_size", "epochs", "validation_data", "validation_split",
                  "verbose", "callbacks", "steps_per_epoch", "shuffle")
_METRICS = {"sparse_categorical_accuracy": keras.metrics.sparse_categorical_accuracy,
            "categorical_accuracy": keras.metrics.categorical_accuracy,
            "binary_accuracy": keras.metrics.binary_accuracy,
            "mae": keras.metrics.mean_absolute_error,
            "mean_absolute_error": keras.metrics.mean_absolute_error,
            "mse": keras.metrics.mean_squared_error,
            "mean_squared_error": keras.metrics.mean_squared_error}


class NotOnEngine(Exception):
    """Why a search cannot run on the particle engine (the message says)."""


# ---------------------------------------------------------------------- probing
def _build(hypermodel, hyperparameters, values: dict) -> keras.Model:
    hp = hyperparameters.copy()
    hp.values = {**hp.values, **values}
    keras.backend.clear_session(free_memory=False)
    model = hypermodel.build(hp)
    if not isinstance(model, keras.Model) or model.optimizer is None:
        raise NotOnEngine("the hypermodel did not return a compiled keras.Model")
    return model


def _optimizer_values(optimizer) -> dict:
    """The optimizer's config with a schedule's arguments flattened into it."""
    config = dict(optimizer.get_config())
    config.pop("name", None)
    schedule = config.get("learning_rate")
    if isinstance(schedule, dict):
        config["learning_rate"] = schedule.get("class_name")
        config.update(schedule.get("config", {}))
        config.pop("name", None)
    return config


def _signature(model: keras.Model) -> tuple:
    """What must not change between particles: the model and its compile settings."""
    compile_config = dict(model.get_compile_config() or {})
    compile_config.pop("optimizer", None)
    return (json.dumps(model.get_config(), sort_keys=True, default=str),
            json.dumps(compile_config, sort_keys=True, default=str),
            type(model.optimizer).__name__)


def _other_value(hp, value):
    """A second valid value of keras-tuner hyperparameter ``hp``, different from
    ``value``."""
    if hasattr(hp, "values"):  # Choice
        return next((v for v in hp.values if v != value), value)
    if isinstance(value, bool):
        return not value
    low, high = hp.min_value, hp.max_value
    for fraction in (0.25, 0.75):
        if getattr(hp, "sampling", "linear") == "log" and low > 0:
            other = low * (high / low) ** fraction
        else:
            other = low + (high - low) * fraction
        other = int(round(other)) if isinstance(value, int) else float(other)
        if other != value:
            return other
    return value


def _same(a, b) -> bool:
    return (isinstance(a, (int, float)) and isinstance(b, (int, float))
            and math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0))


def probe(hypermodel, hyperparameters, tuned, start: dict) -> tuple[keras.Model, dict]:
    """``(model built at start, {hyperparameter name: Keras optimizer or schedule
    name})`` for a hypermodel whose tuned hyperparameters only set compiled optimizer
    values (each passed as is); raises `NotOnEngine` saying which one does more."""
    if type(hypermodel).fit is not _kt_fit():
        raise NotOnEngine("the hypermodel overrides fit (its hyperparameters may act there)")
    base = _build(hypermodel, hyperparameters, start)
    signature, values = _signature(base), _optimizer_values(base.optimizer)
    mapping = {}
    for hp in tuned:
        value = start.get(hp.name)
        other = _other_value(hp, value)
        if other == value:
            continue
        model = _build(hypermodel, hyperparameters, {**start, hp.name: other})
        if _signature(model) != signature:
            raise NotOnEngine(f"{hp.name!r} changes the model or its compile settings, "
                              "not only optimizer values")
        changed = _optimizer_values(model.optimizer)
        keys = [k for k in values if changed.get(k) != values[k]]
        if not keys:
            continue  # no effect on the model: noise only, on either path
        key = keys[0]
        if len(keys) > 1 or key not in keras_optimizers.KERAS_NAMES or not (
                _same(values[key], value) and _same(changed[key], other)):
            raise NotOnEngine(f"{hp.name!r} sets {keys} of the optimizer in a way the "
                              "engine cannot follow (expected one value, passed as is)")
        if key in mapping.values():
            raise NotOnEngine(f"two hyperparameters set the optimizer's {key!r}")
        mapping[hp.name] = key
    # The model the particles copy, built (and named) as the start values build it.
    return _build(hypermodel, hyperparameters, start), mapping


def _kt_fit():
    import keras_tuner
    return keras_tuner.HyperModel.fit


# ---------------------------------------------------------------------- data
def fit_data(fit_args, fit_kwargs) -> tuple:
    """``(train (x, y), validation (x, y) or None, batch_size)`` from ``search``'s
    arguments, or `NotOnEngine` naming what the engine does not reproduce."""
    names = ("x", "y", "batch_size", "epochs")
    given = {**dict(zip(names, fit_args, strict=False)), **fit_kwargs}
    unknown = sorted(k for k, v in given.items()
                     if k not in _FIT_ARGUMENTS and v is not None)
    if len(fit_args) > len(names) or unknown:
        raise NotOnEngine(f"search() was given {unknown or 'more positional arguments'}, "
                          "which the particle engine does not apply")
    x, y = given.get("x"), given.get("y")
    if x is None or not (isinstance(x, tf.data.Dataset) or hasattr(x, "shape")):
        raise NotOnEngine("the training data is not arrays or a tf.data.Dataset")
    try:
        train = as_tensors(x if y is None else (x, y), "x")
        validation = given.get("validation_data")
        split = given.get("validation_split") or 0.0
        if split:
            rows = int(train[0].shape[0])
            cut = rows - int(rows * split)  # Keras holds out the last rows
            train, validation = ((train[0][:cut], train[1][:cut]),
                                 (train[0][cut:], train[1][cut:]))
        elif validation is not None:
            if isinstance(validation, (tuple, list)) and len(validation) != 2:
                raise NotOnEngine("validation_data has sample weights")
            validation = as_tensors(validation, "validation_data")
    except ValueError as error:
        raise NotOnEngine(str(error)) from None
    batch_size = given.get("batch_size") or _dataset_batch(x) or 32
    return train, validation, int(batch_size)


def _dataset_batch(x) -> int | None:
    if isinstance(x, tf.data.Dataset):
        shape = x.element_spec[0].shape
        if shape.rank and shape[0] is None:
            return int(next(iter(x))[0].shape[0])
    return None


def _per_example_metric(name: str, loss_name: str, classes: int):
    """A compiled metric's per-example function (Keras's choice for ``"accuracy"``)."""
    if name in ("accuracy", "acc"):
        if classes == 1 or "binary" in loss_name:
            return keras.metrics.binary_accuracy
        if "sparse" in loss_name or loss_name in ("", "crossentropy"):
            return keras.metrics.sparse_categorical_accuracy
        return keras.metrics.categorical_accuracy
    return _METRICS.get(name)


# ---------------------------------------------------------------------- rounds
class EngineRounds:
    """Trains each round's particles together and answers each trial with its logs.

    Args:
        oracle: The `keras_es.ESOracle` (its search state plans the rounds).
        directory: Where round files go (``<project>/es_engine``).
        model: The hypermodel's model at the start values (`probe`).
        mapping: ``{hyperparameter name: Keras optimizer or schedule name}`` (`probe`).
        train: ``(x, y)`` tensors; validation: ``(x, y)`` or None.
        batch_size: The particles' batch size.
        objective: The oracle's objective name (``"val_loss"``, ``"val_accuracy"``, ...).
    """

    def __init__(self, oracle, directory: str, model: keras.Model, mapping: dict,  # noqa: PLR0913
                 train, validation, batch_size: int, objective: str,
                 jit_compile: bool = False):
        if not mapping:
            raise NotOnEngine("no tuned hyperparameter sets a value of the compiled optimizer")
        if not model.built or not getattr(model, "inputs", None):
            model.build((None, *train[0].shape[1:]))
        names = sorted(set(mapping.values()))
        try:
            compiled = keras_optimizers.read_compiled(model.optimizer, dict.fromkeys(names))
            loss = engine.resolve_loss(model.loss)
        except ValueError as error:
            raise NotOnEngine(str(error)) from None
        starts = dict(zip(compiled.space.names,
                          (h.value for h in compiled.space.hyperparameters), strict=True))
        # theta columns are the optimizer's values themselves: the search state decodes
        # them from its own theta, and the particles take them as they are.
        space = SearchSpace([Hyperparameter(n, starts[n], "identity") for n in names])
        metrics = _metrics(model, loss, train)
        metric = objective[4:] if objective.startswith("val_") else objective
        if metric != "loss" and metric not in metrics:
            raise NotOnEngine(f"the objective {objective!r} is not a loss or compiled metric "
                              "the engine computes")
        if objective.startswith("val_") and validation is None:
            raise NotOnEngine(f"the objective {objective!r} needs validation data")
        if not objective.startswith("val_") and metric != "loss":
            raise NotOnEngine(f"the objective {objective!r} is a training metric")
        self.oracle, self.directory, self.mapping = oracle, directory, dict(mapping)
        self.names, self.starts = names, starts
        self.population = engine.Population(model, oracle.num_particles, space, loss,
                                            compiled.update, metrics=metrics)
        self.train, self.validation, self.batch_size = train, validation, batch_size
        self.input_shape = tuple(train[0].shape[1:])
        self._round = tf.function(self._round_fn, jit_compile=jit_compile, autograph=False)
        self.state = self.state_round = None
        self.logs_round, self.logs = None, {}

    # ------------------------------------------------------------------ compiled parts
    def _window_fn(self, state, theta, keys):
        """K steps of every particle (``keys`` int32 ``[K, N, 2]``: one batch per
        particle per step, twins alike): ``(state, mean training loss [N])``."""
        x, y = self.train
        rows = tf.shape(x)[0]

        def body(j, state, total):
            index = per_key(lambda k: tf.random.stateless_uniform(
                [self.batch_size], k, 0, rows, tf.int32), keys[j], tf.int32)
            state, loss = self.population.train_step(state, theta, tf.gather(x, index),
                                                     tf.gather(y, index))
            return j + 1, state, total + loss

        steps = tf.shape(keys)[0]
        _, state, total = tf.while_loop(
            lambda j, *_: j < steps, body,
            (tf.constant(0), state, tf.zeros([self.population.num_particles])))
        return state, total / tf.cast(steps, tf.float32)

    def _round_fn(self, state, active, fresh, init_keys, theta, keys):
        """One round: restarts the ``fresh`` particles, trains all for K steps and keeps
        the ``active`` ones' new states: ``(state, logs {name: [N]})``."""
        state = self.population.reset(state, fresh, init_keys)
        new, loss = self._window_fn(state, theta, keys)
        logs = {"loss": loss}
        if self.validation is not None:
            scores = self.population.evaluate(new, *self.validation)
            logs.update({f"val_{k}": v for k, v in scores.items()})
        return select(active, new, state), logs

    # ------------------------------------------------------------------ rounds
    def trial_logs(self, round_index: int, particle: int) -> dict:
        """Particle ``particle``'s logs in round ``round_index``, training the round
        (or reading its file) the first time any of its trials asks."""
        if self.logs_round != round_index:
            if not self._load(round_index):
                self._run(round_index)
        return dict(self.logs[str(particle)])

    def _run(self, round_index: int) -> None:
        es = self.oracle.search_state.es
        plan = es["round"]
        if es["round_index"] != round_index:
            raise ValueError(f"ESSearch was asked for round {round_index}'s trials while "
                             f"the search plans round {es['round_index']}.")
        n, length = self.population.num_particles, self.oracle.truncation_length
        active, fresh = np.zeros([n], bool), np.zeros([n], bool)
        theta = np.tile([self.starts[k] for k in self.names], [n, 1]).astype(np.float32)
        keys = np.zeros([length, n, 2], np.int32)
        init_keys = np.zeros([n, 2], np.int32)
        for i in plan["particles"]:
            values, meta = plan["values"][str(i)], plan["meta"][str(i)]
            active[i], fresh[i] = True, not meta["checkpoint_in"]
            for name, key in self.mapping.items():
                theta[i, self.names.index(key)] = float(values[name])
            keys[:, i] = np.stack([np.full([length], meta["data_seed"]), np.arange(length)], 1)
            init_keys[i] = [meta["init_seed"], 0]
        state = self._start_state(round_index)
        self.state, logs = self._round(state, *(tf.constant(a) for a in (
            active, fresh, init_keys, theta, keys)))
        self.state_round = self.logs_round = round_index
        logs = {k: v.numpy() for k, v in logs.items()}
        self.logs = {str(i): {k: float(v[i]) for k, v in logs.items()}
                     for i in plan["particles"]}
        self._save(round_index)

    def _start_state(self, round_index: int):
        """The particles' state at the start of round ``round_index``."""
        if self.state_round == round_index - 1 and self.state is not None:
            return self.state
        if round_index == 0:
            keys = tf.zeros([self.population.num_particles, 2], tf.int32)
            return self.population.init(keys)
        if not self._load(round_index - 1, logs=False):
            raise ValueError(
                f"The particles' states after round {round_index - 1} "
                f"({self.path(round_index - 1)}) are missing, so round {round_index} cannot "
                "continue their training runs; restore the file, or start over with "
                "overwrite=True.")
        return self.state

    # ------------------------------------------------------------------ files
    def path(self, round_index: int) -> str:
        return os.path.join(self.directory, f"round_{round_index:05d}.npz")

    def _save(self, round_index: int) -> None:
        os.makedirs(self.directory, exist_ok=True)
        leaves = {f"leaf_{j:04d}": np.asarray(v)
                  for j, v in enumerate(tf.nest.flatten(self.state))}
        partial = self.path(round_index) + f".partial{os.getpid()}.npz"
        np.savez(partial, logs=json.dumps(self.logs),
                 input_shape=np.asarray(self.input_shape, np.int64), **leaves)
        os.replace(partial, self.path(round_index))
        keep = {round_index, *self._best_rounds()}
        for name in os.listdir(self.directory):
            match = _ROUND_FILE.fullmatch(name)
            if match and int(match.group(1)) not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))

    def _best_rounds(self) -> set:
        rounds = set()
        for trial in self.oracle.get_best_particle_trials(1):
            meta = self.oracle.trial_metadata(trial.trial_id) or {}
            if isinstance(meta.get("round"), int):
                rounds.add(meta["round"])
        return rounds

    def _load(self, round_index: int, logs: bool = True) -> bool:
        """Reads round ``round_index``'s file into memory; False when it is missing."""
        path = self.path(round_index)
        if not os.path.exists(path):
            return False
        template = tf.nest.flatten(self.population.init(
            tf.zeros([self.population.num_particles, 2], tf.int32)))
        leaves, saved_logs = read_round_file(path, [(t.shape, t.dtype) for t in template])
        self.state = tf.nest.pack_sequence_as(
            self.population.init(tf.zeros([self.population.num_particles, 2], tf.int32)),
            [tf.constant(v) for v in leaves])
        self.state_round = round_index
        if logs:
            self.logs_round, self.logs = round_index, saved_logs
        return True


def read_round_file(path: str, spec: list) -> tuple[list, dict]:
    """``(state leaves, logs)`` of a round file, each leaf checked against ``spec``
    (``[(shape, dtype)]``) and the logs' shape checked (read from storage)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            leaves = [data[f"leaf_{j:04d}"] for j in range(len(spec))]
            logs = json.loads(str(data["logs"]))
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"The round file {path} is damaged ({error}); restore it or "
                         "start over with overwrite=True.") from None
    for leaf, (shape, dtype) in zip(leaves, spec, strict=True):
        if tuple(leaf.shape) != tuple(shape) or leaf.dtype != dtype.as_numpy_dtype:
            raise ValueError(f"The round file {path} holds an array of shape {leaf.shape} "
                             f"and dtype {leaf.dtype} where this search's particles have "
                             f"{tuple(shape)} and {dtype.name}; was it written by another "
                             "search? Start over with overwrite=True.")
    if not (isinstance(logs, dict) and all(
            isinstance(v, dict) and all(isinstance(x, float) for x in v.values())
            for v in logs.values())):
        raise ValueError(f"The round file {path} holds logs of the wrong form.")
    return leaves, logs


def _metrics(model: keras.Model, loss, train) -> dict:
    """The compiled metrics the engine can compute per particle, by their log names."""
    config = model.get_compile_config() or {}
    names = [m for m in (config.get("metrics") or []) if isinstance(m, str)]
    loss_name = model.loss if isinstance(model.loss, str) else type(model.loss).__name__
    classes = int(model.outputs[0].shape[-1]) if getattr(model, "outputs", None) else 0
    out = {}
    for name in names:
        fn = _per_example_metric(name, str(loss_name).lower(), classes)
        if fn is not None:
            out[name] = fn
    return out


def load_particle(path: str, model: keras.Model, particle: int) -> None:
    """Loads particle ``particle``'s weights after the round of file ``path`` into
    ``model`` (built here from the saved input shape if needed), checking every array
    against the model's variables (read from storage)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            input_shape = tuple(int(v) for v in data["input_shape"])
            if not model.built or not getattr(model, "inputs", None):
                model.build((None, *input_shape))
            variables = model.trainable_variables + model.non_trainable_variables
            leaves = [data[f"leaf_{j:04d}"] for j in range(len(variables))]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"The round file {path} is damaged ({error}); its trials' "
                         "models cannot be loaded.") from None
    for variable, leaf in zip(variables, leaves, strict=True):
        if tuple(leaf.shape[1:]) != tuple(variable.shape) or not 0 <= particle < leaf.shape[0]:
            raise ValueError(f"The round file {path} holds {variable.path} with shape "
                             f"{leaf.shape}; expected [particles, *{tuple(variable.shape)}]. "
                             "Was it written by another search?")
        variable.assign(leaf[particle])
