"""Tune a learning-rate schedule online with ESCallback (the ES-Single schedule task).

An MLP (2 x 100 ReLU) trains with SGD (momentum 0.9) and the schedule
``lr_t = lr0 / (1 + t / tau) ** decay``. `keras_es.ESCallback` tunes ``lr0`` and
``decay`` (both in log space) while ``model.fit`` runs: its particles train copies of
the model for inner problems of ``--horizon`` steps, and ES-Single estimates the
gradient of each inner problem's *final* validation loss, credited when the inner
problem ends (``meta_objective="final"``, ``telescope=False``).

Then compiled `keras_es.Population` runs train the MLP for the same horizon at every
point of a grid over (log lr0, log decay), all from the same seeds (initializations
and batch orders), and the script draws the grid's final validation loss as a heatmap
with the ES trajectory on it. The reported numbers come from a second run on fresh
seeds: the best few grid points, the initial and the learned schedule.

By default the data are scikit-learn's bundled 8x8 digits, served through a small
TFDS builder (`keras_es.datasets`), so everything runs offline on the ``tfds.load``
path; ``--dataset mnist`` (or ``fashion_mnist``) runs on the real dataset.

    python examples/mnist_lr_schedule.py --quick --out results/mnist_lr_schedule.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

import keras_es
from keras_es import datasets, engine, schedules

# tau of the schedule, in steps, as a fraction of the horizon (ES-Single's MNIST task
# uses tau = T = 5000; on the small embedded data a faster decay keeps the task sharp).
TAU_FRACTION = 0.1
INITIAL = {"lr0": 0.01, "decay": 1.0}
# Grid bounds, natural units.
LR0_RANGE = (1e-3, 3.0)
DECAY_RANGE = (1e-2, 10.0)

SETTINGS = {
    # quick: about 2 minutes on 2 CPU cores with the embedded data
    "quick": dict(horizon=300, particles=64, windows=600, grid=10, grid_seeds=8,
                  eval_seeds=64),
    "full": dict(horizon=300, particles=64, windows=1500, grid=16, grid_seeds=16,
                 eval_seeds=128),
}
# Grid points re-scored on fresh seeds for the reported grid best.
TOP_GRID_POINTS = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits",
                        help="'digits' (embedded, offline; default) or a TFDS name such as "
                             "'mnist' or 'fashion_mnist'.")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory.")
    parser.add_argument("--quick", action="store_true", help="The short run (~2 minutes).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default: beside --out, else mnist_lr_schedule.png).")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="Use at most this many training examples.")
    for name in ("horizon", "particles", "windows", "grid", "grid-seeds", "eval-seeds"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"Override the setting {name.replace('-', '_')}.")
    args = parser.parse_args(argv)
    for name in ("max_examples", "horizon", "particles", "windows", "grid", "grid_seeds",
                 "eval_seeds"):
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
    return args


def build_model(input_dim: int) -> keras.Model:
    return keras.Sequential([keras.Input((input_dim,)),
                             keras.layers.Dense(100, activation="relu"),
                             keras.layers.Dense(100, activation="relu"),
                             keras.layers.Dense(10)])


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPACE = keras_es.SearchSpace([keras_es.Hyperparameter("lr0", INITIAL["lr0"], "log"),
                              keras_es.Hyperparameter("decay", INITIAL["decay"], "log")])


def schedule_optimizer(horizon: int) -> engine.SGD:
    tau = TAU_FRACTION * horizon
    return engine.SGD(schedules.InverseTimeDecay("lr0", tau, "decay"), momentum=0.9)


def tune(data, config, seed):
    """Fits the model with ESCallback; returns (callback, trajectory of theta)."""
    (x, y), (x_val, y_val) = data
    keras.utils.set_random_seed(seed)
    model = build_model(x.shape[1])
    model.compile(optimizer=keras.optimizers.SGD(INITIAL["lr0"], momentum=0.9), loss=LOSS)
    horizon, k = config["horizon"], 10
    es = keras_es.ESCallback(
        SPACE, schedule_optimizer(horizon), train_data=(x, y), meta_data=(x_val, y_val),
        num_particles=config["particles"], sigma=0.2, truncation_length=k, horizon=horizon,
        meta_objective="final", telescope=False, batch_size=32,
        # use_ema: the fit ends with the moving average of theta over ~100 windows.
        outer_optimizer=keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.99),
        seed=seed)
    train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
             .repeat().batch(32))
    epochs = min(10, config["windows"])
    model.fit(train, steps_per_epoch=config["windows"] * k // epochs, epochs=epochs,
              validation_data=(x_val, y_val), callbacks=[es], shuffle=False, verbose=0)
    trajectory = ([SPACE.encode().tolist()] + [w["theta"] for w in es.window_history]
                  + [es.trainer.theta_value.tolist()])  # the averaged theta
    return es, np.asarray(trajectory)


def final_losses(data, thetas, horizon, seeds, seed):
    """Final validation loss of training for ``horizon`` steps at each theta.

    All ``len(thetas) * seeds`` runs train in one compiled Population step; run ``s``
    of every theta shares initialization and minibatches (common random numbers).
    Returns ``[len(thetas)]``: the mean over seeds (diverged runs count as the loss of
    the untrained model, log(10)).
    """
    (x, y), (x_val, y_val) = data
    thetas = np.asarray(thetas, np.float32)
    n = len(thetas) * seeds
    population = keras_es.Population(build_model(x.shape[1]), n, SPACE, LOSS,
                                     schedule_optimizer(horizon))
    theta = tf.constant(np.repeat(thetas, seeds, axis=0))
    run = np.tile(np.arange(seeds), len(thetas))
    keys = tf.constant(np.stack([np.full(n, seed), run], 1).astype(np.int32))
    x, y, x_val, y_val = map(tf.constant, (x, y, x_val, y_val))

    @tf.function(jit_compile=True)
    def train():
        def body(t, state):
            step_keys = tf.map_fn(lambda k: tf.random.experimental.stateless_fold_in(k, t),
                                  keys)
            index = tf.map_fn(lambda k: tf.random.stateless_uniform(
                [32], k, 0, tf.shape(x)[0], tf.int32), step_keys)
            state, _ = population.train_step(state, theta, tf.gather(x, index),
                                             tf.gather(y, index))
            return t + 1, state

        _, state = tf.while_loop(lambda t, _: t < horizon, body, (0, population.init(keys)))
        return population.evaluate(state, x_val, y_val)["loss"]

    losses = train().numpy()
    losses = np.where(np.isfinite(losses), np.minimum(losses, 10.0), math.log(10.0))
    return losses.reshape(len(thetas), seeds).mean(axis=1)


def plot(path, grid_lr0, grid_decay, grid_losses, best, trajectory, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    mesh = ax.pcolormesh(np.log10(grid_decay), np.log10(grid_lr0), np.log10(grid_losses),
                         shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log10 final validation loss")
    path_lr0 = np.log10(np.exp(trajectory[:, 0]))
    path_decay = np.log10(np.exp(trajectory[:, 1]))
    ax.plot(path_decay, path_lr0, color="white", lw=1.5, label="ES-Single trajectory")
    ax.plot(path_decay[0], path_lr0[0], "o", color="white", ms=7, label="initial")
    ax.plot(path_decay[-1], path_lr0[-1], "*", color="red", ms=14, label="learned")
    ax.plot(np.log10(grid_decay[best[1]]), np.log10(grid_lr0[best[0]]), "x", color="black",
            ms=10, mew=2, label="grid best")
    ax.set_xlabel("log10 decay (power)")
    ax.set_ylabel("log10 initial learning rate")
    ax.set_title(f"Final validation loss, {dataset}: lr0 / (1 + t/tau)^decay")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    config = dict(SETTINGS["quick" if args.quick else "full"])
    for name in config:
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    start = time.time()
    train = datasets.load(args.dataset, "train", args.data_dir, args.max_examples)
    val = datasets.load(args.dataset, "test", args.data_dir,
                        None if args.max_examples is None else max(args.max_examples // 4, 1))
    data = (train, val)

    es, trajectory = tune(data, config, args.seed)
    tuned_seconds = time.time() - start

    g = config["grid"]
    grid_lr0 = np.geomspace(*LR0_RANGE, g)
    grid_decay = np.geomspace(*DECAY_RANGE, g)
    grid_thetas = np.array([[math.log(a), math.log(b)] for a in grid_lr0 for b in grid_decay])
    theta_init, theta_final = trajectory[0].tolist(), trajectory[-1].tolist()
    # Stage 1, the heatmap: every grid point on grid_seeds seeds.
    grid_losses = final_losses(data, grid_thetas, config["horizon"], config["grid_seeds"],
                               seed=args.seed + 1).reshape(g, g)
    # Stage 2, the numbers: the best few grid points, the initial and the learned
    # schedule on fresh seeds, so the grid's best is not flattered by having been picked
    # on the same noise it is scored with (the minimum of many noisy means is biased low).
    top = np.argsort(grid_losses, axis=None)[:TOP_GRID_POINTS]
    scored = final_losses(data, np.concatenate([grid_thetas[top], [theta_init, theta_final]]),
                          config["horizon"], config["eval_seeds"], seed=args.seed + 2)
    best = int(np.argmin(scored[:len(top)]))
    best_cell = np.unravel_index(top[best], grid_losses.shape)
    initial_loss, learned_loss = float(scored[-2]), float(scored[-1])
    grid_best = float(scored[best])
    results = {
        "dataset": args.dataset,
        "quick": bool(args.quick),
        "settings": {**config, "truncation_length": 10, "sigma": 0.2, "meta_objective": "final",
                     "telescope": False, "tau": TAU_FRACTION * config["horizon"]},
        "theta_init": theta_init,
        "theta_final": theta_final,
        "trajectory": trajectory.tolist(),
        "values_init": SPACE.decode(np.asarray(theta_init, np.float32)),
        "values_final": SPACE.decode(np.asarray(theta_final, np.float32)),
        "final_val_loss": {"initial_schedule": initial_loss,
                           "learned_schedule": learned_loss,
                           "grid_best": grid_best},
        "grid_best_values": {"lr0": float(grid_lr0[best_cell[0]]),
                             "decay": float(grid_decay[best_cell[1]])},
        "learned_over_grid_best": learned_loss / grid_best,
        "grid": {"lr0": grid_lr0.tolist(), "decay": grid_decay.tolist(),
                 "final_val_loss": grid_losses.tolist()},
        "diverged_pairs": int(es.trainer.state.diverged.numpy()),
        "seconds": {"tuning": tuned_seconds, "total": time.time() - start},
    }

    plot_path = args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out
                              else "mnist_lr_schedule.png")
    if os.path.dirname(plot_path):
        os.makedirs(os.path.dirname(plot_path), exist_ok=True)
    plot(plot_path, grid_lr0, grid_decay, grid_losses, best_cell, trajectory, args.dataset)
    if args.out:
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    v = results["final_val_loss"]
    print(f"lr0 {INITIAL['lr0']:.4g} -> {results['values_final']['lr0']:.4g}, decay "
          f"{INITIAL['decay']:.4g} -> {results['values_final']['decay']:.4g}")
    print(f"final validation loss: initial schedule {v['initial_schedule']:.4f}, learned "
          f"{v['learned_schedule']:.4f}, grid best {v['grid_best']:.4f} "
          f"(learned / grid best = {results['learned_over_grid_best']:.3f})")
    print(f"{results['seconds']['total']:.0f} s; plot: {plot_path}")
    return results


if __name__ == "__main__":
    main()
