"""The TensorFlow internals keras_es relies on, in one place.

``tests/test_tf_compat.py`` fails loudly, naming what moved, if a TensorFlow release
changes one of them.
"""

from __future__ import annotations

import tensorflow as tf


class TensorSaveable(tf.__internal__.tracking.Trackable):
    """An object a ``tf.train.Checkpoint`` saves as tensors it computes when saved, and
    restores by handing it the tensors read back.

    ``tf.Variable`` objects save what they hold; this is for state a variable cannot
    hold, such as per-replica values that must save as one combined tensor (see
    `keras_es.distribute.ShardedParticles`). TensorFlow's checkpoint protocol for it
    (``Trackable._serialize_to_tensors`` and ``_restore_from_tensors``) is not public;
    subclasses implement `tensors_to_save` and `restore_tensors` instead.
    """

    def tensors_to_save(self) -> dict:
        """``{name: tensor}`` to write into the checkpoint."""
        raise NotImplementedError

    def restore_tensors(self, tensors: dict) -> None:
        """Restores from ``tensors``, the ``{name: tensor}`` of `tensors_to_save` read
        back from a checkpoint."""
        raise NotImplementedError

    def _serialize_to_tensors(self):
        return self.tensors_to_save()

    def _restore_from_tensors(self, restored_tensors):
        self.restore_tensors(restored_tensors)
        return tf.no_op()


def compiling_with_xla() -> bool:
    """Whether the graph being traced (or one it is nested in) will be compiled by XLA
    (``tf.function(jit_compile=True)``).

    TensorFlow marks such graphs with an XLA control-flow context, and its only reader
    is the private ``control_flow_util.GraphOrParentsInXlaContext``. XLA's
    auto-clustering (``tf.config.optimizer.set_jit``, ``TF_XLA_FLAGS``) leaves no such
    mark: it is not seen here. Graph-building choices that help TensorFlow's executor
    can cost XLA minutes of compilation (see `keras_es.engine.population.per_key`).
    """
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
