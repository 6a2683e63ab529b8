"""Reading the Keras optimizer a model is compiled with, for `keras_es.ESCallback`.

`read_compiled` turns ``model.optimizer`` and a ``tune`` request in Keras's own names
(``"learning_rate"``, ``"momentum"``, ``"beta_1"``, ``"beta_2"``, ``"weight_decay"``,
or the arguments of the learning-rate schedule it was compiled with, such as
``"initial_learning_rate"`` and ``"decay_rate"``) into what the particles need: a
`SearchSpace` that starts at the compiled values, and the `keras_es.engine` update
that trains exactly as the compiled optimizer does, with the tuned values as
hyperparameter names. `read_mapping` does the same checks for the advanced form (a
`SearchSpace` and a `keras_es.engine.SGD` / `Adam` mapping). `tuned_schedule` and
`tuned_optimizer` turn the tuned values back into plain Keras objects.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_es import engine, schedules
from keras_es.transforms import Hyperparameter, Logit, LogRange, SearchSpace

_SCHEDULES = keras.optimizers.schedules
# Keras optimizer class -> the particles' update written in keras_es.engine.
ENGINE_UPDATE = {keras.optimizers.SGD: engine.SGD, keras.optimizers.Adam: engine.Adam,
                 keras.optimizers.AdamW: engine.Adam}
# The optimizer's own tunable attributes, by Keras name.
OPTIMIZER_NAMES = {engine.SGD: ("learning_rate", "momentum", "weight_decay"),
                   engine.Adam: ("learning_rate", "beta_1", "beta_2", "weight_decay")}
# Attributes Keras reads as Python floats when it traces the train step; tuned ones are
# served from variables (keras_compat.read_at_run_time).
TRACED = {engine.SGD: ("momentum", "weight_decay"),
          engine.Adam: ("beta_1", "beta_2", "weight_decay")}
# Compiled schedules the particles can follow: the class they evaluate per particle
# (same formula, same argument names) and the arguments that can be tuned.
FOLLOWED = {_SCHEDULES.ExponentialDecay: schedules.ExponentialDecay,
            schedules.ExponentialDecay: schedules.ExponentialDecay,
            schedules.InverseTimeDecay: schedules.InverseTimeDecay,
            schedules.Constant: schedules.Constant,
            schedules.PiecewiseLinear: schedules.PiecewiseLinear}
_POSITIVE = ("learning_rate", "weight_decay", "initial_learning_rate", "decay_steps",
             "decay_rate", "power")
_FRACTION = ("momentum", "beta_1", "beta_2")
#: Every name ``tune`` may use (which of them a model has depends on its optimizer).
KERAS_NAMES = _POSITIVE + _FRACTION
# Options of a Keras optimizer that the particles' update does not reproduce.
_UNSUPPORTED = ("clipnorm", "clipvalue", "global_clipnorm", "gradient_accumulation_steps",
                "amsgrad")


def parse_tune(tune) -> dict:
    """``tune`` as ``{Keras name: None | start value | (low, high)}``; raises
    ``ValueError`` naming the entry for anything else. A name or a list of names
    tunes each from the compiled value, without bounds."""
    given = tune
    if isinstance(tune, str):
        tune = [tune]
    if isinstance(tune, (list, tuple)) and all(isinstance(n, str) for n in tune):
        if len(set(tune)) != len(tune):
            raise ValueError(f"tune={list(tune)!r} names a hyperparameter twice.")
        tune = dict.fromkeys(tune)
    if not isinstance(tune, dict) or not tune:
        raise ValueError(
            f"tune={given!r} is invalid; expected Keras hyperparameter names such as "
            "['learning_rate', 'momentum'], a dict {name: None | start value | (low, high)}, "
            "or a keras_es.SearchSpace (with an optimizer mapping).")
    for name, spec in tune.items():
        if name not in KERAS_NAMES:
            raise ValueError(f"tune names {name!r}, which is not a hyperparameter ESCallback "
                             f"tunes by name; expected some of {list(KERAS_NAMES)}.")
        _check_spec(name, spec)
    return {k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v)
            for k, v in tune.items()}


def _number(x) -> bool:
    return (isinstance(x, (int, float, np.floating)) and not isinstance(x, bool)
            and math.isfinite(x))


def _check_spec(name: str, spec) -> None:
    fraction = name in _FRACTION
    if spec is None:
        return
    if _number(spec) and (0 < spec < 1 if fraction else spec > 0):
        return
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(map(_number, spec)):
        low, high = spec
        if (0 <= low < high <= 1) if fraction else (0 < low < high):
            return
    raise ValueError(
        f"tune[{name!r}]={spec!r} is invalid; expected None (start from the compiled "
        f"value), a start value ({'0 < value < 1' if fraction else 'value > 0'}), or a "
        f"range (low, high) with {'0 <= low < high <= 1' if fraction else '0 < low < high'}.")


def _hyperparameter(name: str, value: float, spec, where: str) -> Hyperparameter:
    """The hyperparameter ``name`` starting at ``value`` with the transform ``spec``
    asks for; ``where`` says where the value came from, for errors."""
    if _number(spec):
        value = float(spec)
    elif value is None or not _number(value) or not value > 0 or (
            name in _FRACTION and not value < 1):
        raise ValueError(
            f"tune names {name!r}, but {where} has {name}={value!r}, which cannot start a "
            f"search; give a start value (tune={{{name!r}: ...}}) or compile with one.")
    if isinstance(spec, tuple):
        transform = (Logit(*spec) if name in _FRACTION else LogRange(*spec))
        if not spec[0] < value < spec[1]:
            raise ValueError(f"tune[{name!r}]={spec!r} does not contain the start value "
                             f"{name}={value!r} ({where}); widen the range or compile with "
                             "a value inside it.")
    else:
        transform = "logit" if name in _FRACTION else "log"
    return Hyperparameter(name, float(value), transform)


@dataclasses.dataclass
class Compiled:
    """What `keras_es.ESCallback` reads from the compiled optimizer.

    Attributes:
        space: The tuned hyperparameters, starting at the compiled values.
        update: The particles' `keras_es.engine.SGD` or `Adam`, naming the tuned values.
        keras_class: The compiled optimizer's Keras class.
        config: The compiled optimizer's ``get_config()``.
        schedule: A copy of the compiled learning-rate schedule, to install in the
            model's optimizer so its tuned arguments can be set at run time; None for a
            float learning rate.
        schedule_names: The schedule's tuned arguments.
    """

    space: SearchSpace
    update: engine.SGD | engine.Adam
    keras_class: type
    config: dict
    schedule: keras.optimizers.schedules.LearningRateSchedule | None = None
    schedule_names: tuple[str, ...] = ()

    @property
    def traced(self) -> tuple[str, ...]:
        """The optimizer attributes whose tuned values the traced train step reads."""
        return tuple(a for a in TRACED[type(self.update)]
                     if isinstance(getattr(self.update, a), str))


def _keras_class(optimizer) -> type:
    cls = type(optimizer)
    if cls not in ENGINE_UPDATE:
        raise ValueError(
            f"The model is compiled with {cls.__name__}; ESCallback tunes models compiled "
            "with keras.optimizers.SGD, Adam or AdamW.")
    config = optimizer.get_config()
    used = [f"{k}={config[k]!r}" for k in _UNSUPPORTED if config.get(k)]
    if used:
        raise ValueError(f"The model's {cls.__name__} has {', '.join(used)}, which the "
                         "particles' update does not reproduce (they would train "
                         "differently from the model); compile without it.")
    return cls


def compiled_schedule(optimizer):
    """A fresh copy of the ``LearningRateSchedule`` ``optimizer`` was created with, or
    None for a float learning rate (read through ``get_config``, Keras's public
    record of it)."""
    learning_rate = optimizer.get_config()["learning_rate"]
    if isinstance(learning_rate, dict):
        return _SCHEDULES.deserialize(learning_rate)
    return None


def read_compiled(optimizer, tune: dict) -> Compiled:
    """`Compiled` for a model's ``optimizer`` and a `parse_tune` result; raises
    ``ValueError`` naming the entry for a name the optimizer does not have or cannot
    start from."""
    cls = _keras_class(optimizer)
    update_class = ENGINE_UPDATE[cls]
    config = optimizer.get_config()
    schedule = compiled_schedule(optimizer)
    where = f"the compiled {cls.__name__}"
    arguments = _schedule_arguments(schedule, tune)
    hyperparameters, values = [], {}
    for name, spec in tune.items():
        if name in arguments:
            start = schedule.get_config()[name]
            hyperparameters.append(_hyperparameter(name, start, spec, f"its {where} schedule"))
            continue
        if name not in OPTIMIZER_NAMES[update_class] or (name == "learning_rate"
                                                         and schedule is not None):
            raise ValueError(_missing(name, cls, schedule, update_class))
        if name == "momentum" and not config["momentum"]:
            raise ValueError(
                f"tune names 'momentum', but the model's SGD was compiled with momentum="
                f"{config['momentum']!r}, so Keras built no momentum buffers; compile with a "
                "non-zero momentum, e.g. keras.optimizers.SGD(0.01, momentum=0.9).")
        hyperparameters.append(_hyperparameter(name, config[name], spec, where))
        values[name] = name
    learning_rate = values.get("learning_rate", config["learning_rate"])
    if schedule is not None:
        followed = FOLLOWED[type(schedule)]
        schedule_config = {**schedule.get_config(), **{a: a for a in arguments}}
        learning_rate = followed(**{k: schedule_config[k] for k in followed.arguments})
    update = _update(update_class, config, learning_rate, values)
    return Compiled(SearchSpace(hyperparameters), update, cls, config, schedule,
                    tuple(arguments))


def _schedule_arguments(schedule, tune) -> list[str]:
    """The tuned names that are arguments of the compiled ``schedule``."""
    if schedule is None:
        return []
    followed = FOLLOWED.get(type(schedule))
    if followed is None:
        raise ValueError(
            f"The model's optimizer follows a {type(schedule).__name__} learning-rate "
            "schedule, which ESCallback cannot evaluate per particle; compile with a float "
            "learning rate, keras.optimizers.schedules.ExponentialDecay or a "
            "keras_es.schedules schedule.")
    return [name for name in tune if name in _numbers(schedule, followed)]


def _numbers(schedule, followed) -> list[str]:
    """The arguments of a compiled schedule that are numbers (so can be tuned)."""
    config = schedule.get_config()
    return [a for a in followed.arguments if _number(config[a])]


def _missing(name, cls, schedule, update_class) -> str:
    """The error for a tuned name the compiled optimizer does not have."""
    has = [n for n in OPTIMIZER_NAMES[update_class] if n != "learning_rate" or not schedule]
    if schedule is not None:
        has += _numbers(schedule, FOLLOWED[type(schedule)])
        if name == "learning_rate":
            return (f"tune names 'learning_rate', but the model's {cls.__name__} follows a "
                    f"{type(schedule).__name__} schedule; tune its arguments instead "
                    f"(some of {has}).")
    return (f"tune names {name!r}, which the model's {cls.__name__} does not have; "
            f"expected some of {has}.")


def _update(update_class, config, learning_rate, values) -> engine.SGD | engine.Adam:
    """The particles' update: the compiled constants, tuned values by name."""
    def value(name):
        return values.get(name, config.get(name))

    if update_class is engine.SGD:
        return engine.SGD(learning_rate, momentum=value("momentum"),
                          nesterov=bool(config["nesterov"]),
                          weight_decay=value("weight_decay"))
    return engine.Adam(learning_rate, beta_1=value("beta_1"), beta_2=value("beta_2"),
                       epsilon=config["epsilon"], weight_decay=value("weight_decay"))


