"""The ES primer's two options, measured: rank-based fitness shaping and a learned sigma.

The task: tune the learning rate of SGD on a noisy quadratic, online, with ES-Single.
Each inner problem trains ``w`` (10 coordinates, curvatures ``lambda`` log-spaced in
``[0.05, 1]``, ``w_0 = 1``) for T = 50 steps of ``w <- w - lr (lambda w + 0.5 n_t)``,
``n_t`` standard normal noise keyed by the pair's step key (common random numbers);
the per-step loss is ``0.5 sum lambda w^2``, capped at 100 as a diverged run's loss
saturates. theta = log lr. The objective is the sum of the per-step losses; its exact
expectation (uncapped, which never binds below lr = 2) has a closed form, so theta* is
known (lr* ~ 0.25). SGD diverges beyond lr = 2: the loss is steep on the right of
theta* and flat on the left, so the Gaussian-smoothed objective's minimum moves left of
theta* as sigma grows (to lr ~ 0.12 at sigma = 0.5).

Four estimators, each from theta_0 = log 0.02 with Adam(0.05) for 300 windows of K = 10
steps, 8 pairs, sigma_0 = 0.5, over several seeds: ES-Single as it is, with
``fitness_shaping="rank"``, with ``learn_sigma=True`` (default bounds: sigma in
[0.05, 5]) and with both. Reported per run: the final theta (mean of the last 50
windows), its distance to theta*, the exact objective there over its minimum, and the
final sigma. Also: the spread of the log-sigma estimate with and without staggered
starts (`log_sigma_spread`).

Writes ``benchmarks/results/primer_options.json``.

Usage: ``python benchmarks/primer_options.py [--seeds 5] [--windows 300] [--out PATH]``.
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
from keras_es import noise  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CURVATURES = np.geomspace(0.05, 1.0, 10)
NOISE, HORIZON, CAP = 0.5, 50, 100.0


class NoisyQuadratic(keras_es.UnrolledSystem):
    """SGD with learning rate ``exp(theta)`` on a noisy quadratic (see the module)."""

    def __init__(self):
        self.curvatures = tf.constant(CURVATURES, tf.float32)

    def init(self, keys):
        return tf.ones([tf.shape(keys)[0], len(CURVATURES)])

    def step(self, state, theta, keys):
        lr = tf.exp(theta[:, :1])
        gradient = self.curvatures * state + NOISE * noise.normal_rows(keys, len(CURVATURES))
        state = tf.clip_by_value(state - lr * gradient, -1e6, 1e6)
        loss = 0.5 * tf.reduce_sum(self.curvatures * tf.square(state), -1)
        return state, tf.minimum(loss, CAP), None


def expected_objective(log_lr: float) -> float:
    """The exact expected sum of per-step losses of one inner problem (uncapped)."""
    lr, second_moment, total = math.exp(log_lr), np.ones(len(CURVATURES)), 0.0
    for _ in range(HORIZON):
        second_moment = (1 - lr * CURVATURES) ** 2 * second_moment + (lr * NOISE) ** 2
        total += 0.5 * float(np.sum(CURVATURES * second_moment))
    return total


def optimum() -> tuple[float, float]:
    grid = np.linspace(math.log(0.01), math.log(1.5), 4001)
    values = [expected_objective(g) for g in grid]
    best = int(np.argmin(values))
    return float(grid[best]), float(values[best])


def smoothed_optimum(sigma: float) -> float:
    """The minimum of the Gaussian-smoothed (capped) objective: where fixed-sigma ES
    heads."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / weights.sum()

    def capped(log_lr):
        lr, second_moment, total = math.exp(log_lr), np.ones(len(CURVATURES)), 0.0
        for _ in range(HORIZON):
            second_moment = np.minimum((1 - lr * CURVATURES) ** 2 * second_moment
                                       + (lr * NOISE) ** 2, 1e12)
            total += min(0.5 * float(np.sum(CURVATURES * second_moment)), CAP)
        return total

    grid = np.linspace(math.log(0.01), math.log(1.5), 801)
    values = [sum(w * capped(g + sigma * x) for x, w in zip(nodes, weights, strict=True))
              for g in grid]
    return float(grid[int(np.argmin(values))])


