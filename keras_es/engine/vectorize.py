"""Layer implementations that vectorize across particles.

``tf.vectorized_map`` turns one particle's step into a step for all particles, but only
for ops with a vectorized rule. ``Conv2D`` has none for a filter that differs per
particle ("filter expected to be loop invariant"): it falls back to a sequential loop,
and under XLA on CPU the max-pool gradient is another ~10x slower than TensorFlow's.
While the engine traces a step, `pfor_friendly` swaps, for the layers of one model only:

* ``Conv2D`` (channels last, one group): im2col, i.e. the kernel-sized patches
  concatenated along channels, then one matmul, which vectorizes into a batched matmul;
* ``Conv1D`` (channels last, one group, any padding including ``"causal"``): the same
  im2col on a height-1 image. Keras's ``Conv1D.call`` calls ``ops.conv`` itself rather
  than ``convolution_op``, so its whole ``call`` is swapped, with the causal padding,
  bias and activation as Keras applies them;
* ``MaxPooling2D`` and ``MaxPooling1D`` with ``pool_size == strides`` and ``"valid"``
  padding: a reshape and a max, which vectorizes cleanly (under XLA, 1-D max pooling's
  own gradient took a Conv1D window of 32 particles from 34 to 75 ms). Its gradient
  splits ties evenly where ``MaxPool`` picks one input; on real-valued activations
  exact ties are rare;
* recurrent layers (LSTM, GRU, SimpleRNN) run unrolled: the gradient of their graph
  loop does not vectorize (its TensorList accumulators have no vectorized rule). This
  needs a fixed number of time steps.

Everything else is left as Keras computes it.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from keras_es import keras_compat


def _output_and_padding(size, kernel, stride, dilation, padding):
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - effective) // stride + 1, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2, total - total // 2


def patches(x, kernel_size, strides, padding, dilation_rate=(1, 1)):
    """``[..., H, W, C] -> [..., H', W', kh * kw * C]``: every kernel-sized patch."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation_rate
    padding = padding.lower()
    oh, top, bottom = _output_and_padding(x.shape[-3], kh, sh, dh, padding)
    ow, left, right = _output_and_padding(x.shape[-2], kw, sw, dw, padding)
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0]] * (x.shape.rank - 3) + [[top, bottom], [left, right], [0, 0]])
    return tf.concat([x[..., i * dh: i * dh + (oh - 1) * sh + 1: sh,
                        j * dw: j * dw + (ow - 1) * sw + 1: sw, :]
                      for i in range(kh) for j in range(kw)], axis=-1)


def conv2d_im2col(x, kernel, strides=(1, 1), padding="valid", dilation_rate=(1, 1)):
    """``tf.nn.conv2d`` (NHWC, one group) as patches x matmul: ``[B,H,W,C] * [kh,kw,C,O]``."""
    kh, kw, c, o = kernel.shape
    p = patches(x, (kh, kw), strides, padding, dilation_rate)
    y = tf.matmul(tf.reshape(p, [-1, kh * kw * c]), tf.reshape(kernel, [kh * kw * c, o]))
    return tf.reshape(y, tf.concat([tf.shape(p)[:-1], [o]], 0))


def conv1d_im2col(x, kernel, stride=1, padding="valid", dilation_rate=1):
    """``tf.nn.conv1d`` (NWC, one group) as patches x matmul: ``[B,L,C] * [k,C,O]``,
    computed as a height-1 `conv2d_im2col`."""
    y = conv2d_im2col(x[..., None, :, :], kernel[None], (1, stride), padding,
                      (1, dilation_rate))
    return tf.squeeze(y, -3)


def _conv1d_call(layer):
    """``layer.call`` with `conv1d_im2col` for the convolution (see the module docstring)."""
    (stride,), (dilation,) = layer.strides, layer.dilation_rate

    def call(inputs):
        padding = layer.padding
        if padding == "causal":
            inputs = tf.pad(inputs, [[0, 0]] * (inputs.shape.rank - 2)
                            + [[dilation * (layer.kernel_size[0] - 1), 0], [0, 0]])
            padding = "valid"
        outputs = conv1d_im2col(inputs, layer.kernel, stride, padding, dilation)
        if layer.use_bias:
            outputs = outputs + layer.bias
        return outputs if layer.activation is None else layer.activation(outputs)
    return call


def max_pool_reshape(x, pool_size):
    """Non-overlapping ``"valid"`` max pooling as a reshape and a max."""
    (ph, pw), (h, w, c) = pool_size, x.shape[-3:]
    x = x[..., : h // ph * ph, : w // pw * pw, :]
    pooled = tf.reduce_max(tf.reshape(x, [-1, h // ph, ph, w // pw, pw, c]), axis=[2, 4])
    return tf.reshape(pooled, tf.concat([tf.shape(x)[:-3], [h // ph, w // pw, c]], 0))


def max_pool1d_reshape(x, pool_size):
    """Non-overlapping ``"valid"`` 1-D max pooling as a reshape and a max."""
    (length, c), p = x.shape[-2:], pool_size
    x = x[..., : length // p * p, :]
    pooled = tf.reduce_max(tf.reshape(x, [-1, length // p, p, c]), axis=2)
    return tf.reshape(pooled, tf.concat([tf.shape(x)[:-2], [length // p, c]], 0))


def _swaps(model):
    for layer in keras_compat.sublayers(model):
        if (type(layer) is keras.layers.Conv2D and layer.data_format == "channels_last"
                and layer.groups == 1):
            def conv(inputs, kernel, layer=layer):
                return conv2d_im2col(inputs, kernel, layer.strides, layer.padding,
                                     layer.dilation_rate)
            yield layer, keras_compat.CONVOLUTION_METHOD, conv
        elif (type(layer) is keras.layers.Conv1D and layer.data_format == "channels_last"
              and layer.groups == 1):
            yield layer, "call", _conv1d_call(layer)
        elif (type(layer) is keras.layers.MaxPooling2D and layer.data_format == "channels_last"
              and tuple(layer.pool_size) == tuple(layer.strides) and layer.padding == "valid"):
            yield layer, "call", lambda inputs, layer=layer: max_pool_reshape(inputs,
                                                                              layer.pool_size)
        elif (type(layer) is keras.layers.MaxPooling1D and layer.data_format == "channels_last"
              and tuple(layer.pool_size) == tuple(layer.strides) and layer.padding == "valid"):
            yield layer, "call", lambda inputs, layer=layer: max_pool1d_reshape(
                inputs, layer.pool_size[0])
        elif isinstance(layer, keras.layers.RNN) and not layer.unroll:
            yield layer, "unroll", True


_MISSING = object()


@contextlib.contextmanager
def pfor_friendly(model):
    """Within the block, ``model``'s Conv1D, Conv2D and MaxPooling1D/2D layers compute with
    vectorizable ops and its recurrent layers unroll (see the module docstring);
    restored on exit."""
    swapped = list(_swaps(model))
    saved = [vars(layer).get(name, _MISSING) for layer, name, _ in swapped]
    for layer, name, value in swapped:
        setattr(layer, name, value)
    try:
        yield
    finally:
        for (layer, name, _), old in zip(swapped, saved, strict=True):
            if old is _MISSING:
                delattr(layer, name)
            else:
                setattr(layer, name, old)
