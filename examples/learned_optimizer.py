"""Meta-train a small learned optimizer with ES-Single and PES, and compare it with Adam.

The learned optimizer (the ES-Single paper's learned-optimizer task, at a size that
runs on two CPU cores) is a per-parameter MLP: for every weight of an inner MLP
classifier it reads two features, the gradient and the momentum, both divided by the
root of the second moment (as Adam normalizes them), and outputs the update
``-OUTPUT_SCALE * (MLP(features) - MLP(-features))``. The MLP's weights (2 -> 16 -> 1,
64 of them) are theta;
the inner problem (`LearnedOptimizerSystem`, a `keras_es.UnrolledSystem`) is
training the classifier for ``horizon`` steps from a fresh initialization, and the
meta-objective is the sum of its minibatch training losses. ES-Single and PES estimate
the meta-gradient from truncated windows of K = 10 steps; the outer optimizer is Adam.

Afterwards every optimizer trains fresh classifiers on fresh seeds for the same
horizon: the two learned optimizers, the learned optimizer at its initial theta, and
Adam at each learning rate of a small grid (`AdamSystem`, the same inner problem with
theta = log learning rate). The reported numbers are the mean training loss over the
horizon (the meta-objective), the final training loss and the test accuracy.

By default the data are scikit-learn's bundled 8x8 digits (through `keras_es.datasets`);
``--dataset fashion_mnist`` (or ``mnist``) runs on the real data set through
``tfds.load``.

    python examples/learned_optimizer.py --quick --out results/learned_optimizer.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402
from keras_es import datasets  # noqa: E402
from keras_es.unrolled import UnrolledSystem  # noqa: E402

NUM_CLASSES = 10
#: The learned optimizer's update is -OUTPUT_SCALE * its MLP's output: with features
#: of order one, an output of order one is a step of Adam's size at this learning rate.
OUTPUT_SCALE = 0.01
#: Per-step losses are capped here (a diverged run counts as this loss), so the
#: meta-objective stays bounded.
LOSS_CAP = 10.0
FEATURES = 2
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

SETTINGS = {
    # quick: seconds; the same code paths on a tiny problem.
    "quick": dict(hidden=8, batch_size=16, horizon=40, particles=8, windows=12,
                  optimizer_hidden=4, sigma=0.01, outer_learning_rate=3e-3, eval_seeds=2,
                  adam_grid=(1e-2, 1e-1), jit_compile=False),
    # full: about 8 minutes on 2 CPU cores with the embedded digits.
    "full": dict(hidden=32, batch_size=64, horizon=1000, particles=64, windows=1500,
                 optimizer_hidden=16, sigma=0.01, outer_learning_rate=3e-3, eval_seeds=16,
                 adam_grid=ADAM_GRID, jit_compile=True),
}


# ---------------------------------------------------------------------- inner model
def inner_shapes(input_dim: int, hidden: int) -> list[tuple[int, ...]]:
    """The inner classifier's weights (input -> hidden ReLU -> 10), flattened in order."""
    return [(input_dim, hidden), (hidden,), (hidden, NUM_CLASSES), (NUM_CLASSES,)]


def inner_losses(weights, x, y, input_dim: int, hidden: int):
    """Mean cross-entropy ``[n]`` of ``n`` flat weight vectors ``[n, P]``, each on its
    own minibatch ``x [n, batch, input_dim]``, ``y [n, batch]``."""
    logits = inner_logits(weights, x, input_dim, hidden)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits), 1)


def inner_logits(weights, x, input_dim: int, hidden: int):
    sizes = [math.prod(s) for s in inner_shapes(input_dim, hidden)]
    w1, b1, w2, b2 = tf.split(weights, sizes, axis=1)
    n = tf.shape(weights)[0]
    h = tf.nn.relu(tf.einsum("nbi,nih->nbh", x, tf.reshape(w1, [n, input_dim, hidden]))
                   + b1[:, None])
    return tf.einsum("nbh,nhc->nbc", h, tf.reshape(w2, [n, hidden, NUM_CLASSES])) + b2[:, None]


