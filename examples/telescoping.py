"""Target the final training loss online with telescoping sums, against the sum of losses.

The ES-Single paper's telescoping experiment (Fig. 8): meta-train a learning-rate
schedule so that the *final* training loss of an inner problem is low, with
truncated unrolls, by crediting the differences ``F_j - F_{j-1}`` of the meta-loss at
window ends (they telescope to ``F_T``), and compare with the usual meta-objective,
the sum of the training losses over the inner problem.

The task is that of ``examples/mnist_lr_schedule.py`` (its model, schedule and search
space are imported from it): an MLP (2 x 100 ReLU) trained with SGD (momentum 0.9) and
``lr_t = lr0 / (1 + t / tau) ** decay`` (tau = T / 10) for T steps, ``lr0`` and
``decay`` tuned in log space from lr0 = 0.01, decay = 1. ES-Single (K = 10,
sigma = 0.2, outer Adam 0.1 with a moving average of theta) runs three times:

* ``sum``: ``meta_objective="sum"``, the training minibatch losses of every step;
* ``final_episode_end``: ``meta_objective="final"``, the loss at the end of the inner
  problem on a batch of 1000 training examples drawn once per inner problem, the
  telescoped sum credited once, when an inner problem ends (``telescope=False``);
* ``final_telescoped``: the same objective, its telescoped terms credited at every
  window end (``telescope=True``).

Then a grid of schedules is trained (one compiled `keras_es.Population` run; every
grid point on the same seeds), scoring both objectives at each point: the mean
training loss over the run (the "sum" objective / T) and the final training loss on
the whole training set. The learned schedules, the initial one and each objective's
best grid points are re-scored on fresh seeds.

By default the data are scikit-learn's bundled 8x8 digits through a TFDS builder
(offline); ``--dataset mnist`` or ``fashion_mnist`` runs on the real data set (the
paper's is FashionMNIST).

    python examples/telescoping.py --quick --out results/telescoping.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402
from keras_es import datasets  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mnist_lr_schedule as task  # noqa: E402  (the schedule task: model, space, optimizer)

METHODS = {  # name: (meta_objective, telescope)
    "sum": ("sum", True),
    "final_episode_end": ("final", False),
    "final_telescoped": ("final", True),
}
K, SIGMA, META_BATCH = 10, 0.2, 1000
SETTINGS = {
    # jit: XLA costs ~40 s of compilation per ES run on 2 CPU cores and pays off after
    # a few hundred windows.
    "quick": dict(horizon=100, particles=16, windows=150, grid=5, grid_seeds=2,
                  eval_seeds=8, top=1, jit=0),
    "full": dict(horizon=300, particles=32, windows=600, grid=8, grid_seeds=4,
                 eval_seeds=32, top=3, jit=1),
}
LOSS_CAP = 10.0  # a diverged run scores the untrained model's loss, log(10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits",
                        help="'digits' (embedded, offline; default) or a TFDS name such as "
                             "'mnist' or 'fashion_mnist'.")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory.")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="Use at most this many training examples.")
    parser.add_argument("--quick", action="store_true", help="The short run.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--no-stagger", action="store_true",
                        help="Start every pair's inner problem at step 0 (default: starts "
                             "staggered over the horizon and burned in).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, else telescoping.png).")
    for name in SETTINGS["full"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"Override the setting {name}.")
    args = parser.parse_args(argv)
    config = dict(SETTINGS["quick" if args.quick else "full"])
    for name in list(config) + ["max_examples"]:
        value = getattr(args, name)
        if value is not None and (value not in (0, 1) if name == "jit" else value < 1):
            expected = "0 or 1" if name == "jit" else "a positive integer"
            parser.error(f"--{name.replace('_', '-')}={value} is invalid; expected "
                         f"{expected}.")
        if value is not None and name in config:
            config[name] = value
    config["stagger"] = not args.no_stagger
    if config["particles"] % 2:
        parser.error(f"--particles={config['particles']} is invalid; expected an even "
                     "number (antithetic pairs).")
    if config["horizon"] < K or config["horizon"] % K:
        parser.error(f"--horizon={config['horizon']} is invalid; expected a multiple of the "
                     f"truncation length, {K}.")
    return args, config


# ---------------------------------------------------------------------- meta-training
def meta_train(data, method: str, config: dict, seed: int) -> dict:
    """One ES-Single run; theta's trajectory (log lr0, log decay) and the learned values."""
    x, y = data
    horizon, particles = config["horizon"], config["particles"]
    objective, telescope = METHODS[method]
    population = keras_es.Population(task.build_model(x.shape[1]), particles, task.SPACE,
                                     task.LOSS, task.schedule_optimizer(horizon))
    system = keras_es.KerasSystem(population, train_data=(x, y), batch_size=32,
                                  meta_batch_size=min(META_BATCH, len(x)))
    estimator = keras_es.es_single(SIGMA, K, horizon=horizon, objective=objective,
                                   telescope=telescope, stagger=config["stagger"])
    trainer = keras_es.MetaTrainer(
        system, estimator, task.SPACE, particles,
        outer_optimizer=keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.99),
        seed=seed, jit_compile=bool(config["jit"]))
    start = time.perf_counter()
    history = trainer.train(config["windows"])
    trainer.finalize()  # theta: the moving average of its last ~100 windows
    trajectory = np.log(np.stack([history["lr0"], history["decay"]], 1))
    theta = trainer.theta_value.tolist()
    return {"meta_objective": objective, "telescope": telescope,
            "trajectory": [task.SPACE.encode().tolist()] + trajectory.tolist() + [theta],
            "theta_final": theta, "values_final": trainer.values,
            "diverged_pairs": int(trainer.state.diverged.numpy()),
            # Pairs whose credited difference the outlier guard clipped (all windows).
            "clipped_pairs": int(np.sum(history["clipped_pairs"])),
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------- scoring
def score(data, thetas, horizon: int, seeds: int, seed: int, jit_compile: bool) -> dict:
    """Trains every theta on ``seeds`` seeds in one compiled `Population` run.

    Run ``s`` of every theta shares its initialization and minibatches (common random
    numbers). Returns ``{"mean_train_loss", "final_train_loss"}``, each
    ``[len(thetas), seeds]``: the mean minibatch loss over the run (the "sum"
    objective / T) and the loss on the whole training set at its end.
    """
    x, y = data
    thetas = np.asarray(thetas, np.float32)
    n = len(thetas) * seeds
    population = keras_es.Population(task.build_model(x.shape[1]), n, task.SPACE, task.LOSS,
                                     task.schedule_optimizer(horizon))
    theta = tf.constant(np.repeat(thetas, seeds, axis=0))
    run = np.tile(np.arange(seeds), len(thetas))
    keys = tf.constant(np.stack([np.full(n, seed), run], 1).astype(np.int32))
    # Minibatches [horizon, particles, 32], drawn up front: run s's at every theta.
    batches = np.random.default_rng([seed, 1]).integers(0, len(x), (horizon, seeds, 32))
    batches = tf.constant(batches[:, run].astype(np.int32))
    x, y = tf.constant(x), tf.constant(y)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def train():
        def body(t, state, total):
            index = batches[t]
            state, loss = population.train_step(state, theta, tf.gather(x, index),
                                                tf.gather(y, index))
            return t + 1, state, total + tf.minimum(loss, LOSS_CAP)

        _, state, total = tf.while_loop(lambda t, *_: t < horizon, body,
                                        (0, population.init(keys), tf.zeros([n])))
        return total / horizon, population.evaluate(state, x, y)["loss"]

    out = {}
    for name, values in zip(("mean_train_loss", "final_train_loss"), train(), strict=True):
        values = values.numpy()
        values = np.where(np.isfinite(values), np.minimum(values, LOSS_CAP), math.log(10.0))
        out[name] = values.reshape(len(thetas), seeds)
    return out


def grid_stage(data, config: dict, seed: int) -> dict:
    g = config["grid"]
    lr0 = np.geomspace(*task.LR0_RANGE, g)
    decay = np.geomspace(*task.DECAY_RANGE, g)
    thetas = np.array([[math.log(a), math.log(b)] for a in lr0 for b in decay])
    scores = score(data, thetas, config["horizon"], config["grid_seeds"], seed,
                   bool(config["jit"]))
    return {"lr0": lr0.tolist(), "decay": decay.tolist(), "thetas": thetas,
            **{k: v.mean(1).reshape(g, g) for k, v in scores.items()}}


def rescore(data, grid: dict, learned: dict, config: dict, seed: int) -> dict:
    """The initial and learned schedules and each objective's best grid points, on
    fresh seeds (the grid's best are picked on other noise than they are scored on)."""
    top = config["top"]
    names, thetas = ["initial"], [task.SPACE.encode()]
    for name, run in learned.items():
        names.append(name)
        thetas.append(run["theta_final"])
    picks = {}
    for objective, key in (("sum", "mean_train_loss"), ("final", "final_train_loss")):
        picks[objective] = np.argsort(grid[key], axis=None)[:top]
        names += [f"grid_{objective}_{i}" for i in range(top)]
        thetas += list(grid["thetas"][picks[objective]])
    scores = score(data, thetas, config["horizon"], config["eval_seeds"], seed,
                   bool(config["jit"]))
    rows = {name: _row(thetas[i], {k: v[i] for k, v in scores.items()})
            for i, name in enumerate(names)}
    # Every re-scored grid pick, and per objective the best of them on the fresh seeds.
    out = {"schedules": {}, "grid_candidates": {n: r for n, r in rows.items()
                                                if n.startswith("grid_")}, "paired": {}}
    for objective, key in (("sum", "mean_train_loss"), ("final", "final_train_loss")):
        # The grid's best for an objective: the best, on fresh seeds, of its top picks.
        candidates = [f"grid_{objective}_{i}" for i in range(top)]
        best = min(candidates, key=lambda n: rows[n][key])
        out["schedules"][f"grid_best_{objective}"] = rows[best]
    out["schedules"].update({n: rows[n] for n in ["initial", *learned]})
    for name in [m for m in learned if m != "sum" and "sum" in learned]:
        # A final-loss schedule minus the sum's, paired over the seeds both trained on.
        i, j = names.index(name), names.index("sum")
        for key, values in scores.items():
            d = values[i] - values[j]
            out["paired"][f"{name}_minus_sum/{key}"] = {
                "mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}
    return out


def _row(theta, scores: dict) -> dict:
    """A schedule's values and its scores over seeds: mean, SE, and for the final loss
    the median and 90th percentile (a few seeds can end far above the rest)."""
    values = task.SPACE.decode(np.asarray(theta, np.float32))
    row = {"lr0": values["lr0"], "decay": values["decay"]}
    for key, v in scores.items():
        row[key] = float(v.mean())
        row[f"{key}_se"] = float(v.std(ddof=1) / math.sqrt(len(v)))
    final = scores["final_train_loss"]
    row["final_train_loss_median"] = float(np.median(final))
    row["final_train_loss_p90"] = float(np.percentile(final, 90))
    return row


# ---------------------------------------------------------------------- output
COLORS = {"sum": "magenta", "final_episode_end": "red", "final_telescoped": "orange"}


def plot(path, grid: dict, learned: dict, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr0, decay = np.log10(grid["lr0"]), np.log10(grid["decay"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.0))
    panels = (("mean_train_loss", "sum objective: mean training loss over the run"),
              ("final_train_loss", "final objective: training loss at the end"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = np.log10(grid[key])
        mesh = ax.pcolormesh(decay, lr0, values, shading="nearest", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label=f"log10 {key.replace('_', ' ')}")
        best = np.unravel_index(np.argmin(values), values.shape)
        ax.plot(decay[best[1]], lr0[best[0]], "x", color="black", ms=10, mew=2,
                label="grid best (grid seeds)")
        for name, run in learned.items():
            path_ = np.asarray(run["trajectory"]) / math.log(10.0)
            ax.plot(path_[:, 1], path_[:, 0], color=COLORS[name], lw=1.2, label=name)
            ax.plot(path_[-1, 1], path_[-1, 0], "*", color=COLORS[name], ms=12, mec="black")
        ax.plot(path_[0, 1], path_[0, 0], "o", color="white", mec="black", ms=7,
                label="initial")
        ax.set_xlabel("log10 decay (power)")
        ax.set_ylabel("log10 initial learning rate")
        ax.set_title(f"{title} ({dataset})", fontsize=10)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args, config = parse_args(argv)
    start = time.perf_counter()
    # Both objectives are training losses, as in the paper's experiment.
    train = datasets.load(args.dataset, "train", args.data_dir, args.max_examples)
    learned = {m: meta_train(train, m, config, args.seed) for m in args.methods}
    grid = grid_stage(train, config, args.seed + 1)
    scored = rescore(train, grid, learned, config, args.seed + 2)
    results = {
        "dataset": args.dataset, "quick": bool(args.quick),
        "settings": {**config, "truncation_length": K, "sigma": SIGMA,
                     "meta_batch_size": min(META_BATCH, len(train[0])),
                     "tau": task.TAU_FRACTION * config["horizon"],
                     "initial": dict(task.INITIAL), "seed": args.seed},
        "methods": learned,
        **scored,
        "grid": {"lr0": grid["lr0"], "decay": grid["decay"],
                 "mean_train_loss": grid["mean_train_loss"].tolist(),
                 "final_train_loss": grid["final_train_loss"].tolist()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("telescoping.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(plot_path, grid, learned, args.dataset)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{'schedule':<22}{'lr0':>8}{'decay':>8}{'final loss':>12}{'+-':>8}{'median':>8}"
          f"{'p90':>8}{'mean loss':>11}")
    rows = {**results["schedules"], **results["grid_candidates"]}
    for name, row in rows.items():
        print(f"{name:<22}{row['lr0']:>8.4f}{row['decay']:>8.3f}"
              f"{row['final_train_loss']:>12.4f}{row['final_train_loss_se']:>8.4f}"
              f"{row['final_train_loss_median']:>8.4f}{row['final_train_loss_p90']:>8.4f}"
              f"{row['mean_train_loss']:>11.4f}")
    for name, d in results["paired"].items():
        print(f"{name}: {d['mean']:+.4f} +- {d['se']:.4f} (paired SE)")
    print(f"{results['seconds']:.0f} s; plot: {plot_path}")
    return results


if __name__ == "__main__":
    main()
