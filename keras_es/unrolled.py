"""The inner problem as an *unrolled system*: the one abstraction estimators drive.

An unrolled system knows how to start an inner problem and advance it one step given
hyperparameters; it knows nothing about noise, pairs or gradient estimates. The same
estimator code therefore drives a linear toy system, influence balancing, or a
population of Keras models.

State layout: every leaf of a system state is a tensor whose leading dimension is the
particle index ``i`` in ``[0, num_particles)``. Particles come in antithetic pairs:
particle ``2p`` is the ``+eps`` twin and ``2p + 1`` the ``-eps`` twin of pair ``p``.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

Nest = Any


class UnrolledSystem:
    """Base class for inner problems driven by keras_es estimators.

    Subclasses implement `init` and `step`; `reset` has a default that
    re-initializes the masked particles, and `meta_loss` is needed only for the
    telescoped ``objective="final"``.

    Keys (``[num_particles, 2]`` int32 stateless seeds) are equal for the two twins of a
    pair, so a system that draws its minibatches, dropout masks or initial weights from
    them gives both twins common random numbers (trap 1 in the estimator notes).
    """

    def init(self, keys: tf.Tensor) -> Nest:
        """Initial states of ``keys.shape[0]`` particles.

        Args:
            keys: ``[num_particles, 2]`` int32 episode keys (equal within a pair).
        """
        raise NotImplementedError

    def step(self, state: Nest, theta: tf.Tensor, keys: tf.Tensor):
        """Advances every particle one step.

        Args:
            state: The particles' states.
            theta: ``[num_particles, dim]`` perturbed unconstrained hyperparameters.
            keys: ``[num_particles, 2]`` int32 step keys (equal within a pair), for
                minibatch selection and dropout.

        Returns:
            ``(new_state, loss, done)``: ``loss`` is float32 ``[num_particles]`` (the
            per-step loss summed by ``objective="sum"``); ``done`` is bool
            ``[num_particles]`` marking a step that ends an episode on its own, or
            ``None`` when episodes end only at the estimator's horizon.
        """
        raise NotImplementedError

    def reset(self, state: Nest, mask: tf.Tensor, keys: tf.Tensor) -> Nest:
        """Re-initializes the particles where ``mask`` is true (a new episode)."""
        return select(mask, self.init(keys), state)

    def meta_loss(self, state: Nest, keys: tf.Tensor) -> tf.Tensor:
        """Meta-loss ``[num_particles]`` of the current states (``objective="final"``).

        Args:
            keys: ``[num_particles, 2]`` episode keys, so an evaluation batch can be
                held fixed for a whole episode.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement meta_loss(); objective='final' needs it.")


def select(mask: tf.Tensor, new: Nest, old: Nest) -> Nest:
    """Per particle, takes ``new`` where ``mask`` is true and ``old`` elsewhere."""

    def pick(a, b):
        m = tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([tf.rank(a) - 1], tf.int32)], 0))
        return tf.where(m, a, b)

    return tf.nest.map_structure(pick, new, old)