def log_sigma_spread(pairs: int = 10_000, windows: int = 6) -> dict:
    """Per-pair standard deviation of the log-sigma estimate (ES-Single, learning rate 0)
    on the linear-quadratic oracle of the tests, with and without staggered starts: the
    leave-one-out baseline is poorer when pairs sit at different phases."""
    from keras_es import testing
    from keras_es.estimators import LearnedSigma

    out = {}
    for stagger in (True, False):
        estimator = keras_es.es_single(0.1, 4, horizon=12, stagger=stagger,
                                       learn_sigma=LearnedSigma(learning_rate=0.0))
        _, results = testing.run_windows(estimator, testing.oracle_system(),
                                         testing.ORACLE_THETA, pairs, windows, seed=7)
        totals = sum(r.pair_sigma_gradients.numpy().astype(np.float64) for r in results)
        out["staggered" if stagger else "unstaggered"] = totals.std(0).tolist()
    out["ratio"] = (np.asarray(out["staggered"]) / np.asarray(out["unstaggered"])).tolist()
    return out


CONFIGS = {
    "es_single": {},
    "rank": {"fitness_shaping": "rank"},
    "learned_sigma": {"learn_sigma": True},
    "rank_and_learned_sigma": {"fitness_shaping": "rank", "learn_sigma": True},
}


def run(options: dict, seed: int, windows: int, sigma: float, theta_star: float,
        best: float) -> dict:
    estimator = keras_es.es_single(sigma, 10, horizon=HORIZON, **options)
    trainer = keras_es.MetaTrainer(NoisyQuadratic(), estimator, [math.log(0.02)], 16,
                                   outer_optimizer=keras.optimizers.Adam(0.05), seed=seed)
    history = trainer.train(windows)
    theta = float(np.mean(history["theta_0"][-50:]))
    return {"theta_final": theta, "lr_final": math.exp(theta),
            "error": abs(theta - theta_star),
            "objective_over_best": expected_objective(theta) / best,
            "sigma_final": history.get("sigma", [sigma])[-1],
            "clipped_pairs": int(np.sum(history["clipped_pairs"]))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "primer_options.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    theta_star, best = optimum()
    result = {"theta_star": theta_star, "lr_star": math.exp(theta_star),
              "objective_star": best,
              "smoothed_optimum_theta": smoothed_optimum(args.sigma), "runs": {}}
    print(f"theta* = {theta_star:.3f} (lr* = {math.exp(theta_star):.3f}), "
          f"smoothed optimum at sigma {args.sigma}: {result['smoothed_optimum_theta']:.3f}")
    for name, options in CONFIGS.items():
        runs = [run(options, seed, args.windows, args.sigma, theta_star, best)
                for seed in range(args.seeds)]
        summary = {key: [r[key] for r in runs] for key in runs[0]}
        result["runs"][name] = summary
        print(f"{name:<24} theta {np.mean(summary['theta_final']):.3f} +- "
              f"{np.std(summary['theta_final']):.3f}  "
              f"|theta - theta*| mean {np.mean(summary['error']):.3f} "
              f"(max {np.max(summary['error']):.3f})  objective/best mean "
              f"{np.mean(summary['objective_over_best']):.4f}  sigma_final "
              f"{np.round(summary['sigma_final'], 3).tolist()}")
    result["log_sigma_std"] = log_sigma_spread()
    print("log-sigma estimate's per-pair std, staggered over unstaggered:",
          np.round(result["log_sigma_std"]["ratio"], 1).tolist())
    result["config"] = {"seeds": args.seeds, "windows": args.windows, "sigma": args.sigma,
                        "pairs": 8, "truncation_length": 10, "horizon": HORIZON,
                        "outer_optimizer": "Adam(0.05)", "theta_0": math.log(0.02)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
