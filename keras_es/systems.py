"""Small unrolled systems with known answers: linear dynamics and quadratic losses.

They serve as test oracles (on linear dynamics with a quadratic loss the Gaussian-
smoothed objective equals the true one plus a constant, so every unbiased estimator
must match the exact gradient) and as the influence-balancing benchmark.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_es.unrolled import UnrolledSystem


class LinearQuadraticSystem(UnrolledSystem):
    """``s_t = A s_{t-1} + B theta + c``, loss ``0.5 ||H s_t - y||^2``.

    Args:
        A: ``[d, d]`` transition matrix.
        B: ``[d, dim]`` input matrix.
        c: ``[d]`` offset (default zeros).
        H: ``[m, d]`` readout of the per-step loss (default identity).
        y: ``[m]`` target (default zeros).
        s0: ``[d]`` initial state (default zeros).
        meta_H: ``[k, d]`` readout of `meta_loss` (default ``H``).
        meta_y: ``[k]`` target of `meta_loss` (default ``y``).
    """

    def __init__(self, A, B, c=None, H=None, y=None, s0=None, meta_H=None, meta_y=None):
        self.A = np.asarray(A, np.float32)
        d = self.A.shape[0]
        self.B = np.asarray(B, np.float32).reshape(d, -1)
        self.c = np.zeros(d, np.float32) if c is None else np.asarray(c, np.float32)
        self.H = np.eye(d, dtype=np.float32) if H is None else np.asarray(H, np.float32)
        self.y = np.zeros(self.H.shape[0], np.float32) if y is None else np.asarray(y, np.float32)
        self.s0 = np.zeros(d, np.float32) if s0 is None else np.asarray(s0, np.float32)
        self.meta_H = self.H if meta_H is None else np.asarray(meta_H, np.float32)
        self.meta_y = self.y if meta_y is None else np.asarray(meta_y, np.float32)

    @property
    def dim(self) -> int:
        return self.B.shape[1]

    def init(self, keys):
        return tf.tile(self.s0[None, :], [tf.shape(keys)[0], 1])

    def step(self, state, theta, keys):
        state = (tf.matmul(state, self.A, transpose_b=True)
                 + tf.matmul(theta, self.B, transpose_b=True) + self.c)
        return state, self._loss(state, self.H, self.y), None

    def meta_loss(self, state, keys):
        return self._loss(state, self.meta_H, self.meta_y)

    @staticmethod
    def _loss(state, H, y):
        r = tf.matmul(state, H, transpose_b=True) - y
        return 0.5 * tf.reduce_sum(tf.square(r), axis=-1)

    # --------------------------------------------------------- exact answers
    def trajectory(self, theta, steps: int) -> np.ndarray:
        """States ``s_1..s_steps`` (float64) of one unperturbed episode."""
        theta = np.asarray(theta, np.float64)
        s = self.s0.astype(np.float64)
        out = []
        for _ in range(steps):
            s = self.A @ s + self.B @ theta + self.c
            out.append(s)
        return np.asarray(out)

    def step_gradients(self, theta, steps: int, meta: bool = False) -> np.ndarray:
        """``[steps, dim]``: exact d loss_t / d theta for t = 1..steps of an episode
        (``meta=True``: of the meta-loss at step t), in float64."""
        H, y = (self.meta_H, self.meta_y) if meta else (self.H, self.y)
        theta = np.asarray(theta, np.float64)
        states = self.trajectory(theta, steps)
        ds = np.zeros((self.A.shape[0], self.dim))  # d s_t / d theta
        grads = []
        for t in range(steps):
            ds = self.A @ ds + self.B
            residual = H @ states[t] - y
            grads.append(ds.T @ H.T @ residual)
        return np.asarray(grads)


def influence_balancing(num_positive: int = 10, num_negative: int = 13) -> LinearQuadraticSystem:
    """Influence balancing (Tallec & Ollivier, 2017).

    ``s_{t+1} = A s_t + theta v`` with ``A`` = 0.5 on the diagonal and superdiagonal,
    ``v`` = +1 on the first ``num_positive`` and -1 on the last ``num_negative``
    coordinates, ``s_0`` = ones, loss ``0.5 (s_t[0] - 1)^2``. The short-run influence of
    theta on the loss is positive but the long-run influence negative, so truncated
    methods move theta the wrong way.
    """
    n = num_positive + num_negative
    A = 0.5 * (np.eye(n) + np.eye(n, k=1))
    v = np.concatenate([np.ones(num_positive), -np.ones(num_negative)])
    H = np.zeros((1, n))
    H[0, 0] = 1.0
    return LinearQuadraticSystem(A, v[:, None], H=H, y=np.ones(1), s0=np.ones(n))


def steady_state_optimum(system: LinearQuadraticSystem) -> float:
    """theta minimizing the steady-state loss of a one-parameter linear system."""
    d = system.A.shape[0]
    response = np.linalg.solve(np.eye(d) - system.A.astype(np.float64),
                               system.B[:, 0].astype(np.float64))
    constant = np.linalg.solve(np.eye(d) - system.A.astype(np.float64),
                               system.c.astype(np.float64))
    h = system.H.astype(np.float64)
    # minimize 0.5 ||h (theta r + k) - y||^2 over theta
    a = h @ response
    b = h @ constant - system.y
    return float(-(a @ b) / (a @ a))
