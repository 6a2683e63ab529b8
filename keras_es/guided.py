"""Guided ES sampling: perturbations concentrated on a subspace of surrogate gradients.

Guided ES (Maheswaranathan et al., 2019) keeps a FIFO of the last ``k`` surrogate
gradients (cheap, possibly biased directions such as a one-step hypergradient), takes an
orthonormal basis ``U`` of their span and samples from

    Sigma = (alpha / n) I + ((1 - alpha) / k) U U^T        (trace 1)
    eps   = sigma * (sqrt(alpha / n) z_n + sqrt((1 - alpha) / k) U z_k)

so ``E||eps||^2 = sigma^2`` whatever the dimension ``n``. Columns of the FIFO that are
empty, zero, non-finite or linearly dependent are dropped (never orthonormalized: a QR
of a zero column returns an arbitrary direction), and ``k`` becomes the number of
columns kept, which keeps the trace at one. With no usable column, ``Sigma = I / n``.

Everything is a pure function of a small `GuidedState`, so it runs under
``tf.function``, XLA and ``tf.distribute``.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# A FIFO column whose QR diagonal is below this fraction of the largest one is
# numerically dependent on the others and is dropped.
_RANK_TOLERANCE = 1e-5


class GuidedState(NamedTuple):
    """FIFO of surrogate gradients, newest first.

    Attributes:
        surrogates: float32 ``[k, dim]``.
        count: int32 scalar, how many rows have been filled (at most ``k``).
    """

    surrogates: tf.Tensor
    count: tf.Tensor


class Subspace(NamedTuple):
    """The guiding subspace and the covariance scales derived from it.

    Attributes:
        basis: float32 ``[dim, k]`` orthonormal columns; dropped columns are zero.
        a: scalar, the isotropic variance per coordinate (``alpha / n``).
        b: scalar, the variance along each basis direction (``(1 - alpha) / rank``).
        rank: int32 scalar, the number of usable columns.
    """

    basis: tf.Tensor
    a: tf.Tensor
    b: tf.Tensor
    rank: tf.Tensor


def init(k: int, dim: int) -> GuidedState:
    """An empty FIFO for ``k`` surrogate gradients of dimension ``dim``."""
    return GuidedState(tf.zeros([k, dim], tf.float32), tf.constant(0, tf.int32))


def push(state: GuidedState, surrogate: tf.Tensor) -> GuidedState:
    """Adds a surrogate gradient to the front of the FIFO, dropping the oldest.

    A non-finite surrogate is stored as zeros, which `subspace` then ignores.
    """
    surrogate = tf.cast(tf.reshape(surrogate, [1, -1]), tf.float32)
    surrogate = tf.where(tf.reduce_all(tf.math.is_finite(surrogate)), surrogate, 0.0)
    rows = tf.concat([surrogate, state.surrogates[:-1]], axis=0)
    k = tf.shape(state.surrogates)[0]
    return GuidedState(rows, tf.minimum(state.count + 1, k))


def subspace(state: GuidedState, alpha: float) -> Subspace:
    """Orthonormal basis of the FIFO and the trace-1 covariance scales."""
    k = state.surrogates.shape[0]
    dim = state.surrogates.shape[1]
    filled = tf.range(k) < state.count
    columns = tf.transpose(tf.where(filled[:, None], state.surrogates, 0.0))  # [dim, k]
    q, r = tf.linalg.qr(columns)
    diag = tf.abs(tf.linalg.diag_part(r))
    largest = tf.reduce_max(diag)
    usable = filled & (diag > _RANK_TOLERANCE * largest) & (diag > 0.0)
    basis = q * tf.cast(usable, q.dtype)[None, :]
    rank = tf.reduce_sum(tf.cast(usable, tf.int32))
    has_subspace = rank > 0
    a = tf.where(has_subspace, alpha / dim, 1.0 / dim)
    b = tf.where(has_subspace, (1.0 - alpha) / tf.cast(tf.maximum(rank, 1), tf.float32), 0.0)
    return Subspace(basis, tf.cast(a, tf.float32), tf.cast(b, tf.float32), rank)


def sample(space: Subspace, z_full: tf.Tensor, z_sub: tf.Tensor, sigma: float) -> tf.Tensor:
    """Perturbations with covariance ``sigma^2 Sigma`` from standard normals.

    Args:
        space: From `subspace`.
        z_full: ``[pairs, dim]`` standard normal.
        z_sub: ``[pairs, k]`` standard normal.
        sigma: Overall radius: ``E||eps||^2 = sigma^2``.
    """
    along = tf.matmul(z_sub, space.basis, transpose_b=True)
    return sigma * (tf.sqrt(space.a) * z_full + tf.sqrt(space.b) * along)


def inverse_covariance(space: Subspace, v: tf.Tensor) -> tf.Tensor:
    """``Sigma^-1 v`` for rows ``v`` ``[pairs, dim]``, in closed form (Woodbury).

    With ``U^T U = I``: ``Sigma^-1 = (1/a) (I - b / (a + b) U U^T)``.
    """
    projected = tf.matmul(tf.matmul(v, space.basis), space.basis, transpose_b=True)
    return (v - (space.b / (space.a + space.b)) * projected) / space.a
