"""Tune an RNN's learning rate over horizons of thousands of steps: ES-Single, PES and
truncated ES on the copy task.

The inner problem (`CopyTaskRNN`, a `keras_es.UnrolledSystem`) is training a tanh RNN
with SGD on the copy task: the network reads ``length`` random symbols, waits
``delay`` blank steps, and after a "go" marker must emit the symbols again, so it has
to carry them in its state through the delay. Sequences are generated from the step
keys (no data set). theta is the log of the SGD learning rate; one inner problem is
``horizon`` = 2,000 SGD steps from a fresh initialization, and the meta-objective is
the sum of its per-step training losses. The three estimators see it through windows
of K = 10 steps (200 windows per inner problem) and update theta with Adam after each:

* **ES-Single** keeps one perturbation per pair for a whole inner problem: unbiased,
  with a variance that does not grow with the number of windows;
* **PES** draws a new perturbation every window and credits their running sum:
  unbiased, with a variance that grows with the windows already taken;
* **truncated ES** draws a new perturbation every window and credits only it: it sees
  how the learning rate changes the next ten steps' losses, not how it changes the
  state later windows start from, and is biased (the short-horizon bias).

Each run first holds theta at its start for ``variance_windows`` windows (outer learning
rate 0) and records the estimates: their mean square is each estimator's variance
there (plus the squared gradient, the same for the two unbiased ones). Then it trains.
Afterwards fresh inner problems (common seeds) are trained at a grid of learning rates
(the meta-objective's landscape) and at each run's theta along the way (the meta-loss
curves).

    python examples/rnn_long_unrolls.py --quick --out results/rnn_long_unrolls.json
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
from keras_es.unrolled import UnrolledSystem  # noqa: E402

METHODS = ("es_single", "pes", "truncated_es")
TRUNCATION_LENGTH = 10
#: Per-step losses are capped here (a diverged run counts as this loss), so the
#: meta-objective stays bounded.
LOSS_CAP = 10.0
LEARNING_RATE_RANGE = (3e-3, 1.0)

SETTINGS = {
    # quick: seconds; the same code paths on a tiny problem.
    "quick": dict(symbols=3, length=2, delay=1, hidden=8, batch_size=8, horizon=40,
                  particles=8, windows=12, variance_windows=3, grid=3, eval_seeds=1,
                  checkpoints=2, jit_compile=False),
    # full: about 10 minutes on 2 CPU cores.
    "full": dict(symbols=4, length=5, delay=5, hidden=32, batch_size=32, horizon=2000,
                 particles=32, windows=600, variance_windows=100, grid=12, eval_seeds=4,
                 checkpoints=6, jit_compile=True),
}
DEFAULTS = dict(learning_rate=0.02, init_scale=1.2, sigma=0.1, outer_learning_rate=0.01)


class CopyTaskRNN(UnrolledSystem):
    """SGD training of a tanh RNN on the copy task; theta = [log learning rate].

    Inputs are one-hot over ``symbols`` + 2 (blank, go); a sequence is ``length``
    symbols, ``delay`` blanks and ``length`` go markers, and the loss is the mean
    cross-entropy of the outputs at the go markers against the symbols read (chance:
    ``log(symbols)``), capped at `LOSS_CAP`.

    Args:
        symbols: Alphabet size.
        length: Symbols to copy.
        delay: Blank steps between reading and writing.
        hidden: Recurrent units.
        batch_size: Sequences per minibatch.
        init_scale: The recurrent matrix starts as ``N(0, init_scale^2 / hidden)``.
    """

    def __init__(self, symbols: int, length: int, delay: int, hidden: int, batch_size: int,
                 init_scale: float):
        self.symbols, self.length, self.delay = symbols, length, delay
        self.hidden, self.batch_size, self.init_scale = hidden, batch_size, init_scale
        self.inputs = symbols + 2

    def sequences(self, keys):
        """One minibatch per key: inputs ``[n, batch, steps, inputs]`` and targets
        ``[n, batch, length]``."""
        targets = tf.map_fn(lambda k: tf.random.stateless_uniform(
            [self.batch_size, self.length], k, 0, self.symbols, tf.int32), keys)
        n = tf.shape(keys)[0]
        blank = tf.fill([n, self.batch_size, self.delay], self.symbols)
        go = tf.fill([n, self.batch_size, self.length], self.symbols + 1)
        return tf.one_hot(tf.concat([targets, blank, go], 2), self.inputs), targets

    def init(self, keys):
        def one(key):
            k = tf.random.experimental.stateless_split(key, 3)
            return (tf.random.stateless_normal([self.inputs, self.hidden], k[0])
                    / math.sqrt(self.inputs),
                    tf.random.stateless_normal([self.hidden, self.hidden], k[1])
                    * (self.init_scale / math.sqrt(self.hidden)),
                    tf.random.stateless_normal([self.hidden, self.symbols], k[2])
                    / math.sqrt(self.hidden))

        wx, wh, wo = tf.map_fn(one, keys, fn_output_signature=(tf.float32,) * 3)
        n = tf.shape(keys)[0]
        return {"wx": wx, "wh": wh, "b": tf.zeros([n, self.hidden]), "wo": wo,
                "bo": tf.zeros([n, self.symbols])}

    def losses(self, weights, x, targets):
        """Mean cross-entropy ``[n]`` of every particle's RNN on its minibatch."""
        h = tf.zeros([tf.shape(x)[0], self.batch_size, self.hidden])
        logits = []
        for t in range(2 * self.length + self.delay):
            h = tf.tanh(tf.einsum("nbi,nih->nbh", x[:, :, t], weights["wx"])
                        + tf.einsum("nbh,nhk->nbk", h, weights["wh"]) + weights["b"][:, None])
            if t >= self.length + self.delay:
                logits.append(tf.einsum("nbh,nho->nbo", h, weights["wo"])
                              + weights["bo"][:, None])
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
            targets, tf.stack(logits, 2))
        return tf.reduce_mean(cross_entropy, [1, 2])

    def step(self, state, theta, keys):
        x, targets = self.sequences(keys)
        with tf.GradientTape() as tape:
            tape.watch(state)
            losses = self.losses(state, x, targets)
            total = tf.reduce_sum(losses)
        gradients = tape.gradient(total, state)
        rate = tf.exp(theta[:, 0])
        new = {k: v - tf.reshape(rate, [-1] + [1] * (v.shape.rank - 1)) * gradients[k]
               for k, v in state.items()}
        losses = tf.where(tf.math.is_finite(losses), tf.minimum(losses, LOSS_CAP), LOSS_CAP)
        return new, losses, None


