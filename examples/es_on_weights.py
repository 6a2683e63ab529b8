"""Antithetic ES directly on a classifier's weights, with counter-regenerated noise.

An MLP classifier (inputs -> ``hidden`` ReLU units -> 10 classes; ``P`` weights in one
vector ``w``) is trained without a single backpropagated gradient: each update draws
``pairs`` perturbations ``eps_p ~ N(0, sigma^2 I_P)``, evaluates the minibatch loss at
``w + eps_p`` and ``w - eps_p`` (the twins of a pair share their minibatch) and applies

    g = 1 / (2 sigma^2 pairs) * sum_p (l(w + eps_p) - l(w - eps_p)) eps_p

with Adam, exactly keras_es's `keras_es.full_es` estimate with a horizon of one step.
No ``N x P`` noise matrix is ever stored: ``eps_p`` is a pure function of integers,
``keras_es.noise.pair_seeds(seed, STREAM_PERTURBATION, p, update)``, so `CounterES`
generates the noise a chunk of pairs at a time, keeps only their loss differences
(``pairs`` floats), and regenerates the same noise from the same counters to form
``g``. Memory is ``O(chunk x P)`` instead of ``O(N x P)``; that is also the protocol
that lets distributed ES workers exchange only scalars.

Why not `keras_es.MetaTrainer` with ``theta = w``: it fits mathematically (the script
runs it for comparison and checks that both make the same update), but keras_es's
estimators are built for *online* estimates over many windows, so each pair keeps its
noise, score and accumulator as state (``[pairs, P]`` each) and the particles' weights
``[N, P]``: about ``2.5 N P`` floats, which the memory table below measures. The ES
math lives in one place, `CounterES.gradient`; the library path is
`library_trainer`.

The script reports

* test accuracy against function evaluations (minibatch losses computed) for ES and
  for SGD on the same model (one evaluation per SGD step, whose backward pass costs
  about two more);
* for a few widths (``P`` from ~10^4 to ~10^5), the time per ES update and the memory
  it takes (the noise's tensor bytes, and the peak resident memory measured while
  updating) for the counter-based update and the library's stored-noise update.

Data: scikit-learn's bundled 8x8 digits through `keras_es.datasets` by default;
``--dataset mnist`` runs on MNIST through ``tfds.load``.

    python examples/es_on_weights.py --quick --out results/es_on_weights.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import pathlib
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402
from keras_es import datasets  # noqa: E402
from keras_es import noise as noise_lib  # noqa: E402
from keras_es.unrolled import UnrolledSystem  # noqa: E402

NUM_CLASSES = 10
#: Test accuracies at which the evaluations ES and SGD needed are reported.
ACCURACY_TARGETS = (0.9, 0.95, 0.98)

SETTINGS = {
    # quick: a few seconds; the same code paths on a tiny network.
    "quick": dict(hidden=16, particles=20, chunk=5, updates=40, batch_size=64, sigma=0.05,
                  learning_rate=0.03, sgd_steps=200, sgd_learning_rate=0.1, evaluations=5,
                  widths=(16, 64), timing_updates=2),
    # full: about 6 minutes on 2 CPU cores with the embedded digits.
    "full": dict(hidden=256, particles=100, chunk=10, updates=1000, batch_size=256,
                 sigma=0.05, learning_rate=0.01, sgd_steps=3000, sgd_learning_rate=0.1,
                 evaluations=20, widths=(128, 256, 512, 1024, 2048), timing_updates=7),
}


# ---------------------------------------------------------------------- the model
def layer_shapes(input_dim: int, hidden: int) -> list[tuple[int, ...]]:
    """Shapes of the MLP's weights, in the order they lie in the vector ``w``."""
    return [(input_dim, hidden), (hidden,), (hidden, NUM_CLASSES), (NUM_CLASSES,)]


def num_weights(input_dim: int, hidden: int) -> int:
    return sum(math.prod(s) for s in layer_shapes(input_dim, hidden))