def _glorot(key, shape):
    limit = math.sqrt(6.0 / sum(shape))
    return tf.random.stateless_uniform(shape, key, -limit, limit)


class InnerTraining(UnrolledSystem):
    """Training the inner MLP with some optimizer: one step is one minibatch update.

    The state of each particle is its flat weights, Adam-style first and second
    moments of the gradient and a step counter; subclasses define `update`. The step's
    loss is the minibatch loss before the update, capped at `LOSS_CAP`.

    Args:
        data: ``(x, y)`` training arrays.
        hidden: Hidden units of the inner MLP.
        batch_size: Minibatch size.
    """

    def __init__(self, data, hidden: int, batch_size: int):
        self.x, self.y = (tf.constant(a) for a in data)
        self.input_dim, self.hidden, self.batch_size = int(self.x.shape[1]), hidden, batch_size
        self.shapes = inner_shapes(self.input_dim, hidden)
        self.num_weights = sum(math.prod(s) for s in self.shapes)

    def init(self, keys):
        def one(key):
            parts = []
            for i, shape in enumerate(self.shapes):
                k = tf.random.experimental.stateless_fold_in(key, i)
                parts.append(tf.reshape(_glorot(k, shape) if len(shape) == 2
                                        else tf.zeros(shape), [-1]))
            return tf.concat(parts, 0)

        weights = tf.map_fn(one, keys, fn_output_signature=tf.float32)
        zeros = tf.zeros_like(weights)
        return {"weights": weights, "m": zeros, "v": zeros,
                "t": tf.zeros([tf.shape(keys)[0]], tf.float32)}

    def step(self, state, theta, keys):
        index = tf.map_fn(lambda k: tf.random.stateless_uniform(
            [self.batch_size], k, 0, tf.shape(self.x)[0], tf.int32), keys)
        x, y = tf.gather(self.x, index), tf.gather(self.y, index)
        weights = state["weights"]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            losses = inner_losses(weights, x, y, self.input_dim, self.hidden)
            total = tf.reduce_sum(losses)
        g = tape.gradient(total, weights)
        t = state["t"] + 1.0
        m = 0.9 * state["m"] + 0.1 * g
        v = 0.999 * state["v"] + 0.001 * tf.square(g)
        m_hat = m / (1.0 - 0.9 ** t)[:, None]
        v_hat = v / (1.0 - 0.999 ** t)[:, None]
        new = {"weights": weights + self.update(theta, g, m_hat, v_hat, weights),
               "m": m, "v": v, "t": t}
        losses = tf.where(tf.math.is_finite(losses), tf.minimum(losses, LOSS_CAP), LOSS_CAP)
        return new, losses, None

    def update(self, theta, g, m_hat, v_hat, weights):
        """The change of the weights ``[n, P]`` given the particles' ``theta``."""
        raise NotImplementedError

    def test_accuracy(self, state, x, y):
        """Accuracy ``[n]`` of every particle's classifier on ``(x, y)``."""
        n = tf.shape(state["weights"])[0]
        x = tf.tile(tf.constant(x)[None], [n, 1, 1])
        logits = inner_logits(state["weights"], x, self.input_dim, self.hidden)
        hit = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.constant(y)[None])
        return tf.reduce_mean(tf.cast(hit, tf.float32), 1)