# ---------------------------------------------------------------------- runs
def run_method(method: str, system, config, seed: int):
    """Variance at the start, then meta-training; returns the run's records."""
    estimator = keras_es.ESTIMATORS[method](
        sigma=config["sigma"], truncation_length=TRUNCATION_LENGTH, horizon=config["horizon"])
    start = time.perf_counter()
    trainer = keras_es.MetaTrainer(
        system, estimator, [math.log(config["learning_rate"])], config["particles"],
        outer_optimizer=keras.optimizers.Adam(config["outer_learning_rate"]), seed=seed,
        jit_compile=config["jit_compile"])
    # Theta held still (outer learning rate 0): the estimates' spread at the start.
    trainer.optimizer.learning_rate.assign(0.0)
    held = trainer.train(config["variance_windows"])
    trainer.optimizer.learning_rate.assign(config["outer_learning_rate"])
    history = trainer.train(config["windows"])
    return {"log_learning_rate": history["theta_0"], "window_loss": history["loss"],
            "estimate_mean_square": float(np.mean(np.square(held["gradient_norm"]))),
            "diverged_pairs": int(trainer.state.diverged.numpy()),
            "seconds": time.perf_counter() - start}


def evaluate(system, log_rates, config, seed: int):
    """Mean per-step loss over a whole fresh inner problem at each log learning rate:
    the meta-objective (per step), averaged over ``eval_seeds`` runs that share
    initializations and minibatches across learning rates."""
    rates = np.asarray(log_rates, np.float32).reshape(-1, 1)
    seeds, horizon = config["eval_seeds"], config["horizon"]
    n = len(rates) * seeds
    theta = tf.constant(np.repeat(rates, seeds, axis=0))
    run = np.tile(np.arange(seeds), len(rates))
    keys = tf.constant(np.stack([np.full(n, seed), run], 1).astype(np.int32))

    @tf.function(jit_compile=config["jit_compile"], autograph=False)
    def train():
        def body(t, state, total):
            step_keys = tf.map_fn(lambda k: tf.random.experimental.stateless_fold_in(k, t),
                                  keys)
            state, loss, _ = system.step(state, theta, step_keys)
            return t + 1, state, total + loss

        _, _, total = tf.while_loop(lambda t, *_: t < horizon, body,
                                    (0, system.init(keys), tf.zeros([n])))
        return total / horizon

    return train().numpy().reshape(len(rates), seeds).mean(axis=1)


