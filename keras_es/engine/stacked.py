"""Particles stacked along channels: convolutional Keras models without pfor.

``tf.vectorized_map`` has no efficient rule for a convolution whose filter differs per
particle: TensorFlow's converter loops over particles, and the im2col rewrite in
`keras_es.engine.vectorize` turns each convolution into many thin matmuls. On a CPU the fast
form is a *grouped* convolution: particle ``n``'s channel ``c`` becomes channel
``n * C + c`` of one tensor ``[B, H, W, N * C]`` and particle ``n``'s filter is group
``n`` of one filter ``[kh, kw, C, N * O]``. Pooling and elementwise activations act per
channel and so run on that tensor unchanged. Writing pfor converters for the
convolution ops alone would not do: every convolution's output would be transposed
back to the ``[N, B, ...]`` layout pfor requires and forth again for the next
convolution, which costs more than the convolutions on a small network.

So for a `keras.Sequential` model, or a functional model whose layers form one chain
(one input, one output, each layer called once on the previous one's output), built
only of the layers below, `forward` runs every particle at once, layer by layer,
keeping each activation in one of three layouts:

* ``shared``: ``[B, ...]``, the same for every particle (the input batch, until the
  first layer with weights);
* ``channels``: ``[B, H, W, N * C]``, particles stacked along channels;
* ``leading``: ``[N, B, ...]``, particles first (per-particle batches, Dense layers).

Supported: ``InputLayer``, ``Conv2D`` (channels last, ``groups=1``), ``MaxPooling2D``,
``AveragePooling2D``, ``ZeroPadding2D``, ``GlobalAveragePooling2D``,
``GlobalMaxPooling2D``, ``BatchNormalization`` (last axis, trainable, no renorm or
synchronization; per-particle moving statistics, Keras's equations), ``Dropout`` and
`keras_es.layers.Dropout` (each particle's mask drawn by the layer itself from that
particle's seed state, so twins share masks and the numbers equal the vectorized
engine's), ``Flatten``, ``Dense``, ``Activation``, ``ReLU``; no regularizers. Any other
model runs under ``tf.vectorized_map``. Grouped convolutions are slow under XLA on a
CPU (~50x here), so a stacked step is meant to run as a plain ``tf.function``
(`keras_es.Population.xla_friendly` is False).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_es import keras_compat
from keras_es import layers as es_layers

SHARED, CHANNELS, LEADING = "shared", "channels", "leading"

# Activations that act elementwise, so they may run on particles stacked in channels.
_ELEMENTWISE = ("linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu",
                "swish", "sigmoid", "hard_sigmoid", "hard_silu", "tanh", "softplus",
                "softsign", "exponential", "mish")
_ELEMENTWISE_FNS = tuple(keras.activations.get(name) for name in _ELEMENTWISE
                         if hasattr(keras.activations, name))


_PER_CHANNEL = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                keras.layers.ZeroPadding2D)
_GLOBAL_POOLING = {keras.layers.GlobalAveragePooling2D: tf.reduce_mean,
                   keras.layers.GlobalMaxPooling2D: tf.reduce_max}
_DROPOUT = (keras.layers.Dropout, es_layers.Dropout)
_STACKABLE = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.Flatten,
              keras.layers.Dense, keras.layers.Activation, keras.layers.ReLU,
              keras.layers.BatchNormalization, *_PER_CHANNEL, *_GLOBAL_POOLING, *_DROPOUT)


def layer_chain(model: keras.Model) -> list | None:
    """``model``'s layers in call order if it is a Sequential model or a functional one
    whose layers form a single chain; None otherwise."""
    if type(model) is keras.Sequential:
        return list(model.layers)
    # Subclassed models have their own call() and are never a plain chain.
    if (not keras_compat.is_functional(model) or len(model.inputs) != 1
            or len(model.outputs) != 1):
        return None
    tensor, chain = model.inputs[0], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        calls = keras_compat.layer_calls(layer)
        if len(calls) != 1 or len(calls[0][0]) != 1 or calls[0][0][0] is not tensor:
            return None
        tensor = calls[0][1][0]
        chain.append(layer)
    return chain if tensor is model.outputs[0] else None


def unsupported_reason(model: keras.Model) -> str | None:
    """Why ``model`` cannot run stacked, or None if it can."""
    layers = layer_chain(model)
    if layers is None:
        return (f"{type(model).__name__} is neither a keras.Sequential nor a functional "
                "model whose layers form one chain")
    for layer in layers:
        if type(layer) not in _STACKABLE:
            return f"layer {layer.name} ({type(layer).__name__}) has no stacked form"
        if not layer.trainable and layer.weights:
            return f"layer {layer.name} is frozen (trainable=False)"
        if layer.compute_dtype != "float32":
            return f"layer {layer.name} computes in {layer.compute_dtype}, not float32"
        if any(getattr(layer, name, None) is not None for name in
               ("kernel_regularizer", "bias_regularizer", "activity_regularizer")):
            return f"layer {layer.name} has a regularizer"
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return f"layer {layer.name} uses LoRA or quantization"
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return f"layer {layer.name} is not channels_last"
        if type(layer) is keras.layers.Conv2D and layer.groups != 1:
            return f"layer {layer.name} is a grouped convolution"
        if type(layer) is keras.layers.BatchNormalization and (
                layer.axis not in (-1, layer.input_spec.ndim - 1) or layer.renorm
                or layer.synchronized):
            return f"layer {layer.name} normalizes another axis, renormalizes or synchronizes"
    return None


def worthwhile(model: keras.Model) -> bool:
    """True when ``model`` can run stacked and has a convolution (the case where the
    stacked form beats ``tf.vectorized_map``; Dense-only models are faster under XLA).
    It says nothing of the device: see `missing_kernel`."""
    return (unsupported_reason(model) is None
            and any(type(layer) is keras.layers.Conv2D for layer in layer_chain(model)))


# ---------------------------------------------------------------------- kernels
# Advice printed with a missing kernel. Which kernels a CPU has depends on whether
# TensorFlow turned its oneDNN kernels on, which it does by default only on x86 CPUs
# with AVX-512; on x86 CPUs without it, Apple and ARM it stays off and the gradients
# of grouped convolutions do not exist ("Gradients for grouped convolutions are not
# supported on CPU").
ONEDNN_TIP = ("on a CPU, set TF_ENABLE_ONEDNN_OPTS=1 in the environment before TensorFlow "
              "is imported: its oneDNN kernels have them")
_PROBED: dict = {}


def _probe(input_gradient: bool, strides, dilation, padding: str) -> str | None:
    """Runs one tiny grouped convolution of this form with the gradients the stacked
    step takes, eagerly on the default device; the error message if a kernel is
    missing."""
    key = (input_gradient, tuple(strides), tuple(dilation), padding,
           bool(tf.config.list_logical_devices("GPU")))
    if key not in _PROBED:
        x = tf.ones([1, 7, 7, 4])
        kernel = tf.ones([2, 2, 2, 4])  # two groups of two channels
        try:
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                y = tf.reduce_sum(tf.nn.convolution(x, kernel, strides=list(strides),
                                                    padding=padding.upper(),
                                                    dilations=list(dilation)))
            for gradient in tape.gradient(y, [x, kernel] if input_gradient else [kernel]):
                gradient.numpy()
            _PROBED[key] = None
        except (tf.errors.OpError, ValueError) as error:
            message = str(error).strip().splitlines()[0].split("}}")[-1].strip()
            # TF's first sentence says what is missing; the rest is shapes and op names.
            _PROBED[key] = message.split(". ")[0].rstrip(".") or type(error).__name__
    return _PROBED[key]


def missing_kernel(model: keras.Model) -> str | None:
    """Why this device cannot run ``model``'s stacked form, or None if it can.

    Probes each form of convolution the stacked step runs (its strides, dilation and
    padding; with or without the gradient for its input) once per process on a tiny
    input, forward and backward, rather than guessing from CPU flags. Every
    convolution counts as grouped: even the first one is, when each particle gets its
    own batch. Assumes ``unsupported_reason(model)`` is None.
    """
    first = True
    for layer in layer_chain(model):
        if type(layer) is not keras.layers.Conv2D:
            continue
        # The first convolution reads the input batch, whose gradient is never taken.
        error = _probe(not first, layer.strides, layer.dilation_rate, layer.padding)
        first = False
        if error:
            return (f"the grouped convolution of layer {layer.name} (strides "
                    f"{tuple(layer.strides)}, dilation {tuple(layer.dilation_rate)}) has no "
                    f"gradient kernel on this device: {error}")
    return None


# ---------------------------------------------------------------------- layouts
def _to_channels(x, layout):
    if layout == CHANNELS:
        return x
    x = tf.transpose(x, [1, 2, 3, 0, 4])  # [N, B, H, W, C] -> [B, H, W, N, C]
    return tf.reshape(x, tf.concat([tf.shape(x)[:3], [-1]], 0))


def _to_leading(x, layout, n):
    if layout == LEADING:
        return x
    if layout == SHARED:
        return tf.tile(x[None], [n] + [1] * x.shape.rank)
    shape = tf.shape(x)  # [B, H, W, N * C] -> [N, B, H, W, C]
    x = tf.reshape(x, tf.concat([shape[:3], [n, -1]], 0))
    return tf.transpose(x, [3, 0, 1, 2, 4])


def _stacked_filter(kernel):
    """``[N, kh, kw, C, O] -> [kh, kw, C, N * O]`` (group n = particle n)."""
    shape = tf.shape(kernel)
    kernel = tf.transpose(kernel, [1, 2, 3, 0, 4])
    return tf.reshape(kernel, tf.concat([shape[1:4], [-1]], 0))


def _activation(fn, x, layout, n):
    if layout == CHANNELS and not any(fn is f for f in _ELEMENTWISE_FNS):
        x, layout = _to_leading(x, layout, n), LEADING
    return fn(x), layout


def _fold(fn, x, layout):
    """Applies a per-example op to ``[N, B, ...]`` by folding N into the batch."""
    if layout != LEADING:
        return fn(x)
    shape = tf.shape(x)
    y = fn(tf.reshape(x, tf.concat([[-1], shape[2:]], 0)))
    return tf.reshape(y, tf.concat([shape[:2], tf.shape(y)[1:]], 0))


# ---------------------------------------------------------------------- forward
def _stacked_vector(t, layout, rank):
    """A per-particle, per-channel ``[N, C]`` tensor broadcastable against an activation
    of ``rank`` in ``layout``."""
    if layout == CHANNELS:
        return tf.reshape(t, [-1])
    return tf.reshape(t, tf.concat([tf.shape(t)[:1], tf.ones([rank - 2], tf.int32),
                                    tf.shape(t)[1:]], 0))


def _batch_normalization(layer, x, layout, n, training, weight, stats):
    """Keras's BatchNormalization (last axis) for every particle; ``stats`` maps the
    moving mean/variance variables to their stacked values and receives the updates."""
    if layout == SHARED:
        x, layout = _to_leading(x, layout, n), LEADING
    rank = x.shape.rank
    axes = list(range(rank - 1)) if layout == CHANNELS else list(range(1, rank - 1))
    mean_var, var_var = layer.moving_mean, layer.moving_variance
    if training:
        mean, variance = tf.nn.moments(x, axes)  # [N * C] or [N, C]
        mean, variance = (tf.reshape(mean, [n, -1]), tf.reshape(variance, [n, -1]))
        stats[id(mean_var)] = stats[id(mean_var)] * layer.momentum + mean * (
            1.0 - layer.momentum)
        stats[id(var_var)] = stats[id(var_var)] * layer.momentum + variance * (
            1.0 - layer.momentum)
    else:
        mean, variance = stats[id(mean_var)], stats[id(var_var)]
    vector = lambda t: _stacked_vector(t, layout, rank)  # noqa: E731
    x = tf.nn.batch_normalization(
        x, vector(mean), vector(variance),
        vector(weight(layer.beta)) if layer.center else None,
        vector(weight(layer.gamma)) if layer.scale else None, layer.epsilon)
    return x, layout


def _dropout(layer, x, layout, n, stats):
    """Each particle's mask from the layer's own ``call`` on ones, with that particle's
    seed state (and rate), then one multiplication: ``x * dropout(1) == dropout(x)``."""
    if layout == SHARED:
        x, layout = _to_leading(x, layout, n), LEADING
    shape = tf.shape(x)
    ones = tf.ones(shape[1:] if layout == LEADING
                   else tf.concat([shape[:-1], [shape[-1] // n]], 0), x.dtype)
    variables = layer.non_trainable_variables

    def one(values):
        mask, new = layer.stateless_call([], list(values), ones, training=True)
        return mask, tuple(new)

    mask, new = tf.vectorized_map(one, tuple(stats[id(v)] for v in variables))
    stats.update({id(v): t for v, t in zip(variables, new, strict=True)})
    return x * (mask if layout == LEADING else _to_channels(mask, LEADING)), layout


class _Context(NamedTuple):
    """What every layer's stacked form reads: N, each variable's stacked value, the
    non-trainable values (updated in place by BatchNormalization and dropout) and
    whether the step trains."""

    n: int
    weight: Callable
    stats: dict
    training: bool


def _conv2d(layer, x, layout, ctx):
    kernel = _stacked_filter(ctx.weight(layer.kernel))
    # One input (shared): an ordinary convolution with N * O filters; else channels
    # n * C .. n * C + C - 1 meet filter group n.
    inputs = x if layout == SHARED else _to_channels(x, layout)
    # tf.nn.convolution (what Keras calls) rather than tf.nn.conv2d: it computes an
    # ungrouped dilated convolution through space-to-batch, whose gradient exists on
    # every CPU (Conv2DBackpropInput with dilation > 1 needs oneDNN).
    x = tf.nn.convolution(inputs, kernel, strides=layer.strides,
                          padding=layer.padding.upper(), dilations=layer.dilation_rate)
    if layer.use_bias:
        x = x + tf.reshape(ctx.weight(layer.bias), [-1])
    return _activation(layer.activation, x, CHANNELS, ctx.n)


def _per_channel(layer, x, layout, ctx):
    return _fold(layer.call, x, layout), layout  # any layout but leading as is


def _global_pooling(layer, x, layout, ctx):
    x = _GLOBAL_POOLING[type(layer)](x, axis=[-3, -2], keepdims=layer.keepdims)
    if layout != CHANNELS:
        return x, layout
    # [B, (1, 1,) N * C]: particles to the front.
    x = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [ctx.n, -1]], 0))
    rank = x.shape.rank
    return tf.transpose(x, [rank - 2] + list(range(rank - 2)) + [rank - 1]), LEADING


def _batch_norm(layer, x, layout, ctx):
    return _batch_normalization(layer, x, layout, ctx.n, ctx.training, ctx.weight, ctx.stats)


def _dropout_layer(layer, x, layout, ctx):
    if not ctx.training:
        return x, layout
    return _dropout(layer, x, layout, ctx.n, ctx.stats)


def _flatten(layer, x, layout, ctx):
    if layout == CHANNELS:
        x, layout = _to_leading(x, layout, ctx.n), LEADING
    if layout == LEADING:
        return tf.reshape(x, tf.concat([tf.shape(x)[:2], [-1]], 0)), layout
    return tf.reshape(x, [tf.shape(x)[0], -1]), layout


def _dense(layer, x, layout, ctx):
    n = ctx.n
    if layout == CHANNELS:
        x, layout = _to_leading(x, layout, n), LEADING
    kernel = ctx.weight(layer.kernel)  # [N, D, O]
    rows = x if layout == LEADING else x[None]
    flat = tf.reshape(rows, tf.stack([tf.shape(rows)[0], -1, tf.shape(rows)[-1]]))
    y = tf.matmul(flat, kernel)  # [N or 1 (broadcast), rows, D] x [N, D, O]
    out_shape = tf.concat([[n], tf.shape(x)[:-1] if layout == SHARED
                           else tf.shape(x)[1:-1], [tf.shape(kernel)[-1]]], 0)
    x = tf.reshape(y, out_shape)
    if layer.use_bias:
        x = x + tf.reshape(ctx.weight(layer.bias),
                           tf.concat([[n], tf.ones([tf.rank(x) - 2], tf.int32), [-1]], 0))
    return _activation(layer.activation, x, LEADING, n)


def _activation_layer(layer, x, layout, ctx):
    return _activation(layer.activation, x, layout, ctx.n)


def _relu(layer, x, layout, ctx):
    return layer.call(x), layout  # elementwise whatever its arguments


def _input(layer, x, layout, ctx):
    return x, layout


def _stacked_form(layer):
    """The function computing ``layer`` for every particle (see `unsupported_reason`)."""
    kind = type(layer)
    forms = {keras.layers.InputLayer: _input, keras.layers.Conv2D: _conv2d,
             keras.layers.BatchNormalization: _batch_norm, keras.layers.Flatten: _flatten,
             keras.layers.Dense: _dense, keras.layers.Activation: _activation_layer,
             keras.layers.ReLU: _relu}
    if kind in forms:
        return forms[kind]
    if kind in _PER_CHANNEL:
        return _per_channel
    if kind in _GLOBAL_POOLING:
        return _global_pooling
    if kind in _DROPOUT:
        return _dropout_layer
    raise ValueError(f"layer {layer.name} has no stacked form.")  # see unsupported_reason


def forward(model: keras.Model, trainable, non_trainable, x, n: int,
            per_particle: bool, training: bool):
    """Every particle's output ``[N, B, ...]`` of ``model`` and its new non-trainable
    values (BatchNormalization statistics), with ``trainable`` and ``non_trainable``
    (the model's variables, each stacked ``[N, ...]``), on ``x`` shared (``[B, ...]``) or
    per particle (``[N, B, ...]``)."""
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    stats = {id(v): t for v, t in zip(model.non_trainable_variables, non_trainable,
                                      strict=True)}
    ctx = _Context(n, lambda v: trainable[index[id(v)]], stats, training)
    layout = LEADING if per_particle else SHARED
    for layer in layer_chain(model):
        x, layout = _stacked_form(layer)(layer, x, layout, ctx)
    new_stats = tuple(stats[id(v)] for v in model.non_trainable_variables)
    return _to_leading(x, layout, n), new_stats