class LearnedOptimizerSystem(InnerTraining):
    """Inner training whose update rule is a per-parameter MLP with weights theta.

    Features per weight: ``g / (sqrt(v_hat) + 1e-8)`` and ``m_hat / (sqrt(v_hat) + 1e-8)``
    (bounded, whatever the gradients' scale); one hidden ReLU layer of
    ``optimizer_hidden`` units and a linear output without bias. The update is
    ``-OUTPUT_SCALE * (MLP(f) - MLP(-f))``: odd in the features, so a weight whose
    gradients average to zero does not drift (an MLP alone would push every weight by
    its mean output, and its random initialization then diverges). With theta that
    makes this ``c * m_hat / sqrt(v_hat)`` it is Adam at learning rate
    ``c * OUTPUT_SCALE``.

    Args:
        data: ``(x, y)`` training arrays.
        hidden: Hidden units of the inner MLP.
        batch_size: Minibatch size.
        optimizer_hidden: Hidden units of the learned optimizer's MLP.
    """

    def __init__(self, data, hidden: int, batch_size: int, optimizer_hidden: int):
        super().__init__(data, hidden, batch_size)
        self.optimizer_hidden = optimizer_hidden

    @property
    def dim(self) -> int:
        """Number of the learned optimizer's weights (theta's dimension)."""
        return FEATURES * self.optimizer_hidden + 2 * self.optimizer_hidden

    def initial_theta(self, seed: int) -> np.ndarray:
        """Glorot-uniform kernels (the output layer's scaled by 0.1, so the initial
        optimizer takes small steps) and zero biases for the optimizer's MLP."""
        rng, h = np.random.default_rng(seed), self.optimizer_hidden

        def glorot(shape):
            limit = math.sqrt(6.0 / sum(shape))
            return rng.uniform(-limit, limit, shape).ravel()

        return np.concatenate([glorot((FEATURES, h)), np.zeros(h),
                               0.1 * glorot((h, 1))]).astype(np.float32)

    def update(self, theta, g, m_hat, v_hat, weights):
        h = self.optimizer_hidden
        w1, b1, w2 = tf.split(theta, [FEATURES * h, h, h], axis=1)
        w1 = tf.reshape(w1, [-1, FEATURES, h])
        scale = tf.sqrt(v_hat) + 1e-8
        features = tf.stack([g / scale, m_hat / scale], -1)  # [n, P, FEATURES]

        def mlp(f):
            hidden = tf.nn.relu(tf.einsum("npf,nfh->nph", f, w1) + b1[:, None])
            return tf.einsum("nph,nh->np", hidden, w2)

        return -OUTPUT_SCALE * (mlp(features) - mlp(-features))


class AdamSystem(InnerTraining):
    """Inner training with Adam (betas 0.9, 0.999); theta = [log learning rate]."""

    def update(self, theta, g, m_hat, v_hat, weights):
        return -tf.exp(theta[:, :1]) * m_hat / (tf.sqrt(v_hat) + 1e-8)


# ---------------------------------------------------------------------- meta-training
def meta_train(method: str, system, config, seed: int, theta0, checkpoints: int = 5):
    """Meta-trains theta with ``method`` (``"es_single"`` or ``"pes"``).

    Returns the window losses, the theta snapshots at ``checkpoints`` evenly spaced
    outer steps (the last one final) and the run's seconds and diverged pairs.
    """
    estimator = keras_es.ESTIMATORS[method](sigma=config["sigma"], truncation_length=10,
                                            horizon=config["horizon"])
    start = time.perf_counter()
    trainer = keras_es.MetaTrainer(
        system, estimator, theta0, config["particles"],
        outer_optimizer=keras.optimizers.Adam(config["outer_learning_rate"]), seed=seed,
        jit_compile=config["jit_compile"])
    windows = config["windows"]
    marks = set(np.linspace(0, windows, checkpoints + 1).round().astype(int)[1:].tolist())
    snapshots = {}

    def snapshot(logs):
        if logs["outer_step"] in marks:
            snapshots[logs["outer_step"]] = trainer.theta_value

    history = trainer.train(windows, callback=snapshot)
    return {"window_loss": history["loss"], "snapshots": snapshots,
            "diverged_pairs": int(trainer.state.diverged.numpy()),
            "seconds": time.perf_counter() - start}