# ---------------------------------------------------------------------- report
def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    grid = results["landscape"]
    left.plot(grid["learning_rate"], grid["mean_loss"], "k.-", label="fresh runs")
    colors = dict(zip(METHODS, ("C0", "C1", "C3"), strict=True))
    for method, run in results["methods"].items():
        left.plot(run["learning_rate_final"], run["mean_loss_final"], "o", ms=9,
                  color=colors[method], label=f"{method} (final)")
        windows = np.arange(1, len(run["log_learning_rate"]) + 1)
        middle.plot(windows, np.exp(run["log_learning_rate"]), color=colors[method],
                    label=method)
        checkpoints = run["checkpoints"]
        right.plot([c["window"] for c in checkpoints], [c["mean_loss"] for c in checkpoints],
                   "o-", color=colors[method], label=f"{method}: fresh runs")
        loss = np.asarray(run["window_loss"], np.float64)
        width = max(1, len(loss) // 30)
        right.plot(np.arange(width, len(loss) + 1),
                   np.convolve(loss, np.ones(width) / width, mode="valid"),
                   color=colors[method], alpha=0.35, lw=1)
    horizon = results["settings"]["horizon"]
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("SGD learning rate")
    left.set_ylabel(f"mean training loss over {horizon} steps")
    left.set_title("The meta-objective and where each method ends")
    left.legend(fontsize=8)
    middle.set_yscale("log")
    middle.set_xlabel(f"outer step (window of K = {TRUNCATION_LENGTH})")
    middle.set_ylabel("learning rate (theta)")
    middle.set_title(f"theta during meta-training (T = {horizon})")
    middle.legend(fontsize=8)
    right.set_yscale("log")
    right.set_xlabel("outer step")
    right.set_ylabel("meta-loss (mean training loss per step)")
    right.set_title("Meta-loss curves (faint: particles' window losses)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="The short run (seconds).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, else rnn_long_unrolls.png).")
    for name in ("horizon", "particles", "windows", "hidden", "delay"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"Override the setting {name}.")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=value,
                            help=f"Default {value}.")
    args = parser.parse_args(argv)
    for name in ("horizon", "particles", "windows", "hidden", "delay"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name}={value} is invalid; expected a positive integer.")
    if args.particles is not None and args.particles % 2:
        parser.error(f"--particles={args.particles} is invalid; expected an even number "
                     "(antithetic pairs).")
    if args.horizon is not None and args.horizon < TRUNCATION_LENGTH:
        parser.error(f"--horizon={args.horizon} is invalid; expected at least the "
                     f"truncation length, {TRUNCATION_LENGTH}.")
    for name in DEFAULTS:
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; "
                         "expected a positive number.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = dict(SETTINGS["quick" if args.quick else "full"])
    for name in ("horizon", "particles", "windows", "hidden", "delay"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    config.update({name: getattr(args, name) for name in DEFAULTS})
    start = time.perf_counter()
    system = CopyTaskRNN(config["symbols"], config["length"], config["delay"],
                         config["hidden"], config["batch_size"], config["init_scale"])
    runs = {method: run_method(method, system, config, args.seed) for method in METHODS}
    # Fresh inner problems (seed + 1): the grid, then every run's checkpoints.
    grid = np.geomspace(*LEARNING_RATE_RANGE, config["grid"])
    marks = np.linspace(0, config["windows"], config["checkpoints"] + 1).round().astype(int)
    points = [math.log(r) for r in grid] + [math.log(config["learning_rate"])]
    for run in runs.values():
        points += [run["log_learning_rate"][m - 1] for m in marks[1:]]
    scores = evaluate(system, points, config, args.seed + 1).tolist()
    start_loss, i = scores[len(grid)], len(grid) + 1
    for run in runs.values():
        checkpoints = [{"window": 0, "mean_loss": start_loss}]
        for m in marks[1:]:
            checkpoints.append({"window": int(m), "mean_loss": scores[i]})
            i += 1
        run.update(checkpoints=checkpoints, mean_loss_final=checkpoints[-1]["mean_loss"],
                   learning_rate_final=math.exp(run["log_learning_rate"][-1]))
    results = {"quick": bool(args.quick),
               "settings": {**config, "truncation_length": TRUNCATION_LENGTH,
                            "windows_per_inner_problem": config["horizon"] // TRUNCATION_LENGTH},
               "landscape": {"learning_rate": grid.tolist(), "mean_loss": scores[:len(grid)]},
               "landscape_best": {"learning_rate": float(grid[int(np.argmin(scores[:len(grid)]))]),
                                  "mean_loss": float(min(scores[:len(grid)]))},
               "methods": runs, "seconds": time.perf_counter() - start}
    _write(results, args)
    return results


def _write(results, args):
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("rnn_long_unrolls.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, plot_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    best = results["landscape_best"]
    print(f"grid best: learning rate {best['learning_rate']:.4g}, meta-loss "
          f"{best['mean_loss']:.4f}")
    print(f"{'method':<14}{'final lr':>10}{'meta-loss':>11}{'E[g^2] at start':>17}"
          f"{'seconds':>9}")
    for method, run in results["methods"].items():
        print(f"{method:<14}{run['learning_rate_final']:>10.4g}{run['mean_loss_final']:>11.4f}"
              f"{run['estimate_mean_square']:>17.4g}{run['seconds']:>9.0f}")
    print(f"{results['seconds']:.0f} s; plot: {plot_path}")


if __name__ == "__main__":
    main()
