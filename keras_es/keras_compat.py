"""The Keras internals keras_es relies on, in one place.

``tests/test_keras_compat.py`` fails loudly, naming what moved, if a Keras release
changes one of them.
"""

from __future__ import annotations

import os

import tensorflow as tf

# The files keras.callbacks.BackupAndRestore writes into its backup_dir (Keras 3).
BACKUP_FILES = ("latest.weights.h5", "training_metadata.json")


def backup_present(directory: str) -> bool:
    """Whether ``keras.callbacks.BackupAndRestore`` has saved a backup in
    ``directory`` (it does not say so publicly)."""
    return any(os.path.exists(os.path.join(directory, name)) for name in BACKUP_FILES)


def sublayers(model) -> list:
    """Every layer inside ``model``, nested ones included, each before its own
    sublayers (``model.layers`` lists only the top level)."""
    return model._flatten_layers(include_self=False, recursive=True)


def own_variables(layer) -> list:
    """The variables ``layer`` created itself (trainable first), without its
    sublayers' or its seed generators' (``layer.weights`` has all of those)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def is_functional(model) -> bool:
    """Whether ``model`` is a plain functional model, ``keras.Model(inputs, outputs)``:
    Keras builds it as a class it does not export, and a subclass has its own
    ``call``."""
    return type(model).__name__ == "Functional"


def layer_calls(layer) -> list[tuple[list, list]]:
    """``[(input tensors, output tensors), ...]``, one per call of ``layer`` while a
    functional model was built (Keras records these calls as nodes and keeps no public
    list of them)."""
    return [(list(node.input_tensors), list(node.output_tensors))
            for node in layer._inbound_nodes]


def optimizer_strategy(optimizer, default=None):
    """The ``tf.distribute`` strategy that was current when the Keras ``optimizer`` was
    created (it binds to it then), or ``default`` when it records none."""
    return getattr(optimizer, "_distribution_strategy", default)


# Keras's convolution layers compute ``self.convolution_op(inputs, kernel)`` in
# ``call``: an instance attribute of this name changes how one layer convolves.
CONVOLUTION_METHOD = "convolution_op"


class RuntimeValue:
    """A float that a traced Keras train step reads at run time, from a variable.

    Keras optimizers keep momentum, betas and weight decay as Python floats and bake
    them into the train step when it is traced; changing one takes a new trace (and
    each new trace kept ~0.5 MiB alive: 55 MiB per 100 epochs of a fit whose momentum
    was tuned). Inside a trace this object stands in for the float: TensorFlow converts
    it to a read of its variable (``__tf_tensor__``), arithmetic gives tensors, and
    comparisons (``momentum != 0``, which only decide the step's structure) use the
    current value.
    """

    def __init__(self, value: float):
        self.value = float(value)
        self.variable = tf.Variable(self.value, trainable=False, dtype=tf.float32)

    def assign(self, value) -> None:
        self.value = float(value)
        self.variable.assign(self.value)

    def __tf_tensor__(self, dtype=None, name=None):
        tensor = self.variable.read_value()
        return tensor if dtype is None else tf.cast(tensor, dtype)

    def _tensor(self):
        return tf.convert_to_tensor(self)

    def __float__(self):
        return self.value

    def __eq__(self, other):
        return self.value == other

    def __ne__(self, other):
        return self.value != other

    def __hash__(self):
        return hash(self.value)

    def __add__(self, other):
        return self._tensor() + other

    def __radd__(self, other):
        return other + self._tensor()

    def __sub__(self, other):
        return self._tensor() - other

    def __rsub__(self, other):
        return other - self._tensor()

    def __mul__(self, other):
        return self._tensor() * other

    def __rmul__(self, other):
        return other * self._tensor()

    def __truediv__(self, other):
        return self._tensor() / other

    def __rtruediv__(self, other):
        return other / self._tensor()

    def __repr__(self):
        return f"RuntimeValue({self.value})"


_KNOBS = "_keras_es_runtime_values"


def read_at_run_time(optimizer, names) -> dict:
    """Makes ``optimizer``'s train step read the attributes ``names`` (e.g.
    ``"momentum"``, ``"beta_1"``, ``"weight_decay"``) from variables, so they can
    change every window without a new trace. Returns ``{name: RuntimeValue}``; assign
    to those. Outside a trace the attributes read as plain floats (``get_config``,
    saving). `restore_attributes` undoes it.

    Keras has no public hook for this: the optimizer's class is swapped for a subclass
    whose properties serve the values.
    """
    restore_attributes(optimizer)
    names = tuple(names)
    if not names:
        return {}
    knobs = {}
    for name in names:
        current = getattr(optimizer, name)
        knobs[name] = RuntimeValue(0.0 if current is None else current)

    def make(name):
        def get(self):
            knob = getattr(self, _KNOBS)[name]
            return knob if tf.inside_function() else knob.value

        def set_(self, value):
            getattr(self, _KNOBS)[name].assign(value)

        return property(get, set_)

    base = type(optimizer)
    # Same name and module as the original, so a model saved while it is swapped (a
    # fit interrupted before train end) still names Keras's class.
    swapped = type(base.__name__, (base,), {"__module__": base.__module__,
                                            "__qualname__": base.__qualname__,
                                            **{name: make(name) for name in names}})
    swapped._keras_es_base = base
    object.__setattr__(optimizer, _KNOBS, knobs)
    optimizer.__class__ = swapped
    return knobs


def restore_attributes(optimizer) -> None:
    """Undoes `read_at_run_time`: the optimizer's own class, with the attributes set to
    the values they last had."""
    base = getattr(type(optimizer), "_keras_es_base", None)
    if base is None:
        return
    knobs = getattr(optimizer, _KNOBS)
    optimizer.__class__ = base
    for name, knob in knobs.items():
        setattr(optimizer, name, knob.value)
    object.__delattr__(optimizer, _KNOBS)