def initial_weights(input_dim: int, hidden: int, seed: int) -> np.ndarray:
    """Glorot-uniform kernels and zero biases, flattened into one float32 vector."""
    rng = np.random.default_rng(seed)
    parts = []
    for shape in layer_shapes(input_dim, hidden):
        if len(shape) == 2:
            limit = math.sqrt(6.0 / sum(shape))
            parts.append(rng.uniform(-limit, limit, shape).ravel())
        else:
            parts.append(np.zeros(shape))
    return np.concatenate(parts).astype(np.float32)


def batch_losses(weights, x, y, input_dim: int, hidden: int):
    """Mean cross-entropy of ``n`` weight vectors, each on its own minibatch.

    Args:
        weights: float32 ``[n, P]``.
        x: float32 ``[n, batch, input_dim]``.
        y: int32 ``[n, batch]``.
    """
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        y, _logits(weights, x, input_dim, hidden)), axis=1)


def _logits(weights, x, input_dim, hidden):
    sizes = [math.prod(s) for s in layer_shapes(input_dim, hidden)]
    w1, b1, w2, b2 = tf.split(weights, sizes, axis=1)
    n = tf.shape(weights)[0]
    h = tf.nn.relu(tf.einsum("nbi,nih->nbh", x, tf.reshape(w1, [n, input_dim, hidden]))
                   + b1[:, None])
    return tf.einsum("nbh,nhc->nbc", h, tf.reshape(w2, [n, hidden, NUM_CLASSES])) + b2[:, None]


def accuracy(w, x, y, input_dim: int, hidden: int) -> float:
    logits = _logits(tf.constant(w)[None], tf.constant(x)[None], input_dim, hidden)[0]
    return float(np.mean(np.argmax(logits.numpy(), axis=1) == y))


def minibatches(x, y, keys, batch_size: int):
    """One minibatch per key (``keys`` int32 ``[n, 2]``): ``[n, batch, ...]``."""
    index = tf.map_fn(lambda k: tf.random.stateless_uniform(
        [batch_size], k, 0, tf.shape(x)[0], tf.int32), keys)
    return tf.gather(x, index), tf.gather(y, index)


