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