def read_mapping(optimizer, space: SearchSpace, update) -> Compiled:
    """`Compiled` for the advanced form: a `SearchSpace` and an engine ``update``
    (`keras_es.engine.SGD` / `Adam`) that must match the compiled ``optimizer``."""
    cls = _keras_class(optimizer)
    expected = {engine.SGD: keras.optimizers.SGD, engine.Adam: keras.optimizers.Adam}
    if cls is not expected[type(update)]:
        raise ValueError(
            f"The model is compiled with {cls.__name__}, but optimizer="
            f"{type(update).__name__}(...) tunes a {expected[type(update)].__name__}; "
            "compile the model with the matching Keras optimizer.")
    if compiled_schedule(optimizer) is not None:
        raise ValueError("The model's optimizer has a LearningRateSchedule; compile it "
                         "with a float learning rate: ESCallback sets the rate every batch "
                         "from its own (tuned) schedule.")
    if isinstance(update, engine.SGD):
        if bool(optimizer.nesterov) != update.nesterov:
            raise ValueError(
                f"The model's SGD has nesterov={bool(optimizer.nesterov)}, but optimizer="
                f"keras_es.engine.SGD(..., nesterov={update.nesterov}); the particles must "
                "train as the model does: pass the same nesterov.")
        if isinstance(update.momentum, str) and not optimizer.momentum:
            raise ValueError("optimizer tunes momentum, but the model's SGD was compiled with "
                             "momentum=0, so Keras built no momentum buffers; compile with a "
                             "non-zero momentum.")
    return Compiled(space, update, cls, optimizer.get_config())


def tuned_schedule(compiled: Compiled, values: dict):
    """The learning-rate schedule the particles followed, at ``values``: a Keras
    ``LearningRateSchedule`` of plain numbers (of the compiled class when the model was
    compiled with a schedule, else a `keras_es.schedules` one, e.g. ``Constant``)."""
    if compiled.schedule is not None:
        config = {**compiled.schedule.get_config(),
                  **{a: float(values[a]) for a in compiled.schedule_names}}
        return type(compiled.schedule).from_config(config)
    return schedules.substitute(compiled.update.learning_rate, values)


def tuned_optimizer(compiled: Compiled, values: dict) -> keras.optimizers.Optimizer:
    """A fresh optimizer of the compiled class with the tuned ``values``: a float
    learning rate where the schedule is constant, else the tuned schedule."""
    config = dict(compiled.config)
    for attribute in TRACED[type(compiled.update)]:
        name = getattr(compiled.update, attribute)
        if isinstance(name, str):
            config[attribute] = float(values[name])
    schedule = tuned_schedule(compiled, values)
    config["learning_rate"] = (float(schedule.learning_rate)
                               if isinstance(schedule, schedules.Constant) else schedule)
    return compiled.keras_class.from_config(config)
