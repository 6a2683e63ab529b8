"""Particle throughput: `keras_es.Population` against Python loops over Keras models.

Writes ``benchmarks/results/particles.json``: particle-steps per second (one particle
taking one optimizer step on one batch) for N in {1, 8, 32, 128} particles on three
models, each measured against two baselines in the same process, with the same data
and the same TF threading settings:

* ``keras_loop``: a Python loop over N compiled Keras models calling ``train_on_batch``;
* ``tf_function_loop``: N models, each with its own ``tf.function`` train step
  (GradientTape + ``optimizer.apply_gradients``, Keras SGD with momentum);
* ``engine``: one ``keras_es.Population`` of N particles with per-particle SGD
  (learning rate and momentum decoded from theta), ``tf.function(train_step,
  jit_compile=population.xla_friendly)``, one batch shared by all particles. The MLPs
  run vectorized under XLA; the CNN stacked along channels without XLA where
  TensorFlow's oneDNN kernels are on, else vectorized under XLA (the population's
  ``execution="auto"`` choice; ``TF_ENABLE_ONEDNN_OPTS`` is recorded).

With ``jax`` installed (``pip install keras_es[bench]``; never a dependency of the
library), the engine is also measured against the peer ES papers use, interleaved in
the same process: per-particle parameters stacked on a leading axis and
``jax.jit(jax.vmap(step))`` with SGD momentum, the same initialization scale, batch,
learning rate and momentum (`JaxPeer`). Both per step (one call = one optimizer step of
all N particles) and per window of K steps (the engine's ``train_step`` in a
``tf.while_loop`` inside one ``tf.function``, as `keras_es.MetaTrainer` runs a window,
against ``jax.lax.scan``); the ratio engine / JAX particle-steps per second is taken in
each of several alternating rounds and its median and range reported. Without jax the
script says "jax not installed, peer skipped". ``--only-jax`` runs just that comparison.

Models: ``mlp`` 784-128-128-10 at batch 128 (compute-bound), ``small_mlp`` 784-32-32-10
at batch 32 (overhead-bound), ``cnn`` Conv(8)-Pool-Conv(16)-Pool-Dense(10) on 28x28x1 at
batch 32. Also measured: the machine's dense matmul GFLOP/s (chained 1024x1024 float32
matmuls in a ``tf.function``, with and without XLA, best of both, at the start and the
end of the run), each approach's achieved GFLOP/s (forward FLOPs x 3 x batch x
particle-steps/s), the engine's compile time and its peak memory per particle (in a
fresh subprocess per case, from ``/proc/self/status`` VmHWM).

This machine may be shared: every measurement is split into windows and the best
window is reported (the median is kept too), and the CPU time other processes used
during each measurement is recorded as ``background_cpu_cores``.

Usage: ``python benchmarks/particles.py [--quick] [--seconds 3] [--out PATH]
[--intra-op K] [--inter-op K] [--only-jax | --no-jax] [--window-steps 10]
[--jax-rounds 10] [--jax-seconds 0.3]``. ``--quick`` (N in {1, 4}, short windows, the
JAX peer at the largest N only) is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402
from keras_es import engine  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODELS = ("mlp", "small_mlp", "cnn")
APPROACHES = ("keras_loop", "tf_function_loop", "engine")
BASELINES = ("keras_loop", "tf_function_loop")
BATCH = {"mlp": 128, "small_mlp": 32, "cnn": 32}
LEARNING_RATE, MOMENTUM = 0.01, 0.9
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# The targets at N = 32: engine / baseline ratios and the MLP's share of the
# measured matmul FLOP/s.
TARGETS = {"mlp": {"vs_keras_loop": 3.5, "vs_tf_function_loop": 2.0, "matmul_fraction": 0.75},
           "small_mlp": {"vs_keras_loop": 12.0, "vs_tf_function_loop": 6.0},
           "cnn": {"vs_keras_loop": 3.0}}


# ---------------------------------------------------------------------- models and data
def build_model(name: str, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if name == "mlp":
        body = [keras.Input((784,)), layers.Dense(128, activation="relu"),
                layers.Dense(128, activation="relu"), layers.Dense(10)]
    elif name == "small_mlp":
        body = [keras.Input((784,)), layers.Dense(32, activation="relu"),
                layers.Dense(32, activation="relu"), layers.Dense(10)]
    elif name == "cnn":
        body = [keras.Input((28, 28, 1)), layers.Conv2D(8, 3, activation="relu"),
                layers.MaxPooling2D(), layers.Conv2D(16, 3, activation="relu"),
                layers.MaxPooling2D(), layers.Flatten(), layers.Dense(10)]
    else:
        raise ValueError(f"model={name!r} is invalid; expected one of {MODELS}.")
    return keras.Sequential(body)


def batch(name: str, seed: int):
    """One fixed random batch ``(x, y)`` (tensors, shared by every approach)."""
    rng = np.random.default_rng(seed)
    shape = (784,) if name != "cnn" else (28, 28, 1)
    x = rng.normal(size=(BATCH[name],) + shape).astype("float32")
    y = rng.integers(0, 10, BATCH[name]).astype("int32")
    return tf.constant(x), tf.constant(y)


def population(name: str, n: int, seed: int):
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", LEARNING_RATE, "log"),
                                  keras_es.Hyperparameter("momentum", MOMENTUM, "logit")])
    pop = keras_es.Population(build_model(name, seed), n, space, LOSS,
                              engine.SGD("lr", momentum="momentum"))
    keys = tf.stack([tf.range(n, dtype=tf.int32), tf.fill([n], seed)], axis=1)
    theta = tf.tile(tf.constant(space.encode(), tf.float32)[None], [n, 1])
    return pop, pop.init(keys), theta


def profiler_flops(model: keras.Model) -> int | None:
    """Forward FLOPs of one example from TF's graph profiler (MatMul and convolution
    nodes only, as ``count_flops_per_example`` counts them); None if unavailable."""
    try:
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        spec = tf.TensorSpec([1] + list(model.inputs[0].shape[1:]), tf.float32)
        fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        graph = convert_variables_to_constants_v2(fn).graph
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        info = tf.compat.v1.profiler.profile(graph=graph, options=options)
        return sum(c.total_float_ops for c in info.children
                   if c.name.endswith(("MatMul", "convolution", "Conv2D")))
    except Exception:  # noqa: BLE001 - a cross-check only
        return None


# ---------------------------------------------------------------------- measuring
def _cpu_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system [idle iowait] irq softirq steal
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# Longest wait (seconds) for other processes to go quiet before each measurement; set
# from --wait-quiet. 0 disables waiting.
WAIT_QUIET = 0.0


def wait_for_quiet(max_wait: float, threshold: float = 0.25, probe: float = 1.0) -> float:
    """Sleeps until other processes use less than ``threshold`` cores over ``probe``
    seconds, or ``max_wait`` seconds have passed; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        busy0, own0 = _cpu_busy_seconds(), _own_cpu_seconds()
        if busy0 is None:
            break
        time.sleep(probe)
        if (_cpu_busy_seconds() - busy0) - (_own_cpu_seconds() - own0) < threshold * probe:
            break
    return time.perf_counter() - start