# ---------------------------------------------------------------------- the ES update
class CounterES:
    """Antithetic ES on a weight vector whose noise is regenerated from counters.

    Pair ``p`` of update ``u`` perturbs with ``sigma * z``, ``z`` the standard normal
    row of ``keras_es.noise.pair_seeds(seed, STREAM_PERTURBATION, p, u)``, and draws its
    minibatch from ``pair_seeds(seed, STREAM_STEP, p, u)``: the same integers keras_es's
    estimators use, so `gradient` equals `keras_es.full_es`'s estimate on a one-step
    system (without its outlier clipping). At most ``chunk`` noise rows exist at once.

    Args:
        data: ``(x, y)`` training arrays.
        hidden: Hidden units of the MLP.
        num_pairs: Antithetic pairs per update (N / 2).
        sigma: Perturbation scale.
        chunk: Pairs evaluated together (a divisor of ``num_pairs``).
        batch_size: Minibatch size of each pair.
        seed: The run's integer seed.
    """

    def __init__(self, data, hidden: int, num_pairs: int, sigma: float, chunk: int,
                 batch_size: int, seed: int):
        for name, value in (("num_pairs", num_pairs), ("chunk", chunk),
                            ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid; expected a positive int.")
        if num_pairs % chunk:
            raise ValueError(f"chunk={chunk!r} is invalid; expected a divisor of "
                             f"num_pairs={num_pairs}.")
        if not sigma > 0:
            raise ValueError(f"sigma={sigma!r} is invalid; expected a positive float.")
        self.x, self.y = (tf.constant(a) for a in data)
        self.input_dim, self.hidden = int(self.x.shape[1]), hidden
        self.dim = num_weights(self.input_dim, hidden)
        self.num_pairs, self.sigma, self.chunk = num_pairs, float(sigma), chunk
        self.batch_size, self.seed = batch_size, seed
        self.gradient = tf.function(self._gradient, autograph=False)

    def noise(self, first_pair, update):
        """``sigma * z`` of pairs ``first_pair .. first_pair + chunk - 1``: ``[chunk, P]``."""
        pairs = first_pair + tf.range(self.chunk)
        seeds = noise_lib.pair_seeds(self.seed, noise_lib.STREAM_PERTURBATION, pairs, update)
        return self.sigma * noise_lib.normal_rows(seeds, self.dim)

    def differences(self, w, first_pair, update):
        """``l(w + eps_p) - l(w - eps_p)`` and the twins' mean loss, for one chunk."""
        eps = self.noise(first_pair, update)
        pairs = first_pair + tf.range(self.chunk)
        keys = noise_lib.pair_seeds(self.seed, noise_lib.STREAM_STEP, pairs, update)
        x, y = minibatches(self.x, self.y, tf.repeat(keys, 2, axis=0), self.batch_size)
        # Rows 2p and 2p + 1: the + and - twins of pair p, on one minibatch.
        twins = tf.reshape(tf.stack([w + eps, w - eps], 1), [2 * self.chunk, self.dim])
        losses = batch_losses(twins, x, y, self.input_dim, self.hidden)
        return losses[0::2] - losses[1::2], tf.reduce_mean(losses)

    def _gradient(self, w, update):
        """The ES estimate at ``w`` for update ``update``: ``(g [P], mean loss)``."""
        chunks = self.num_pairs // self.chunk
        # Pass 1: losses only; every chunk's noise is dropped after use.
        # parallel_iterations=1: one chunk's noise in memory at a time.
        _, diffs, loss = tf.while_loop(
            lambda i, *_: i < chunks,
            lambda i, diffs, loss: self._first_pass(w, update, i, diffs, loss),
            (0, tf.TensorArray(tf.float32, chunks), 0.0), parallel_iterations=1)
        diffs = diffs.stack()
        # Pass 2: the same noise again from the same counters, weighted by the
        # differences. (A rank transform or any other use of all the differences
        # together, or workers that exchange only losses, fit between the passes.)

        def accumulate(i, g):
            return i + 1, g + tf.linalg.matvec(self.noise(i * self.chunk, update), diffs[i],
                                               transpose_a=True)

        _, g = tf.while_loop(lambda i, _: i < chunks, accumulate,
                             (0, tf.zeros([self.dim])), parallel_iterations=1)
        return g / (2.0 * self.sigma ** 2 * self.num_pairs), loss / chunks

    def _first_pass(self, w, update, i, diffs, loss):
        d, mean = self.differences(w, i * self.chunk, update)
        return i + 1, diffs.write(i, d), loss + mean


class WeightsSystem(UnrolledSystem):
    """A one-step inner problem whose hyperparameters ``theta`` are the weights: the
    minibatch loss at ``theta`` (for `keras_es.MetaTrainer` with `keras_es.full_es`)."""

    def __init__(self, data, hidden: int, batch_size: int):
        self.x, self.y = (tf.constant(a) for a in data)
        self.input_dim, self.hidden, self.batch_size = int(self.x.shape[1]), hidden, batch_size

    def init(self, keys):
        return tf.zeros([tf.shape(keys)[0], 1])  # stateless: nothing carries over

    def step(self, state, theta, keys):
        x, y = minibatches(self.x, self.y, keys, self.batch_size)
        return state, batch_losses(theta, x, y, self.input_dim, self.hidden), None


def library_trainer(data, hidden, num_particles, sigma, batch_size, seed, initial,
                    optimizer):
    """The same ES through keras_es's own machinery: `MetaTrainer` + `keras_es.full_es`
    (horizon 1) with theta = the weights; it stores every pair's noise."""
    return keras_es.MetaTrainer(
        WeightsSystem(data, hidden, batch_size),
        keras_es.full_es(sigma, horizon=1, clip_outliers=None), initial, num_particles,
        outer_optimizer=optimizer, seed=seed)


# ---------------------------------------------------------------------- training runs
def train_es(data, test, config, seed, initial):
    """ES from ``initial``; test accuracy at ``config['evaluations']`` checkpoints."""
    es = CounterES(data, config["hidden"], config["particles"] // 2, config["sigma"],
                   config["chunk"], config["batch_size"], seed)
    w = keras.Variable(initial)
    optimizer = keras.optimizers.Adam(config["learning_rate"])
    optimizer.build([w])

    @tf.function(autograph=False)
    def update(u):
        g, loss = es.gradient(tf.convert_to_tensor(w), u)
        optimizer.apply([g], [w])
        return loss

    checkpoints = set(np.unique(np.geomspace(1, config["updates"], config["evaluations"])
                                .round().astype(int)))
    curve, start = [], time.perf_counter()
    for u in range(config["updates"]):
        loss = float(update(tf.constant(u)))
        if u + 1 in checkpoints:
            curve.append({"updates": u + 1, "evaluations": (u + 1) * config["particles"],
                          "train_loss": loss,
                          "test_accuracy": accuracy(w.numpy(), *test, es.input_dim,
                                                    config["hidden"])})
    return curve, time.perf_counter() - start


def train_sgd(data, test, config, seed, initial):
    """Plain minibatch SGD on the same model and data; one evaluation per step."""
    x, y = (tf.constant(a) for a in data)
    input_dim, hidden = int(x.shape[1]), config["hidden"]
    w = tf.Variable(initial)
    rate = config["sgd_learning_rate"]

    @tf.function(autograph=False)
    def step(t):
        key = noise_lib.pair_seeds(seed, noise_lib.STREAM_STEP, tf.zeros([1], tf.int32), t)
        xb, yb = minibatches(x, y, key, config["batch_size"])
        with tf.GradientTape() as tape:
            loss = batch_losses(w[None], xb, yb, input_dim, hidden)[0]
        w.assign_sub(rate * tape.gradient(loss, w))
        return loss

    checkpoints = set(np.unique(np.geomspace(1, config["sgd_steps"], config["evaluations"])
                                .round().astype(int)))
    curve, start = [], time.perf_counter()
    for t in range(config["sgd_steps"]):
        loss = float(step(tf.constant(t)))
        if t + 1 in checkpoints:
            curve.append({"steps": t + 1, "evaluations": t + 1, "train_loss": loss,
                          "test_accuracy": accuracy(w.numpy(), *test, input_dim, hidden)})
    return curve, time.perf_counter() - start


# ---------------------------------------------------------------------- time and memory
class PeakMemory:
    """Peak resident memory (bytes) above the level at entry, sampled by a thread every
    half millisecond (Linux: ``/proc/self/statm``; ``increase`` is None elsewhere)."""

    def __enter__(self):
        self.base = self.peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, _resident_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.increase = None if self.base < 0 else max(self.peak - self.base, 0)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return -1


def _malloc_mmap_threshold(size: int) -> None:
    """Sets glibc's mmap threshold (no-op elsewhere): allocations above it are mapped and
    returned to the system when freed, so resident memory follows live tensors."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def measure_width(data, hidden, config, seed, agreement_updates=2):
    """Seconds per update and memory of the counter-based and the stored-noise update.

    Both apply their estimates with plain SGD here, so the weights they reach after
    ``agreement_updates`` updates from the same start differ exactly as the estimates
    do: ``relative_difference`` is the largest difference over the largest change (the
    same estimate up to float rounding gives ~1e-6). (Adam's first steps are
    ``lr * sign(g)`` and would blow a rounding difference in a tiny coordinate up to a
    whole step.)"""
    input_dim = data[0].shape[1]
    dim, n, k = num_weights(input_dim, hidden), config["particles"], config["timing_updates"]
    initial = initial_weights(input_dim, hidden, seed)
    es = CounterES(data, hidden, n // 2, config["sigma"], config["chunk"],
                   config["batch_size"], seed)
    w = keras.Variable(initial)
    optimizer = keras.optimizers.SGD(config["learning_rate"])
    optimizer.build([w])
    update = tf.function(lambda u: optimizer.apply([es.gradient(w.value, u)[0]], [w]),
                         autograph=False)
    trainer = library_trainer(data, hidden, n, config["sigma"], config["batch_size"], seed,
                              initial, keras.optimizers.SGD(config["learning_rate"]))
    for u in range(agreement_updates):  # the first call of each traces it
        update(tf.constant(u))
        trainer.step()
    difference = float(np.max(np.abs(w.numpy() - trainer.theta_value))
                       / np.max(np.abs(w.numpy() - initial)))
    runs = {"counter": lambda u: update(tf.constant(agreement_updates + u)),
            "library": lambda u: trainer.step()}
    # Memory one method at a time; time interleaved, so that other jobs on the machine
    # slow both alike.
    row = {name: {"peak_rss_increase_bytes": _peak_increase(run, 2)}
           for name, run in runs.items()}
    times = {name: [] for name in runs}
    for u in range(2, 2 + k):
        for name, run in runs.items():
            start = time.perf_counter()
            run(u)
            times[name].append(time.perf_counter() - start)
    stored = sum(int(np.prod(t.shape)) * 4 for t in tf.nest.flatten(
        trainer.state.perturbation))
    row["counter"]["noise_bytes"] = 3 * config["chunk"] * dim * 4
    row["library"]["noise_bytes"] = stored + n * dim * 4
    for name in runs:
        row[name]["seconds_per_update"] = float(np.median(times[name]))
    return {"hidden": hidden, "weights": dim, "relative_difference": difference, **row}


def _peak_increase(run, k):
    with PeakMemory() as memory:
        for u in range(k):
            run(u)
    return memory.increase


def measure_scaling(data, config, seed):
    """`measure_width` at every width of ``config["widths"]``."""
    _malloc_mmap_threshold(1 << 16)
    try:
        return [measure_width(data, hidden, config, seed) for hidden in config["widths"]]
    finally:
        _malloc_mmap_threshold(128 << 10)  # glibc's initial value


# ---------------------------------------------------------------------- report
def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4.2))
    for name, style in (("es", "o-"), ("sgd", "s-")):
        curve = results[name]["curve"]
        left.plot([c["evaluations"] for c in curve], [c["test_accuracy"] for c in curve],
                  style, ms=3, label=name.upper())
    left.set_xscale("log")
    left.set_xlabel("function evaluations (minibatch losses)")
    left.set_ylabel(f"test accuracy ({results['dataset']})")
    left.set_title(f"ES on {results['weights']:,} weights against SGD")
    left.legend()
    rows = results["scaling"]
    p = [r["weights"] for r in rows]
    labels = {"counter": "noise from counters", "library": "stored noise (MetaTrainer)"}
    for name, color in (("counter", "C0"), ("library", "C3")):
        middle.plot(p, [r[name]["seconds_per_update"] for r in rows], "o-", color=color,
                    label=labels[name])
        mem = [r[name]["peak_rss_increase_bytes"] for r in rows]
        if None not in mem:
            right.plot(p, [max(m, 1) / 2**20 for m in mem], "o-", color=color,
                       label=f"{labels[name]}: peak RSS increase")
        right.plot(p, [r[name]["noise_bytes"] / 2**20 for r in rows], ":", color=color,
                   label=f"{labels[name]}: noise-sized tensors")
    n = results["settings"]["particles"]
    for axis, label in ((middle, "seconds per update"), (right, "MiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("weights P")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    middle.set_title(f"Time of one update, N = {n}")
    right.set_title(f"Memory of one update, N = {n}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits",
                        help="'digits' (embedded, offline; default) or a TFDS name such as "
                             "'mnist'.")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory.")
    parser.add_argument("--quick", action="store_true", help="The short run (seconds).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, else es_on_weights.png).")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="Use at most this many training examples.")
    for name in ("hidden", "particles", "updates", "sgd-steps"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"Override the setting {name.replace('-', '_')}.")
    parser.add_argument("--widths", type=_widths, default=None,
                        help="Hidden widths of the time and memory table, e.g. 128,512.")
    args = parser.parse_args(argv)
    for name in ("max_examples", "hidden", "particles", "updates", "sgd_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}={value} is invalid; expected a "
                         "positive integer.")
    if args.particles is not None and args.particles % 2:
        parser.error(f"--particles={args.particles} is invalid; expected an even number "
                     "(antithetic pairs).")
    return args


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; expected positive integers separated by commas.")
    return tuple(sorted(widths))


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = dict(SETTINGS["quick" if args.quick else "full"])
    for name in ("hidden", "particles", "updates", "sgd_steps", "widths"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    if (config["particles"] // 2) % config["chunk"]:
        config["chunk"] = math.gcd(config["particles"] // 2, config["chunk"])
    start = time.perf_counter()
    data = datasets.load(args.dataset, "train", args.data_dir, args.max_examples)
    test = datasets.load(args.dataset, "test", args.data_dir)
    input_dim = data[0].shape[1]
    initial = initial_weights(input_dim, config["hidden"], args.seed)
    es_curve, es_seconds = train_es(data, test, config, args.seed, initial)
    sgd_curve, sgd_seconds = train_sgd(data, test, config, args.seed, initial)
    results = {
        "dataset": args.dataset, "quick": bool(args.quick), "settings": config,
        "weights": num_weights(input_dim, config["hidden"]),
        "es": {"curve": es_curve, "seconds": es_seconds,
               "final_test_accuracy": es_curve[-1]["test_accuracy"]},
        "sgd": {"curve": sgd_curve, "seconds": sgd_seconds,
                "final_test_accuracy": sgd_curve[-1]["test_accuracy"]},
        "scaling": measure_scaling(data, config, args.seed),
    }
    results["evaluations_to_reach"] = {
        str(target): {name: next((c["evaluations"] for c in results[name]["curve"]
                                  if c["test_accuracy"] >= target), None)
                      for name in ("es", "sgd")} for target in ACCURACY_TARGETS}
    results["seconds"] = time.perf_counter() - start
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("es_on_weights.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, plot_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    _print(results, plot_path)
    return results


def _print(results, plot_path):
    print(f"P = {results['weights']:,} weights, {results['dataset']}: test accuracy ES "
          f"{results['es']['final_test_accuracy']:.3f} after "
          f"{results['es']['curve'][-1]['evaluations']:,} evaluations, SGD "
          f"{results['sgd']['final_test_accuracy']:.3f} after "
          f"{results['sgd']['curve'][-1]['evaluations']:,}")
    print("counter-based vs keras_es full_es, 2 SGD updates: largest relative difference "
          f"{max(r['relative_difference'] for r in results['scaling']):.2e}")
    for target, row in results["evaluations_to_reach"].items():
        print(f"test accuracy {target}: ES after {row['es']} evaluations, SGD after "
              f"{row['sgd']} (first checkpoint at or above it)")
    print(f"{'P':>9}{'counter s/upd':>15}{'library s/upd':>15}{'counter RSS+':>14}"
          f"{'library RSS+':>14}")
    for r in results["scaling"]:
        c, lib = r["counter"], r["library"]
        print(f"{r['weights']:>9,}{c['seconds_per_update']:>15.4f}"
              f"{lib['seconds_per_update']:>15.4f}{_mib(c['peak_rss_increase_bytes']):>14}"
              f"{_mib(lib['peak_rss_increase_bytes']):>14}")
    print(f"{results['seconds']:.0f} s; plot: {plot_path}")


def _mib(value):
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
