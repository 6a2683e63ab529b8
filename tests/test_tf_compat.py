"""The TensorFlow internals keras_es relies on (keras_es.tf_compat) still hold.

If a TensorFlow release moves one, these fail first, naming it."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_es import tf_compat


def test_trackable_protocol_exists():
    assert hasattr(tf, "__internal__") and hasattr(tf.__internal__, "tracking") and \
        hasattr(tf.__internal__.tracking, "Trackable"), (
            "tf.__internal__.tracking.Trackable moved: keras_es.tf_compat.TensorSaveable "
            "derives from it")
    for name in ("_serialize_to_tensors", "_restore_from_tensors"):
        assert hasattr(tf.__internal__.tracking.Trackable, name), (
            f"tf.__internal__.tracking.Trackable.{name} moved: keras_es.tf_compat."
            "TensorSaveable implements it")


class _Doubled(tf_compat.TensorSaveable):
    """Holds a plain tensor; saves it doubled and halves it back on restore."""

    def __init__(self, value):
        self.value = tf.constant(value)
        self.restored = None

    def tensors_to_save(self):
        return {"doubled": self.value * 2}

    def restore_tensors(self, tensors):
        self.restored = sorted(tensors)
        self.value = tensors["doubled"] / 2


def test_tensor_saveable_round_trips_through_a_checkpoint(tmp_path):
    path = tf.train.Checkpoint(state=_Doubled([1.0, 2.0])).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert any("doubled" in name for name in names), (
        f"TensorFlow no longer saves what Trackable._serialize_to_tensors returns: {names}")
    target = _Doubled([0.0, 0.0])
    tf.train.Checkpoint(state=target).read(path).assert_consumed()
    assert target.restored == ["doubled"], (
        "TensorFlow no longer calls Trackable._restore_from_tensors on restore")
    np.testing.assert_allclose(target.value.numpy(), [1.0, 2.0])


def test_compiling_with_xla_is_seen_inside_jit_functions_and_their_loops():
    seen = []

    def probe(x):
        seen.append(tf_compat.compiling_with_xla())
        return x

    def loop(x):
        return tf.while_loop(lambda i, x: i < 2, lambda i, x: (i + 1, probe(x)), (0, x))[1]

    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    tf.function(loop, jit_compile=True)(tf.constant(1.0))
    tf.function(probe)(tf.constant(2.0))
    tf.function(loop)(tf.constant(2.0))
    probe(tf.constant(3.0))  # eager
    assert seen == [True, True, False, False, False], (
        "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext no longer "
        f"sees tf.function(jit_compile=True): {seen}")