def timed(run_round, sync, particles_per_round: int, seconds: float, windows: int) -> dict:
    """Runs ``run_round`` in ``windows`` windows of ``seconds / windows`` each (at least
    one round per window); reports the best and the median window's rate."""
    waited = wait_for_quiet(WAIT_QUIET) if WAIT_QUIET > 0 else 0.0
    rates, total = [], 0
    busy0, own0, wall0 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    for _ in range(windows):
        rounds, start = 0, time.perf_counter()
        deadline = start + seconds / windows
        out = None
        while rounds == 0 or time.perf_counter() < deadline:
            out = run_round()
            rounds += 1
        sync(out)
        rates.append(rounds * particles_per_round / (time.perf_counter() - start))
        total += rounds * particles_per_round
    wall = time.perf_counter() - wall0
    busy1 = _cpu_busy_seconds()
    background = (None if busy0 is None else
                  max(0.0, (busy1 - busy0) - (_own_cpu_seconds() - own0)) / wall)
    return {"particle_steps_per_s": max(rates),
            "particle_steps_per_s_median": statistics.median(rates),
            "window_rates": [round(r, 1) for r in rates],
            "particle_steps_timed": total, "seconds_timed": round(wall, 2),
            "own_cpu_cores": round((_own_cpu_seconds() - own0) / wall, 2),
            "waited_for_quiet_s": round(waited, 1),
            "background_cpu_cores": None if background is None else round(background, 2)}


def matmul_gflops(seconds: float, size: int = 1024, chain: int = 10) -> dict:
    """Dense float32 matmul throughput: ``chain`` dependent size x size matmuls per call."""
    a = tf.random.stateless_normal([size, size], seed=[1, 2]) / size ** 0.5
    b = tf.random.stateless_normal([size, size], seed=[3, 4])
    out = {}
    for jit in (False, True):
        @tf.function(jit_compile=jit)
        def f(a, b):
            c = b
            for _ in range(chain):
                c = tf.matmul(a, c)
            return c

        f(a, b).numpy()
        r = timed(lambda f=f: f(a, b), lambda c: c.numpy(), 1, seconds, 3)
        out["xla" if jit else "graph"] = round(2 * size ** 3 * chain
                                                * r["particle_steps_per_s"] / 1e9, 1)
        out[("xla" if jit else "graph") + "_background_cpu_cores"] = r["background_cpu_cores"]
    out["best"] = max(out["graph"], out["xla"])
    return out