def evaluate(system: InnerTraining, thetas, config, seed: int, test):
    """Trains fresh classifiers for ``horizon`` steps at each theta (``eval_seeds`` runs
    each; run ``s`` of every theta shares its initialization and minibatches).

    Returns per theta: the mean loss over the horizon (the meta-objective), the final
    loss (mean of the last 10 steps), the test accuracy after training and the loss
    curve (mean over runs, every 10 steps), all averaged over the runs.
    """
    thetas = np.asarray(thetas, np.float32)
    seeds, horizon = config["eval_seeds"], config["horizon"]
    n = len(thetas) * seeds
    theta = tf.constant(np.repeat(thetas, seeds, axis=0))
    run = np.tile(np.arange(seeds), len(thetas))
    keys = tf.constant(np.stack([np.full(n, seed), run], 1).astype(np.int32))

    @tf.function(jit_compile=config["jit_compile"], autograph=False)
    def train():
        def body(t, state, total, curve):
            step_keys = tf.map_fn(lambda k: tf.random.experimental.stateless_fold_in(k, t),
                                  keys)
            state, loss, _ = system.step(state, theta, step_keys)
            return t + 1, state, total + loss, curve.write(t, loss)

        _, state, total, curve = tf.while_loop(
            lambda t, *_: t < horizon, body,
            (0, system.init(keys), tf.zeros([n]), tf.TensorArray(tf.float32, horizon)))
        return state, total / horizon, curve.stack()

    state, mean, curve = train()
    accuracy = system.test_accuracy(state, *test).numpy()
    curve = curve.numpy().reshape(horizon, len(thetas), seeds).mean(axis=2)

    def per_theta(values):
        return np.asarray(values).reshape(len(thetas), seeds).mean(axis=1)

    tail = curve[-10:].mean(axis=0)
    return [{"mean_loss": float(a), "final_loss": float(b), "test_accuracy": float(c),
             "loss_curve": curve[::10, i].tolist()}
            for i, (a, b, c) in enumerate(zip(per_theta(mean.numpy()), tail,
                                              per_theta(accuracy), strict=True))]


