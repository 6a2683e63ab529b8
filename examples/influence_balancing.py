"""Influence balancing: truncated methods go the wrong way, PES and ES-Single do not.

The task (Tallec & Ollivier, 2017): a 23-dimensional linear system
``s_{t+1} = A s_t + theta v`` with ``A`` = 0.5 on the diagonal and superdiagonal,
``v`` = (+1 x 10, -1 x 13), ``s_0`` = ones and per-step loss ``0.5 (s_t[0] - 1)^2``.
One step ahead, raising theta raises ``s[0]``; in the long run it lowers it, so an
estimator that only looks one step ahead moves theta away from the optimum
``theta* = -1/6``. PES and ES-Single, unbiased with truncation length K = 1, reach it.

Settings follow the PES paper: K = 1, theta_0 = 0.5, no resets, N = 1000 particles,
sigma = 0.1, SGD with learning rate 1e-4 on theta.

Usage::

    python examples/influence_balancing.py --quick --out results/influence_balancing.json

Writes the JSON ``{"theta_star": float, "methods": {"pes": {"theta_final": float,
...}, ...}}`` and a PNG of theta against outer steps beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402
from keras_es.systems import influence_balancing, steady_state_optimum  # noqa: E402

ES_METHODS = ("pes", "es_single", "truncated_es")


def run_es(method: str, steps: int, num_particles: int, sigma: float, learning_rate: float,
           theta0: float, seed: int) -> list[float]:
    """theta after every outer step of one ES method."""
    estimator = keras_es.ESTIMATORS[method](sigma=sigma, truncation_length=1)
    trainer = keras_es.MetaTrainer(influence_balancing(), estimator, [theta0], num_particles,
                                   outer_optimizer=keras.optimizers.SGD(learning_rate), seed=seed)
    return trainer.train(steps)["theta_0"]


def run_truncated_backprop(steps: int, learning_rate: float, theta0: float) -> list[float]:
    """Truncated backprop through time with K = 1 (GradientTape through one step).

    The gradient of the next loss with respect to theta, holding the current state
    fixed: exactly the short-horizon influence that points the wrong way.
    """
    system = influence_balancing()
    theta = tf.Variable([[theta0]], dtype=tf.float32)
    optimizer = keras.optimizers.SGD(learning_rate)
    optimizer.build([theta])
    state = tf.Variable(system.init(tf.zeros([1, 2], tf.int32)))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            new_state, loss, _ = system.step(tf.stop_gradient(state), theta, None)
        optimizer.apply_gradients([(tape.gradient(loss, theta), theta)])
        state.assign(new_state)
        return theta[0, 0]

    return [float(step()) for _ in range(steps)]


def plot(curves: dict[str, list[float]], theta_star: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    ax.axhline(theta_star, color="black", linestyle="--", linewidth=1,
               label=f"theta* = {theta_star:.4f}")
    ax.set_xlabel("outer step (K = 1)")
    ax.set_ylabel("theta")
    ax.set_title("Influence balancing: only unbiased estimators find theta*")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run (fewer outer steps; same expectation).")
    parser.add_argument("--steps", type=int, default=None, help="Outer steps per method.")
    parser.add_argument("--num-particles", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, or influence_balancing.png).")
    args = parser.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    theta0 = 0.5

    theta_star = steady_state_optimum(influence_balancing())
    curves: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for method in ES_METHODS:
        start = time.perf_counter()
        curves[method] = run_es(method, steps, args.num_particles, args.sigma,
                                args.learning_rate, theta0, args.seed)
        results[method] = {"theta_final": curves[method][-1],
                           "seconds": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    curves["truncated_backprop"] = run_truncated_backprop(steps, args.learning_rate, theta0)
    results["truncated_backprop"] = {"theta_final": curves["truncated_backprop"][-1],
                                     "seconds": round(time.perf_counter() - start, 2)}
    for values in results.values():
        values["error"] = abs(values["theta_final"] - theta_star)

    out = {"theta_star": theta_star, "methods": results,
           "config": {"steps": steps, "num_particles": args.num_particles,
                      "sigma": args.sigma, "learning_rate": args.learning_rate,
                      "truncation_length": 1, "theta_init": theta0, "seed": args.seed}}
    print(f"theta* = {theta_star:.5f}  ({steps} outer steps, N = {args.num_particles})")
    print(f"{'method':<20}{'theta_final':>12}{'|error|':>10}{'seconds':>9}")
    for name, values in results.items():
        print(f"{name:<20}{values['theta_final']:>12.5f}{values['error']:>10.5f}"
              f"{values['seconds']:>9.1f}")

    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("influence_balancing.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, theta_star, plot_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    return out


QUICK_STEPS = 3000
FULL_STEPS = 6000

if __name__ == "__main__":
    main()
