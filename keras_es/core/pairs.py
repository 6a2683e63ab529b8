"""Antithetic pairs: particle ``2p`` is ``theta + eps_p``, particle ``2p + 1`` is
``theta - eps_p``."""

from __future__ import annotations

import tensorflow as tf

from keras_es import noise


def sign(num_pairs: int) -> tf.Tensor:
    """``[2 pairs, 1]``: +1 for particle ``2p``, -1 for ``2p + 1``."""
    return tf.tile(tf.constant([1.0, -1.0]), [num_pairs])[:, None]


def twin(x: tf.Tensor) -> tf.Tensor:
    """Repeats per-pair rows for the two twins: ``[pairs, ...] -> [2 pairs, ...]``."""
    return tf.repeat(x, 2, axis=0)


def episode_keys(episode, seed, first_pair=0) -> tf.Tensor:
    """Initialization keys ``[2 pairs, 2]`` of each pair's episode ``episode[p]``
    (int32 ``[pairs]``; both twins share one)."""
    pair_index = first_pair + tf.range(tf.shape(episode)[0])
    pair_index.set_shape(episode.shape)
    return twin(noise.pair_seeds(seed, noise.STREAM_EPISODE, pair_index, episode))


def step_keys(steps, seed, first_pair=0) -> tf.Tensor:
    """Minibatch and dropout keys ``[2 pairs, 2]`` of each pair's next step, from its
    step count ``steps[p]``."""
    pair_index = first_pair + tf.range(tf.shape(steps)[0])
    pair_index.set_shape(steps.shape)
    return twin(noise.pair_seeds(seed, noise.STREAM_STEP, pair_index, steps))