def mlp_floor(n: int, seconds: float, windows: int) -> dict:
    """What the ``mlp`` engine step at N particles cannot go below: its matmuls alone
    (forward and backward, nothing else, in the fastest layout each way: the first layer
    as one wide matmul, the others batched) and its SGD-momentum update alone (XLA, one
    fused pass). Both are measured as particle-steps/s; ``floor_particle_steps_per_s``
    runs them back to back (1 / (1/a + 1/b)), an upper bound on any step that keeps the
    weights, slots and gradients as separate tensors."""
    b, sizes = BATCH["mlp"], (784, 128, 128, 10)
    rng = lambda *shape: tf.random.stateless_normal(shape, seed=[len(shape), 7])  # noqa: E731
    x, wide, g_wide = rng(b, 784), rng(784, n * 128), rng(b, n * 128)
    h, k2, k3, g3 = rng(n, b, 128), rng(n, 128, 128), rng(n, 128, 10), rng(n, b, 10)

    def matmuls(x, wide, g_wide, h, k2, k3, g3):
        return (x @ wide, tf.matmul(x, g_wide, transpose_a=True),  # layer 1: y, dW
                h @ k2, tf.matmul(h, h, transpose_a=True), tf.matmul(h, k2, transpose_b=True),
                h @ k3, tf.matmul(h, g3, transpose_a=True), tf.matmul(g3, k3, transpose_b=True))

    out = {"n": n}
    for jit in (False, True):
        f = tf.function(matmuls, jit_compile=jit)
        args = (x, wide, g_wide, h, k2, k3, g3)
        f(*args)[0].numpy()
        r = timed(lambda f=f, args=args: f(*args)[0], lambda t: t.numpy(), n, seconds, windows)
        out[f"matmuls_only_{'xla' if jit else 'graph'}"] = round(r["particle_steps_per_s"], 1)
    shapes = [(n, a, c) for a, c in zip(sizes[:-1], sizes[1:], strict=True)]
    shapes += [(n, c) for c in sizes[1:]]
    weights = [rng(*s) for s in shapes]
    lr, momentum = rng(n), rng(n)

    @tf.function(jit_compile=True)
    def update(weights, slots, grads):
        new_w, new_m = [], []
        for w, m, g in zip(weights, slots, grads, strict=True):
            shape = [n] + [1] * (len(w.shape) - 1)
            m = m * tf.reshape(momentum, shape) - g * tf.reshape(lr, shape)
            new_w.append(w + m)
            new_m.append(m)
        return new_w, new_m

    slots = [w * 0.5 for w in weights]
    grads = [w * 0.1 for w in weights]
    update(weights, slots, grads)
    r = timed(lambda: update(weights, slots, grads)[0][0], lambda t: t.numpy(), n, seconds,
              windows)
    out["update_only_xla"] = round(r["particle_steps_per_s"], 1)
    best = max(out["matmuls_only_graph"], out["matmuls_only_xla"])
    out["floor_particle_steps_per_s"] = round(1 / (1 / best + 1 / out["update_only_xla"]), 1)
    # the first layer needs no input gradient: 2 matmuls; the others 3
    layer_macs = [a * c for a, c in zip(sizes[:-1], sizes[1:], strict=True)]
    out["true_flops_per_particle_step"] = 2 * b * (2 * layer_macs[0] + 3 * sum(layer_macs[1:]))
    return out


class LoopPool:
    """Independent Keras models (plus their train steps), grown on demand and reused
    across N so that each model is traced once."""

    def __init__(self, name: str, approach: str, x, y):
        self.name, self.approach, self.x, self.y = name, approach, x, y
        self.steps: list = []
        self.warmup_seconds: list[float] = []

    def _make_step(self, seed: int):
        model = build_model(self.name, seed)
        optimizer = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
        if self.approach == "keras_loop":
            model.compile(optimizer=optimizer, loss=LOSS)
            return lambda x, y: model.train_on_batch(x, y)
        optimizer.build(model.trainable_variables)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return step

    def grow(self, n: int, seed: int) -> None:
        while len(self.steps) < n:
            start = time.perf_counter()
            step = self._make_step(seed + len(self.steps))
            for _ in range(2):  # trace, then one steady-state step
                loss = step(self.x, self.y)
            float(loss)
            self.steps.append(step)
            self.warmup_seconds.append(time.perf_counter() - start)

    def measure(self, n: int, seconds: float, windows: int, seed: int) -> dict:
        self.grow(n, seed)
        steps, x, y = self.steps[:n], self.x, self.y

        def run_round():
            for step in steps:
                loss = step(x, y)
            return loss

        result = timed(run_round, float, n, seconds, windows)
        result["final_loss"] = float(run_round())
        result["warmup_seconds_per_model"] = round(statistics.mean(self.warmup_seconds[:n]), 3)
        return result


def measure_engine(name: str, n: int, x, y, seconds: float, windows: int, seed: int) -> dict:
    pop, state, theta = population(name, n, seed)
    step = tf.function(pop.train_step, jit_compile=pop.xla_friendly)
    start = time.perf_counter()
    state, loss = step(state, theta, x, y)
    loss.numpy()
    compile_seconds = time.perf_counter() - start
    for _ in range(2):
        state, loss = step(state, theta, x, y)
    loss.numpy()
    box = [state]

    def run_round():
        box[0], loss = step(box[0], theta, x, y)
        return loss

    result = timed(run_round, lambda loss: loss.numpy(), n, seconds, windows)
    result["final_loss"] = float(np.mean(run_round().numpy()))
    result["compile_seconds"] = round(compile_seconds, 2)
    result["params_per_particle"] = int(sum(np.prod(v.shape) for v in pop.model.weights))
    result["execution"] = "stacked" if pop.stacked else "vectorized"
    result["jit_compile"] = pop.xla_friendly
    return result


# ---------------------------------------------------------------------- the JAX peer
JAX_DEFINITION = (
    "ratio = engine / JAX particle-steps per second, measured in {rounds} interleaved "
    "rounds of {seconds} s per contender (at least one call; the order alternating; "
    "fewer rounds, at least 3, where single calls are slow: see each case's rounds), "
    "one ratio per round; "
    "median and range reported. JAX peer: per-particle parameters stacked on a leading "
    "axis (Glorot-uniform kernels, zero biases, as Keras initializes), "
    "jax.jit(jax.vmap(step, in_axes=(0, 0, 0, 0, None, None))) with per-particle SGD "
    "momentum (m = momentum * m - lr * g; w = w + m; lr 0.01, momentum 0.9), the same "
    "batch shared by all particles, mean sparse softmax cross-entropy; no buffer "
    "donation. Per step: one call = one optimizer step of all N particles (engine: "
    "tf.function(train_step, jit_compile=xla_friendly)). Per window: one call = K={k} "
    "steps, engine in one tf.function with a tf.while_loop (XLA where xla_friendly, as "
    "MetaTrainer's window), JAX in one jax.lax.scan under jax.jit. cpu_ratio = JAX / "
    "engine CPU seconds (this process, all threads) per particle-step: above 1 the "
    "engine does the same work with less CPU, a figure less sensitive to other "
    "processes than the wall-clock ratio.")
