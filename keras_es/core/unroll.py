"""Running an estimator over an `keras_es.UnrolledSystem`: the window loop.

One window is one ``tf.while_loop`` of `Estimator.ask` -> ``system.step`` ->
`Estimator.tell`, then `Estimator.finish` and `Estimator.combine`. Pairs whose episode
restarts are re-initialized with their new episode's keys. The loop has no Python loop
over particles and traces once; with ``jit_compile`` the particles' steps compile with
XLA (the cross-replica reduction in ``combine`` stays outside the compiled part).
"""

from __future__ import annotations

import tensorflow as tf

from keras_es import distribute as distribute_lib
from keras_es.core import guard, pairs
from keras_es.core.pairs import twin as _twin
from keras_es.unrolled import UnrolledSystem, select


def window(est, system: UnrolledSystem, system_state, state, theta, seed,
           shard: distribute_lib.Shard | None = None, jit_compile: bool = False,
           active=None, credit: bool = True):
    """Runs one truncated unroll of K steps (ask, ``system.step``, tell) and
    estimates the gradient.

    Args:
        est: The `keras_es.Estimator`.
        system: The `UnrolledSystem`.
        system_state: Its particles' states.
        state: This estimator's `EstimatorState`.
        theta: float32 ``[dim]`` unconstrained hyperparameters.
        seed: int scalar, the run's seed.
        shard: The pairs this replica holds (`keras_es.distribute.replica_shard`
            inside ``strategy.run``); default: all of them, on one device.
        jit_compile: Compile the particles' steps with XLA (the cross-replica
            reduction stays outside the compiled part).
        active: Optional bool ``[pairs]``: pairs that take part in this window
            (default all). The others wait: their states, noise and counters do
            not move and they are not credited.
        credit: Whether the window's losses are credited to the estimate.

    Returns:
        ``(system_state, state, WindowResult)``.
    """
    shard = shard or distribute_lib.single(state.num_pairs)
    wait = tf.zeros([state.num_pairs], tf.int32)
    if active is not None:
        wait = tf.where(tf.convert_to_tensor(active, tf.bool), 0, est.truncation_length + 1)
    system_state, state, partials = _unroll(
        est, system, system_state, state, theta, seed, shard.first_pair,
        est.truncation_length, wait, credit, jit_compile, all_active=active is None)
    state, result = est.combine(state, partials, shard)
    return system_state, state, result


def burn_in(est, system: UnrolledSystem, system_state, state, theta, seed,
            shard: distribute_lib.Shard | None = None, jit_compile: bool = False):
    """Advances pair ``p`` by ``start_offsets[p]`` uncredited steps.

    The steps use the pair's perturbations and build its accumulator exactly as
    credited steps would, so later windows stay unbiased; only their losses are not
    credited. Returns ``(system_state, state)``.
    """
    shard = shard or distribute_lib.single(state.num_pairs)
    total = shard.total_pairs
    # Python arithmetic (not a tensor), so no graph conditional ever wraps the
    # cross-replica reduction below. Offsets ascend: the last pair's is the longest.
    longest = (total - 1) * est.horizon // total if est.staggered else 0
    if longest == 0:
        return system_state, state
    wait = longest - est.offsets(shard.first_pair + tf.range(state.num_pairs), total)
    system_state, state, partials = _unroll(
        est, system, system_state, state, theta, seed, shard.first_pair, longest, wait,
        False, jit_compile)
    state, _ = est.combine(state, partials, shard)
    return system_state, state


def _unroll(est, system, system_state, state, theta, seed, first_pair,
            num_steps, wait, credit, jit_compile, all_active=False):
    """``num_steps`` steps of ask -> ``system.step`` -> tell for this replica's pairs
    (pair ``p`` waits ``wait[p]`` steps first; ``all_active``: ``wait`` is all zeros),
    then `Estimator.finish`; compiled with XLA when asked. Returns
    ``(system_state, state, WindowPartials)``."""
    def run(system_state, state, theta, wait, first_pair):
        return _unroll_graph(est, system, system_state, state, theta, seed, first_pair,
                             num_steps, wait, credit, all_active)

    theta = tf.convert_to_tensor(theta, tf.float32)
    first_pair = tf.convert_to_tensor(first_pair, tf.int32)
    if jit_compile:
        # A fresh function per trace of the caller, which traces once.
        run = tf.function(run, jit_compile=True, autograph=False)
    return run(system_state, state, theta, wait, first_pair)


def _unroll_graph(est, system, system_state, state, theta, seed, first_pair, num_steps,
                  wait, credit, all_active):
    context = est.sampler.context(state.sampler)
    reset = _traced_once(system.reset)

    def meta_losses(sys_state, st):
        f = system.meta_loss(sys_state, pairs.episode_keys(st.episode, seed, first_pair))
        return f[0::2], f[1::2]

    def body(s, sys_state, st, sums):
        active = s >= wait
        # Window starts; in a burn-in, every K steps after the pair wakes up.
        window_start = active & tf.equal((s - wait) % est.truncation_length, 0)
        st, thetas = est.ask(st, theta, seed, active=active, window_start=window_start,
                             first_pair=first_pair, context=context)
        new_sys, loss, done = system.step(sys_state, thetas,
                                          pairs.step_keys(st.steps, seed, first_pair))
        # Waiting pairs keep their state. Without any (a window of every pair), the
        # selection would copy every particle's weights and slots each step for nothing.
        sys_state = new_sys if all_active else select(_twin(active), new_sys, sys_state)
        before = st
        st, sums, restart = est.tell(st, sums, loss, active=active, done=done,
                                     meta_losses=lambda: meta_losses(sys_state, before),
                                     credit=credit)
        return s + 1, _reset(reset, sys_state, st, restart, seed, first_pair), st, sums

    _, system_state, state, sums = tf.while_loop(
        lambda s, *_: s < num_steps, body,
        (tf.constant(0), system_state, state, est.start_window(state)),
        maximum_iterations=num_steps)
    window_end = meta_losses(system_state, state) if est.credit.final else None
    finite = guard.finite_particles(system_state, state.num_pairs)
    state, partials, restart = est.finish(state, sums, meta_losses=window_end, finite=finite,
                                          credit=credit)
    return _reset(reset, system_state, state, restart, seed, first_pair), state, partials


def _traced_once(reset):
    """``reset`` as a function of its own, traced and optimized once for both places a
    window calls it (in the loop and after it) instead of once inlined at each: for a
    Keras population, whose re-initialization is a large graph, that is ~1/3 of the
    window's tracing and graph-optimization time. It runs only on a restart."""
    return tf.function(reset, autograph=False, experimental_attributes={"_noinline": True})


def _reset(reset, sys_state, state, restart, seed, first_pair):
    """Re-initializes both twins of the pairs in ``restart`` with their new episode's key."""
    keys = pairs.episode_keys(state.episode, seed, first_pair)
    return tf.cond(tf.reduce_any(restart),
                   lambda: reset(sys_state, _twin(restart), keys),
                   lambda: sys_state)