# ---------------------------------------------------------------------- report
def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"es_single": "C0", "pes": "C1"}
    for method, run in results["meta_training"].items():
        loss = np.asarray(run["window_loss"], np.float64)
        width = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        left.plot(np.arange(width, len(loss) + 1), smooth, color=colors[method],
                  label=f"{method}: window loss (moving mean)")
        steps = [int(s) for s in run["checkpoints"]]
        left.plot(steps, [run["checkpoints"][str(s)] for s in steps], "o",
                  color=colors[method], label=f"{method}: fresh runs at checkpoints")
    left.set_yscale("log")
    left.set_xlabel("outer step (window of K = 10)")
    left.set_ylabel("mean training loss over the horizon")
    left.set_title("Meta-training the learned optimizer")
    left.legend(fontsize=8)
    horizon = results["settings"]["horizon"]
    for name, row in results["evaluation"].items():
        curve = row["loss_curve"]
        steps = np.arange(len(curve)) * 10 + 1
        if name.startswith("adam") and name != results["adam_best"]:
            right.plot(steps, curve, color="0.75", lw=0.8)
            continue
        right.plot(steps, curve, label=f"{name}: {row['mean_loss']:.3f}",
                   lw=2 if name.startswith("learned") else 1.2)
    right.set_yscale("log")
    right.set_xlabel(f"inner step (horizon {horizon})")
    right.set_ylabel("training loss (mean over fresh runs)")
    right.set_title(f"Fresh runs on {results['dataset']} (grey: other Adam rates)")
    right.legend(fontsize=8, title="mean loss over the horizon", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits",
                        help="'digits' (embedded, offline; default) or a TFDS name such as "
                             "'fashion_mnist' or 'mnist'.")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory.")
    parser.add_argument("--quick", action="store_true", help="The short run (seconds).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, else learned_optimizer.png).")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="Use at most this many training examples.")
    parser.add_argument("--sigma", type=float, default=None,
                        help="Override the perturbation scale (default 0.01).")
    for name in ("horizon", "particles", "windows", "eval-seeds"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"Override the setting {name.replace('-', '_')}.")
    args = parser.parse_args(argv)
    for name in ("max_examples", "horizon", "particles", "windows", "eval_seeds"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}={value} is invalid; expected a "
                         "positive integer.")
    if args.particles is not None and args.particles % 2:
        parser.error(f"--particles={args.particles} is invalid; expected an even number "
                     "(antithetic pairs).")
    if args.horizon is not None and args.horizon < 10:
        parser.error(f"--horizon={args.horizon} is invalid; expected at least the "
                     "truncation length, 10.")
    if args.sigma is not None and not args.sigma > 0:
        parser.error(f"--sigma={args.sigma} is invalid; expected a positive float.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = dict(SETTINGS["quick" if args.quick else "full"])
    for name in ("horizon", "particles", "windows", "eval_seeds", "sigma"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    start = time.perf_counter()
    data = datasets.load(args.dataset, "train", args.data_dir, args.max_examples)
    test = datasets.load(args.dataset, "test", args.data_dir)
    system = LearnedOptimizerSystem(data, config["hidden"], config["batch_size"],
                                    config["optimizer_hidden"])
    theta0 = system.initial_theta(args.seed)
    runs = {m: meta_train(m, system, config, args.seed, theta0) for m in ("es_single", "pes")}
    # Fresh runs (seed + 1): the learned optimizers, their checkpoints, the initial one.
    named = {"learned (es_single)": runs["es_single"]["snapshots"][config["windows"]],
             "learned (pes)": runs["pes"]["snapshots"][config["windows"]],
             "learned, initial theta": theta0}
    points = list(named.values()) + [t for r in runs.values() for t in r["snapshots"].values()]
    scores = evaluate(system, points, config, args.seed + 1, test)
    adam_scores = evaluate(AdamSystem(data, config["hidden"], config["batch_size"]),
                           [[math.log(lr)] for lr in config["adam_grid"]], config,
                           args.seed + 1, test)
    evaluation = dict(zip(named, scores, strict=False))
    evaluation.update({f"adam lr={lr:g}": s for lr, s in zip(config["adam_grid"],
                                                             adam_scores, strict=True)})
    adam_best = min((k for k in evaluation if k.startswith("adam")),
                    key=lambda k: evaluation[k]["mean_loss"])
    meta_training, i = {}, len(named)
    for method, run in runs.items():
        marks = sorted(run["snapshots"])
        meta_training[method] = {
            "window_loss": run["window_loss"], "seconds": run["seconds"],
            "diverged_pairs": run["diverged_pairs"],
            "checkpoints": {str(s): scores[i + j]["mean_loss"] for j, s in enumerate(marks)},
            "theta_final": run["snapshots"][config["windows"]].tolist()}
        i += len(marks)
    results = {"dataset": args.dataset, "quick": bool(args.quick),
               "settings": {**config, "truncation_length": 10, "theta_dim": system.dim,
                            "inner_weights": system.num_weights},
               "meta_training": meta_training, "evaluation": evaluation,
               "adam_best": adam_best, "seconds": time.perf_counter() - start}
    _write(results, args)
    return results


def _write(results, args):
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("learned_optimizer.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, plot_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"theta: {results['settings']['theta_dim']} weights; horizon "
          f"{results['settings']['horizon']}, {results['dataset']}")
    print(f"{'optimizer':<26}{'mean loss':>10}{'final loss':>11}{'test acc':>9}")
    for name, row in results["evaluation"].items():
        mark = "  <- best Adam" if name == results["adam_best"] else ""
        print(f"{name:<26}{row['mean_loss']:>10.4f}{row['final_loss']:>11.4f}"
              f"{row['test_accuracy']:>9.3f}{mark}")
    print(f"{results['seconds']:.0f} s; plot: {plot_path}")


if __name__ == "__main__":
    main()