def import_jax():
    """``jax`` if it is installed (a benchmark-only extra: ``pip install keras_es[bench]``),
    else None."""
    try:
        import jax
    except ImportError:
        return None
    return jax


def jax_init(jax, name: str, n: int, seed: int) -> list:
    """Every particle's parameters ``[(kernel [N, ...], bias [N, out]), ...]``: kernels
    Glorot-uniform (Keras's default, with its fan in and out), biases zero, as the
    Keras model's. Drawn with NumPy: jax.random would compile a kernel per shape."""
    if name == "cnn":
        kernels = [(3, 3, 1, 8), (3, 3, 8, 16), (400, 10)]
    else:
        width = 128 if name == "mlp" else 32
        kernels = [(784, width), (width, width), (width, 10)]
    rng = np.random.default_rng(seed)
    params = []
    for shape in kernels:
        receptive = int(np.prod(shape[:-2]))
        limit = (6.0 / (receptive * (shape[-2] + shape[-1]))) ** 0.5
        kernel = rng.uniform(-limit, limit, (n,) + shape).astype(np.float32)
        params.append((jax.numpy.asarray(kernel), jax.numpy.zeros((n, shape[-1]))))
    return params


def jax_forward(jax, name: str, params, x):
    """One particle's logits: the same layers as `build_model`."""
    jnp, lax = jax.numpy, jax.lax
    h = x
    if name == "cnn":
        for kernel, bias in params[:2]:
            h = lax.conv_general_dilated(h, kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + bias)
            h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = h.reshape(h.shape[0], -1)
        kernel, bias = params[2]
        return h @ kernel + bias
    for i, (kernel, bias) in enumerate(params):
        h = h @ kernel + bias
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


class JaxPeer:
    """What ES papers run: per-particle parameters stacked on a leading axis and
    ``jax.jit(jax.vmap(step))``, SGD with momentum (Keras's equations: ``m = momentum *
    m - lr * g; w = w + m``), one batch shared by all particles. ``step`` makes one
    optimizer step of all N particles per call, ``window`` K steps in one
    ``jax.lax.scan``. ``params`` (``[(kernel, bias), ...]``, each ``[N, ...]``) replaces
    the `jax_init` draw."""

    def __init__(self, jax, name: str, n: int, seed: int, window_steps: int,
                 params: list | None = None):
        jnp = jax.numpy
        self.jax = jax

        def loss_fn(params, x, y):
            logits = jax_forward(jax, name, params, x)
            log_p = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))

        def one(params, slots, lr, momentum, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            slots = jax.tree_util.tree_map(lambda m, g: m * momentum - g * lr, slots, grads)
            params = jax.tree_util.tree_map(lambda w, m: w + m, params, slots)
            return params, slots, loss

        vstep = jax.vmap(one, in_axes=(0, 0, 0, 0, None, None))

        def window(params, slots, lr, momentum, x, y):
            def body(carry, _):
                params, slots, loss = vstep(*carry, lr, momentum, x, y)
                return (params, slots), loss

            (params, slots), losses = jax.lax.scan(body, (params, slots), None,
                                                   length=window_steps)
            return params, slots, losses[-1]

        self.step, self.window = jax.jit(vstep), jax.jit(window)
        params = jax_init(jax, name, n, seed) if params is None else params
        self.state = (params, jax.tree_util.tree_map(jnp.zeros_like, params))
        self.hyper = (jnp.full((n,), LEARNING_RATE), jnp.full((n,), MOMENTUM))

    def caller(self, fn, x, y):
        """A function that runs ``fn`` once on the current state and returns the loss."""
        x, y = self.jax.numpy.asarray(x), self.jax.numpy.asarray(y)

        def run():
            params, slots, loss = fn(*self.state, *self.hyper, x, y)
            self.state = (params, slots)
            return loss

        return run


def engine_window(pop, window_steps: int):
    """The engine's K steps in one ``tf.function``, a ``tf.while_loop`` over
    ``train_step`` compiled with XLA where ``pop.xla_friendly`` (as
    `keras_es.MetaTrainer` runs a window)."""
    @tf.function(jit_compile=pop.xla_friendly, autograph=False)
    def window(state, theta, x, y):
        def body(i, state, loss):
            state, loss = pop.train_step(state, theta, x, y)
            return i + 1, state, loss

        _, state, loss = tf.while_loop(
            lambda i, *_: i < window_steps, body,
            (tf.constant(0), state, tf.zeros([theta.shape[0]])),
            maximum_iterations=window_steps)
        return state, loss

    return window


def interleaved(contenders: dict, particle_steps_per_call: int, rounds: int,
                seconds: float) -> dict:
    """Runs each contender ``(run, sync)`` for ``seconds`` per round, in turn (the order
    alternates between rounds), ``rounds`` times; ``{name: [particle-steps/s per
    round]}`` plus the background CPU cores over the whole run. A call may overlap the
    previous one's computation (JAX dispatches asynchronously), never two before it."""
    names = list(contenders)
    rates = {name: [] for name in names}
    cpu = {name: [] for name in names}
    waited = 0.0
    busy0, own0, wall0 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    for r in range(rounds):
        waited += wait_for_quiet(WAIT_QUIET) if WAIT_QUIET > 0 else 0.0
        for name in (names if r % 2 == 0 else names[::-1]):
            run, sync = contenders[name]
            calls, start, cpu0 = 0, time.perf_counter(), _own_cpu_seconds()
            out = None
            while calls == 0 or time.perf_counter() < start + seconds:
                previous, out = out, run()
                calls += 1
                if previous is not None:
                    # At most two calls in flight: JAX dispatches asynchronously, and
                    # an unbounded queue of slow calls would outlast the slice by far.
                    sync(previous)
            sync(out)
            steps = calls * particle_steps_per_call
            rates[name].append(steps / (time.perf_counter() - start))
            cpu[name].append((_own_cpu_seconds() - cpu0) / steps)
    wall = time.perf_counter() - wall0
    background = (None if busy0 is None else max(
        0.0, (_cpu_busy_seconds() - busy0) - (_own_cpu_seconds() - own0)) / wall)
    return {"rates": rates, "cpu_seconds_per_particle_step": cpu,
            "waited_for_quiet_s": round(waited, 1),
            "background_cpu_cores": None if background is None else round(background, 2)}


def compare_with_jax(jax, name: str, n: int, x, y, args) -> list[dict]:
    """The engine against `JaxPeer`, interleaved, per step and per window of
    ``args.window_steps`` steps: one dict per mode with the per-round ratios
    (engine / JAX particle-steps per second)."""
    pop, state, theta = population(name, n, args.seed)
    peer = JaxPeer(jax, name, n, args.seed, args.window_steps)
    box = [state]

    def engine_run(fn):
        def run():
            box[0], loss = fn(box[0], theta, x, y)
            return loss
        return run

    modes = (("step", tf.function(pop.train_step, jit_compile=pop.xla_friendly),
              peer.step, 1),
             ("window", engine_window(pop, args.window_steps), peer.window,
              args.window_steps))
    out = []
    for mode, engine_fn, jax_fn, steps in modes:
        contenders = {"engine": (engine_run(engine_fn), lambda loss: loss.numpy()),
                      "jax": (peer.caller(jax_fn, x.numpy(), y.numpy()), np.asarray)}
        compile_seconds, call_seconds = {}, {}
        for key, (run, sync) in contenders.items():
            start = time.perf_counter()
            sync(run())
            compile_seconds[key] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            sync(run())
            call_seconds[key] = time.perf_counter() - start
        # A round runs each contender at least once: where one call is slow (XLA's
        # grouped convolutions make the JAX CNN's take seconds at large N), fewer
        # rounds keep the case within its budget.
        print(f"  {name} N={n} per {mode}: first calls {compile_seconds} s, then "
              f"{ {k: round(v, 3) for k, v in call_seconds.items()} } s", flush=True)
        per_round = sum(max(args.jax_seconds, t) for t in call_seconds.values())
        rounds = max(3, min(args.jax_rounds, int(args.jax_budget / per_round)))
        r = interleaved(contenders, n * steps, rounds, args.jax_seconds)
        engine, peer_rates = r["rates"]["engine"], r["rates"]["jax"]
        ratios = [e / j for e, j in zip(engine, peer_rates, strict=True)]
        cpu = r["cpu_seconds_per_particle_step"]
        cpu_ratios = [j / e for e, j in zip(cpu["engine"], cpu["jax"], strict=True) if e > 0]
        out.append({
            "model": name, "n": n, "mode": mode, "steps_per_call": steps, "rounds": rounds,
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "ratios": [round(v, 3) for v in ratios],
            "engine_particle_steps_per_s_median": round(statistics.median(engine), 1),
            "jax_particle_steps_per_s_median": round(statistics.median(peer_rates), 1),
            "engine_final_loss": float(np.mean(contenders["engine"][0]().numpy())),
            "jax_final_loss": float(np.mean(np.asarray(contenders["jax"][0]()))),
            "cpu_ratio_median": (round(statistics.median(cpu_ratios), 3) if cpu_ratios
                                 else None),
            "first_call_seconds": compile_seconds,
            "background_cpu_cores": r["background_cpu_cores"],
            "waited_for_quiet_s": r["waited_for_quiet_s"],
            "engine_execution": "stacked" if pop.stacked else "vectorized",
            "engine_jit_compile": pop.xla_friendly})
    return out


# ---------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_probe(name: str, n: int, seed: int) -> dict:
    """Peak RSS growth of building, compiling and running an N-particle engine step,
    in this (fresh) process: VmHWM is reset to the current RSS through
    ``/proc/self/clear_refs`` just before, and read after a few steps."""
    x, y = batch(name, seed)
    build_model(name, seed)  # Keras/TF one-time setup outside the measured span
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _proc_status_kb("VmRSS")
    pop, state, theta = population(name, n, seed)
    step = tf.function(pop.train_step, jit_compile=pop.xla_friendly)
    for _ in range(5):
        state, loss = step(state, theta, x, y)
    loss.numpy()
    peak = _proc_status_kb("VmHWM")
    if before is None or peak is None:
        return {"n": n, "error": "/proc/self/status unavailable"}
    state_bytes = sum(int(np.prod(t.shape)) * t.dtype.size
                      for t in tf.nest.flatten(state) if t.shape.rank and t.shape[0] == n)
    return {"n": n, "hwm_reset": reset, "rss_before_mb": before / 1024,
            "peak_mb": peak / 1024, "peak_growth_mb": (peak - before) / 1024,
            "state_mb": state_bytes / 2 ** 20}


def run_memory_probe(name: str, n: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, str(n),
           "--intra-op", str(args.intra_op), "--inter-op", str(args.inter_op),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"n": n, "error": out.stderr[-2000:]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------- report
def ratios(cases: list[dict], vs_jax: list[dict]) -> dict:
    rate = {(c["model"], c["n"], c["approach"]): c["particle_steps_per_s"] for c in cases}
    out: dict = {}
    for (model, n, approach), value in rate.items():
        if approach != "engine":
            continue
        row = out.setdefault(model, {}).setdefault(str(n), {})
        for base in BASELINES:
            if (model, n, base) in rate:
                row[f"vs_{base}"] = round(value / rate[(model, n, base)], 2)
    for c in vs_jax:
        row = out.setdefault(c["model"], {}).setdefault(str(c["n"]), {})
        row[f"vs_jax_per_{c['mode']}"] = round(c["ratio_median"], 2)
        row[f"vs_jax_per_{c['mode']}_range"] = [round(c["ratio_min"], 2),
                                               round(c["ratio_max"], 2)]
    return out


def jax_targets(vs_jax: list[dict]) -> dict:
    """The target: at N >= 8 the engine makes at least as many particle-steps per
    second as the JAX peer (median ratio >= 1) on every model, per window."""
    out = {}
    for c in vs_jax:
        if c["mode"] == "window" and c["n"] >= 8:
            out[f"{c['model']} N={c['n']}"] = {"value": c["ratio_median"], "target": 1.0,
                                              "met": c["ratio_median"] >= 1.0}
    return out


def check_targets(result: dict) -> dict:
    out = {}
    for model, targets in TARGETS.items():
        row = result["ratios"].get(model, {}).get("32")
        if not row or result.get("matmul_gflops") is None:  # --only-jax: no loops run
            out[model] = {"measured": False}
            continue
        checks = {}
        for key, target in targets.items():
            if key == "matmul_fraction":
                engine_case = next(c for c in result["cases"] if c["model"] == model
                                   and c["n"] == 32 and c["approach"] == "engine")
                value = round(engine_case["gflops"] / result["matmul_gflops"], 3)
            else:
                value = row.get(key)
            checks[key] = {"value": value, "target": target,
                           "met": value is not None and value >= target}
            if key == "matmul_fraction":
                matmul = result["config"]["matmul"]
                checks[key]["engine_gflops"] = engine_case["gflops"]
                checks[key]["vs_xla_matmul_only"] = round(
                    engine_case["gflops"] / max(matmul["start"]["xla"], matmul["end"]["xla"]), 3)
                floor = result.get("mlp_floor_n32")
                if model == "mlp" and floor:
                    # the best any step with separate gradient and update passes can do
                    checks[key]["floor_fraction"] = round(
                        floor["gflops"]["floor_particle_steps_per_s"]
                        / result["matmul_gflops"], 3)
        out[model] = checks
    return out


def print_jax_table(result: dict) -> None:
    cases = result["vs_jax"]["cases"]
    print(f"\nengine / JAX peer ({result['vs_jax']['peer']}), median of interleaved rounds:")
    if not cases:
        return
    print(f"{'model':<10}{'N':>5}  {'per':<7}{'ratio':>7}  {'range':<12}{'engine':>10}"
          f"{'JAX':>10}{'bg cpu':>8}")
    for c in cases:
        bg = c["background_cpu_cores"]
        print(f"{c['model']:<10}{c['n']:>5}  {c['mode']:<7}{c['ratio_median']:>7.2f}  "
              f"{c['ratio_min']:.2f}-{c['ratio_max']:<7.2f}"
              f"{c['engine_particle_steps_per_s_median']:>10.0f}"
              f"{c['jax_particle_steps_per_s_median']:>10.0f}"
              f"{'-' if bg is None else f'{bg:.2f}':>8}")
    for key, check in (result["vs_jax"]["targets"] or {}).items():
        print(f"  per window {key:<16} {check['value']:>6.2f} (target >= 1.0) "
              f"{'met' if check['met'] else 'MISSED'}")


def print_table(result: dict) -> None:
    print_jax_table(result)
    if not result["cases"]:
        return
    rate = {(c["model"], c["n"], c["approach"]): c for c in result["cases"]}
    print(f"\nmatmul: {result['matmul_gflops']:.1f} GFLOP/s "
          f"(threads intra={result['config']['intra_op_threads']}, "
          f"inter={result['config']['inter_op_threads']})")
    header = (f"{'model':<10}{'N':>5}  {'approach':<17}{'p-steps/s':>11}{'GFLOP/s':>9}"
              f"{'x keras':>9}{'x tf.fn':>9}{'bg cpu':>8}  extra")
    for model in result["config"]["models"]:
        print("\n" + header + "\n" + "-" * len(header))
        for n in result["config"]["n"]:
            for approach in APPROACHES:
                c = rate.get((model, n, approach))
                if c is None:
                    continue
                rel = []
                for base in BASELINES:
                    b = rate.get((model, n, base))
                    rel.append(f"{c['particle_steps_per_s'] / b['particle_steps_per_s']:>9.2f}"
                               if b else f"{'-':>9}")
                extra = ""
                if approach == "engine":
                    extra = f"compile {c['compile_seconds']:.1f}s"
                    if c.get("peak_memory_mb_per_particle") is not None:
                        extra += f", {c['peak_memory_mb_per_particle']:.2f} MB/particle"
                bg = c.get("background_cpu_cores")
                print(f"{model:<10}{n:>5}  {approach:<17}{c['particle_steps_per_s']:>11.1f}"
                      f"{c['gflops']:>9.1f}{rel[0]}{rel[1]}"
                      f"{'-' if bg is None else f'{bg:.2f}':>8}  {extra}")
    print("\ntargets at N = 32:")
    for model, checks in result["targets"].items():
        for key, check in checks.items():
            if isinstance(check, dict):
                print(f"  {model:<10} {key:<22} {check['value']!s:>8} "
                      f"(target >= {check['target']}) {'met' if check['met'] else 'MISSED'}")
    floor = result.get("mlp_floor_n32")
    if floor:
        print(f"\nmlp at N = 32, floor (particle-steps/s): matmuls alone "
              f"{floor['matmuls_only_graph']:.0f} graph / {floor['matmuls_only_xla']:.0f} XLA, "
              f"update alone {floor['update_only_xla']:.0f}, both "
              f"{floor['floor_particle_steps_per_s']:.0f} = "
              f"{floor['gflops']['floor_particle_steps_per_s'] / result['matmul_gflops']:.0%} "
              "of the matmul FLOP/s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "particles.json")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: N in {1, 4}, short windows, memory at the largest N.")
    parser.add_argument("--seconds", type=float, default=None,
                        help="Timing budget per measurement (default 3, quick 0.3).")
    parser.add_argument("--windows", type=int, default=3,
                        help="Windows per measurement; the best window is reported.")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="Particle counts.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--intra-op", type=int, default=0,
                        help="TF intra-op threads for every approach (0: TF's default).")
    parser.add_argument("--inter-op", type=int, default=0,
                        help="TF inter-op threads for every approach (0: TF's default).")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="Before each measurement, wait up to this many seconds for "
                             "other processes to use < 0.25 cores (shared machines).")
    parser.add_argument("--no-memory", action="store_true", help="Skip the memory probes.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-jax", action="store_true",
                        help="Skip the JAX peer even when jax is installed.")
    parser.add_argument("--only-jax", action="store_true",
                        help="Measure the engine against the JAX peer only (no loops, "
                             "no matmul, floor or memory probes).")
    parser.add_argument("--window-steps", type=int, default=10,
                        help="K: optimizer steps per window (tf.while_loop / lax.scan).")
    parser.add_argument("--jax-rounds", type=int, default=None,
                        help="Interleaved engine/JAX rounds per case (default 10, quick 2).")
    parser.add_argument("--jax-seconds", type=float, default=None,
                        help="Seconds per contender per round (default 0.3, quick 0.1).")
    parser.add_argument("--jax-budget", type=float, default=None,
                        help="Seconds per case and mode beyond which rounds are cut "
                             "(at least 3; default 60, quick 5).")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.jax_rounds = args.jax_rounds or (2 if args.quick else 10)
    args.jax_seconds = args.jax_seconds or (0.1 if args.quick else 0.3)
    args.jax_budget = args.jax_budget or (5.0 if args.quick else 60.0)

    tf.get_logger().setLevel("ERROR")
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], int(args.memory_probe[1]),
                                      args.seed)))
        return {}

    global WAIT_QUIET
    WAIT_QUIET = args.wait_quiet
    ns = sorted(args.n or ([1, 4] if args.quick else [1, 8, 32, 128]))
    seconds = args.seconds or (0.3 if args.quick else 3.0)
    windows = 2 if args.quick else args.windows
    start = time.perf_counter()
    jax = None if args.no_jax else import_jax()
    peer_note = ("skipped (--no-jax)" if args.no_jax else
                 "jax not installed, peer skipped (pip install keras_es[bench])" if jax is None
                 else f"jax {jax.__version__}, CPU")
    print(f"JAX peer: {peer_note}", flush=True)
    if args.only_jax and jax is None:
        raise SystemExit("--only-jax needs jax: pip install keras_es[bench]")
    if args.only_jax:
        args.no_memory = True
    matmul_start = None if args.only_jax else matmul_gflops(seconds)
    print(f"matmul: {matmul_start}", flush=True)

    cases, flops_check, vs_jax = [], {}, []
    for name in args.models:
        x, y = batch(name, args.seed)
        template = population(name, 1, args.seed)[0]
        flops = template.count_flops_per_example()
        flops_check[name] = {"count_flops_per_example": flops,
                             "tf_profiler_matmul_conv": profiler_flops(template.model)}
        pools = {a: LoopPool(name, a, x, y) for a in BASELINES}
        for n in ns:
            if jax is not None and (n == ns[-1] or not args.quick):
                for r in compare_with_jax(jax, name, n, x, y, args):
                    vs_jax.append(r)
                    print(f"{name:<10} N={n:<4} vs JAX per {r['mode']:<7} "
                          f"{r['ratio_median']:>6.2f}x (range {r['ratio_min']:.2f}-"
                          f"{r['ratio_max']:.2f}; engine "
                          f"{r['engine_particle_steps_per_s_median']:.0f}, JAX "
                          f"{r['jax_particle_steps_per_s_median']:.0f} particle-steps/s) "
                          f"bg={r['background_cpu_cores']}", flush=True)
            for approach in () if args.only_jax else APPROACHES:
                if approach == "engine":
                    r = measure_engine(name, n, x, y, seconds, windows, args.seed)
                else:
                    r = pools[approach].measure(n, seconds, windows, args.seed)
                r = {"model": name, "n": n, "approach": approach, **r}
                r["gflops"] = round(3 * flops * BATCH[name] * r["particle_steps_per_s"] / 1e9,
                                    2)
                r["particle_steps_per_s"] = round(r["particle_steps_per_s"], 1)
                r["particle_steps_per_s_median"] = round(r["particle_steps_per_s_median"], 1)
                cases.append(r)
                print(f"{name:<10} N={n:<4} {approach:<17} "
                      f"{r['particle_steps_per_s']:>9.1f} particle-steps/s  "
                      f"{r['gflops']:>7.1f} GFLOP/s  bg={r['background_cpu_cores']}",
                      flush=True)
        # What is measured so far, in case the run is cut short; replaced at the end.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"partial": True, "cases": cases, "vs_jax": vs_jax},
                                       indent=2))

    memory = {}
    if not args.no_memory:
        probe_ns = ns[-1:] if args.quick else ns
        for name in args.models:
            probes = [run_memory_probe(name, n, args) for n in probe_ns]
            ok = [p for p in probes if "error" not in p]
            row = {"probes": probes}
            if len(ok) >= 2:
                a, b = ok[-2], ok[-1]
                row["marginal_mb_per_particle"] = round(
                    (b["peak_growth_mb"] - a["peak_growth_mb"]) / (b["n"] - a["n"]), 3)
            memory[name] = row
            for p in ok:
                case = next(c for c in cases if c["model"] == name and c["n"] == p["n"]
                            and c["approach"] == "engine")
                case["peak_memory_mb"] = round(p["peak_growth_mb"], 1)
                case["peak_memory_mb_per_particle"] = round(p["peak_growth_mb"] / p["n"], 3)
                case["state_mb_per_particle"] = round(p["state_mb"] / p["n"], 3)

    floor = None
    if "mlp" in args.models and not args.only_jax:
        floor = mlp_floor(32, seconds, windows)
        per_step = 3 * flops_check["mlp"]["count_flops_per_example"] * BATCH["mlp"]
        floor["gflops"] = {key: round(per_step * floor[key] / 1e9, 1) for key in (
            "matmuls_only_graph", "matmuls_only_xla", "update_only_xla",
            "floor_particle_steps_per_s")}
        print(f"mlp floor: {floor}", flush=True)
    matmul_end = None if args.only_jax else matmul_gflops(seconds)
    print(f"matmul (end): {matmul_end}", flush=True)
    result = {
        "matmul_gflops": None if args.only_jax else max(matmul_start["best"],
                                                         matmul_end["best"]),
        "cases": cases,
        "ratios": ratios(cases, vs_jax),
        "vs_jax": {"peer": peer_note, "cases": vs_jax,
                   "targets": jax_targets(vs_jax) if vs_jax else None,
                   "definition": JAX_DEFINITION.format(k=args.window_steps,
                                                       rounds=args.jax_rounds,
                                                       seconds=args.jax_seconds)},
        "mlp_floor_n32": floor,
        "memory": {
            "method": "Each engine case is re-run in a fresh subprocess: after importing TF "
                      "and building the data and one model, VmHWM is reset to the current "
                      "RSS (writing 5 to /proc/self/clear_refs), then the population is "
                      "built, initialized, compiled (XLA where xla_friendly) and run for "
                      "5 steps; peak growth = VmHWM after - VmRSS before, so it includes "
                      "XLA compile buffers and step temporaries. "
                      "peak_memory_mb_per_particle = growth / N (fixed costs spread over N); "
                      "marginal_mb_per_particle = slope of the "
                      "growth between the two largest N. state_mb_per_particle = weights, "
                      "slots and step counters. tracemalloc and getrusage deltas miss TF's "
                      "C++ allocations or cannot be reset, hence /proc.",
            **memory},
        "config": {
            "models": list(args.models), "n": ns, "batch": BATCH,
            "seconds_per_measurement": seconds, "windows": windows,
            "reported_rate": "best window (median kept as particle_steps_per_s_median)",
            "wait_quiet_seconds": args.wait_quiet,
            "quick": args.quick, "seed": args.seed, "only_jax": args.only_jax,
            "window_steps": args.window_steps,
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
            "learning_rate": LEARNING_RATE, "momentum": MOMENTUM,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "threads_note": "0 means TF's default (one per core); the same for every "
                            "approach in the run",
            "cpu_count": os.cpu_count(),
            "flops": {"per_example_forward": flops_check,
                      "gflops_formula": "3 x forward FLOPs x batch x particle-steps/s / 1e9",
                      "note": "forward = 2 x multiply-adds of Dense/Conv2D; biases, "
                              "activations and pooling not counted. The exact backward "
                              "skips the first layer's input gradient, so true FLOPs are "
                              "lower than 3x (MLP: 2.15x, CNN: 2.75x)."},
            "matmul": {"start": matmul_start, "end": matmul_end,
                       "definition": "10 chained 1024x1024 float32 tf.matmul per "
                                     "tf.function call, graph and XLA; best of both, "
                                     "higher of start/end"},
            "engine": "keras_es.Population + engine.SGD('lr', momentum='momentum'), "
                      "theta = encode() tiled, tf.function(train_step, "
                      "jit_compile=population.xla_friendly), one shared batch; "
                      "execution='auto' (MLPs vectorized + XLA; CNN stacked without XLA "
                      "with oneDNN on, else vectorized + XLA)",
            "keras_loop": "model.compile(SGD(0.01, momentum=0.9)), train_on_batch(x, y) per "
                          "model (Keras's jit_compile='auto' = no XLA on CPU)",
            "tf_function_loop": "own tf.function per model (no XLA): GradientTape + "
                                "SGD.apply_gradients",
            "data": "one fixed random batch (tf.constant) shared by all approaches",
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                         "python": platform.python_version(),
                         "jax": None if jax is None else jax.__version__},
        },
    }
    result["targets"] = check_targets(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
