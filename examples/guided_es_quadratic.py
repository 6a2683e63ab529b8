"""Guided ES on the perturbed quadratic: a biased surrogate gradient, used well.

The toy problem of the Guided ES paper (Maheswaranathan et al., 2019, Fig. 1):
minimize ``f(theta) = ||A theta - b||^2 / (2 m)`` over ``theta`` in R^n, n = 1000,
m = 2000, ``A`` and ``b`` standard Gaussian (fixed problem seed), from ``theta = 0``.
The optimizer never sees ``grad f``, only a *surrogate*

    surrogate(theta, t) = grad f + ||grad f|| * (u_bias + 1.5 * u_t)

where ``u_bias`` is a fixed random unit vector and ``u_t`` a fresh random unit vector at
every iteration (``tf.random.stateless_normal`` keyed by ``[seed, t]``). Three methods:

* ``guided_es``: `keras_es.full_es` with ``horizon=1`` (one step is one whole inner
  problem, so each outer step is one ES estimate of ``grad f``), guided by the surrogate:
  ``GuidedConfig(k=1, alpha=0.5, beta=2, weighting="covariance")``. Half the
  perturbation variance lies along the latest surrogate, but the *size* of each step
  comes from function values ``f(theta +- eps)``, so the bias cannot fool it.
* ``vanilla_es``: the same estimator with ``alpha=1`` (isotropic perturbations, the
  surrogate is ignored), same sigma, beta, particles and learning rate.
* ``surrogate_descent``: plain SGD on the surrogate. The bias makes it stall: every
  point where ``grad f`` points along ``-u_bias`` is a fixed point in expectation, and the
  fresh noise slowly pushes it outward along that ray, so its gap ``f - f*`` plateaus
  (and, at larger learning rates, creeps back up). Its learning rate is tuned: the best
  final gap over a small grid is reported, which can only flatter the baseline.

Settings: the paper's sigma = 0.1, alpha = 0.5, beta = 2, k = 1 and 10,000 iterations
(``--quick``: 5,000), theta_0 = 0. Ours: 16 particles (8 antithetic pairs) per
iteration instead of the paper's one pair, and one SGD learning rate, 0.5, shared by both
ES methods (the paper shares 0.2). More pairs cost little here (the particles' losses
are one batched matmul) and make both ES methods less noisy. With the paper's one or two
pairs and learning rate 0.2, Guided ES's lead over vanilla ES after 10,000 iterations
varies between about 2.5x and 4x with the seed, and is under 3x after 5,000; with 8 pairs
at 0.5 it is 6-7x after 5,000 for every seed we tried.

Expected outcome: surrogate descent drops quickly at first, then plateaus near
``f - f* ~ 0.055``; vanilla ES descends steadily but slowly (its mean step is
``beta / n`` times the gradient); Guided ES gets an even faster start from the
surrogate *and* keeps converging. Measured over seeds 0-3, final ``f - f*`` after 5,000 iterations:
Guided ES ~1.3e-3, vanilla ES ~8.2e-3 (6-7x), surrogate descent ~0.056 (40-50x); after
10,000 (seeds 0-1): ~3e-5, ~1.6e-3 (~50x), ~0.056.

The lead over vanilla ES belongs to this *shared* learning rate. A learning rate means
different things to the two: Guided ES puts half its perturbation variance on one
direction, so its steps along the surrogate are large and it diverges by 2.0, while
vanilla ES is still stable there and, given its own larger learning rate, catches up
(seed 0, 5,000 iterations: Guided ES 1.7e-4 at 1.0, vanilla ES 1.5e-4 at 2.0).

f* comes from a float64 least-squares solve, and the gap is evaluated in float64 as
``(theta - theta*)^T H (theta - theta*) / 2`` with ``H = A^T A / m``, which equals
``f(theta) - f*`` exactly and does not cancel.

Usage::

    python examples/guided_es_quadratic.py --quick --out results/guided_es_quadratic.json

Writes the JSON ``{"methods": {"guided_es": {"final_gap": float, ...}, "vanilla_es":
{...}, "surrogate_descent": {...}}, "config": {...}, "curve_iterations": [...]}`` and a
PNG of ``f - f*`` (log scale) against iterations beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402

NUM_VARIABLES = 1000  # n
NUM_EQUATIONS = 2000  # m
PROBLEM_SEED = 0
BIAS_SCALE = 1.0
NOISE_SCALE = 1.5

FULL_ITERATIONS = 10_000
QUICK_ITERATIONS = 5_000
CURVE_POINTS = 100
METHODS = ("guided_es", "vanilla_es", "surrogate_descent")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one run: the Guided ES paper's demo, except for the number of
    particles and the shared ES learning rate (see the module docstring)."""

    iterations: int = FULL_ITERATIONS
    seed: int = 0
    sigma: float = 0.1
    alpha: float = 0.5
    beta: float = 2.0
    k: int = 1
    num_particles: int = 16
    learning_rate: float = 0.5
    descent_learning_rates: tuple[float, ...] = (2e-3, 5e-3, 1e-2)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The quadratic ``||A theta - b||^2 / (2 m)``, its minimizer and the gradient bias."""

    A: np.ndarray  # float64 [m, n]
    b: np.ndarray  # float64 [m]
    bias: np.ndarray  # float64 [n], unit norm
    theta_star: np.ndarray  # float64 [n]
    f_star: float

    @functools.cached_property
    def hessian(self) -> np.ndarray:
        """``A^T A / m`` (float64)."""
        return self.A.T @ self.A / self.A.shape[0]

    @functools.cached_property
    def linear(self) -> np.ndarray:
        """``A^T b / m`` (float64): ``grad f = hessian @ theta - linear``."""
        return self.A.T @ self.b / self.A.shape[0]

    def gap(self, theta: np.ndarray) -> float:
        """``f(theta) - f*`` in float64, computed without cancellation."""
        error = np.asarray(theta, np.float64) - self.theta_star
        return float(error @ self.hessian @ error / 2)


def make_problem(seed: int = PROBLEM_SEED, n: int = NUM_VARIABLES,
                 m: int = NUM_EQUATIONS) -> Problem:
    """A random least-squares problem and a random unit bias direction."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n))
    b = rng.standard_normal(m)
    bias = rng.standard_normal(n)
    theta_star = np.linalg.lstsq(A, b, rcond=None)[0]
    residual = A @ theta_star - b
    return Problem(A, b, bias / np.linalg.norm(bias), theta_star,
                   float(residual @ residual / (2 * m)))


class PerturbedQuadratic(keras_es.UnrolledSystem):
    """An inner problem of one step: particle ``i`` reports ``f(theta_i)``.

    ``f`` is evaluated in its expanded form ``theta^T H theta / 2 - c^T theta + f_0`` with
    ``H = A^T A / m``, ``c = A^T b / m`` and ``f_0 = ||b||^2 / (2 m)`` (precomputed in
    float64): the same function, at half the cost of forming the m residuals.

    There is no inner state to carry (with ``horizon=1`` every step ends an episode), so
    the state is a placeholder of one zero per particle.
    """

    def __init__(self, problem: Problem):
        self.hessian = tf.constant(problem.hessian, tf.float32)
        self.linear = tf.constant(problem.linear, tf.float32)
        self.offset = float(problem.b @ problem.b / (2 * problem.A.shape[0]))

    def init(self, keys: tf.Tensor) -> tf.Tensor:
        return tf.zeros(tf.shape(keys)[:1], tf.float32)

    def step(self, state: tf.Tensor, theta: tf.Tensor, keys: tf.Tensor):
        curvature = tf.matmul(theta, self.hessian)  # [particles, n]; H is symmetric
        loss = (0.5 * tf.reduce_sum(theta * curvature, axis=-1)
                - tf.linalg.matvec(theta, self.linear) + self.offset)
        return state, loss, None


def make_surrogate(problem: Problem, seed: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``surrogate(theta, t) = grad f + ||grad f|| (u_bias + 1.5 u_t)``.

    ``u_t`` is a unit vector drawn statelessly from ``[seed, t]``, so every method sees
    the same surrogate noise at the same iteration and a run is reproducible.
    """
    hessian = tf.constant(problem.hessian, tf.float32)
    linear = tf.constant(problem.linear, tf.float32)
    bias = tf.constant(BIAS_SCALE * problem.bias, tf.float32)
    n = problem.A.shape[1]

    def surrogate(theta: tf.Tensor, outer_step: tf.Tensor) -> tf.Tensor:
        gradient = tf.linalg.matvec(hessian, theta) - linear  # A^T (A theta - b) / m
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(outer_step, tf.int64)])
        noise = tf.math.l2_normalize(tf.random.stateless_normal([n], seed=key))
        return gradient + tf.norm(gradient) * (bias + NOISE_SCALE * noise)

    return surrogate


def curve_iterations(iterations: int, points: int = CURVE_POINTS) -> list[int]:
    """Iterations (0 = the start) at which the gap is recorded."""
    return sorted({round(i * iterations / points) for i in range(points + 1)})


def run_es(problem: Problem, config: Config, alpha: float,
           record_at: list[int]) -> list[float]:
    """Gaps ``f - f*`` at ``record_at`` for ES with the given alpha (1.0: vanilla)."""
    guided = keras_es.GuidedConfig(k=config.k, alpha=alpha, beta=config.beta,
                                   weighting="covariance")
    estimator = keras_es.full_es(config.sigma, horizon=1, guided=guided)
    # With alpha = 1 the subspace gets no variance, so vanilla ES has no use for the
    # surrogate; skipping it saves a gradient evaluation per step and changes nothing.
    surrogate = make_surrogate(problem, config.seed) if alpha < 1.0 else None
    trainer = keras_es.MetaTrainer(
        PerturbedQuadratic(problem), estimator, np.zeros(problem.A.shape[1], np.float32),
        num_particles=config.num_particles,
        outer_optimizer=keras.optimizers.SGD(learning_rate=config.learning_rate),
        seed=config.seed, surrogate=surrogate)
    gaps = []
    done = 0
    for target in record_at:
        for _ in range(target - done):
            trainer.step()
        done = target
        gaps.append(problem.gap(trainer.theta_value))
    return gaps


class SurrogateDescent:
    """Plain SGD on the surrogate gradient, compiled once and rerun per learning rate."""

    def __init__(self, problem: Problem, seed: int):
        self.problem = problem
        self.theta = keras.Variable(np.zeros(problem.A.shape[1], np.float32), name="theta")
        self.optimizer = keras.optimizers.SGD(learning_rate=0.0)
        self.optimizer.build([self.theta])
        self.surrogate = make_surrogate(problem, seed)

    @tf.function(jit_compile=True)
    def _advance(self, start: tf.Tensor, num_steps: tf.Tensor) -> None:
        for i in tf.range(num_steps):
            step = start + tf.cast(i, tf.int64)  # the same u_t as Guided ES at step t
            gradient = self.surrogate(tf.convert_to_tensor(self.theta), step)
            self.optimizer.apply([gradient], [self.theta])

    def run(self, learning_rate: float, record_at: list[int]) -> list[float]:
        """Gaps ``f - f*`` at ``record_at`` for a run from ``theta = 0``."""
        self.theta.assign(tf.zeros_like(self.theta))
        self.optimizer.learning_rate.assign(learning_rate)
        gaps = []
        done = 0
        for target in record_at:
            self._advance(tf.constant(done, tf.int64), tf.constant(target - done, tf.int64))
            done = target
            gaps.append(self.problem.gap(self.theta.numpy()))
        return gaps


def run_all(problem: Problem, config: Config) -> dict:
    """Runs the three methods; returns the result dict (see the module docstring).

    Surrogate descent runs once per learning rate of ``config.descent_learning_rates``;
    the one with the lowest final gap is reported (its ``seconds`` are that run's).
    """
    record_at = curve_iterations(config.iterations)
    methods: dict[str, dict] = {}
    for name, alpha in (("guided_es", config.alpha), ("vanilla_es", 1.0)):
        start = time.perf_counter()
        gaps = run_es(problem, config, alpha, record_at)
        methods[name] = _summary(gaps, config.learning_rate, start)

    descent = SurrogateDescent(problem, config.seed)
    runs = {}
    for learning_rate in config.descent_learning_rates:
        start = time.perf_counter()
        gaps = descent.run(learning_rate, record_at)
        runs[learning_rate] = _summary(gaps, learning_rate, start)
    best = min(runs, key=lambda rate: _finite_or_inf(runs[rate]["final_gap"]))
    methods["surrogate_descent"] = {
        **runs[best],
        "learning_rate_grid": {f"{rate:g}": _round(run["final_gap"])
                               for rate, run in runs.items()}}

    guided_gap = methods["guided_es"]["final_gap"]
    return {
        "methods": methods,
        "ratios_to_guided_es": {name: _round(methods[name]["final_gap"] / guided_gap)
                                for name in METHODS[1:]},
        "curve_iterations": record_at,
        "config": {**dataclasses.asdict(config), "n": problem.A.shape[1],
                   "m": problem.A.shape[0], "problem_seed": PROBLEM_SEED,
                   "f_star": problem.f_star,
                   "initial_gap": problem.gap(np.zeros(problem.A.shape[1])),
                   "horizon": 1, "truncation_length": 1,
                   "surrogate": "grad f + ||grad f|| (u_bias + 1.5 u_t), unit u_bias, u_t"},
    }


def _summary(gaps: list[float], learning_rate: float, start: float) -> dict:
    return {"final_gap": float(gaps[-1]), "learning_rate": learning_rate,
            "seconds": round(time.perf_counter() - start, 2),
            "curve": [_round(g) for g in gaps]}


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _finite_or_inf(value: float) -> float:
    return value if np.isfinite(value) else float("inf")


def print_summary(result: dict) -> None:
    """One line per method: learning rate, final gap, ratio to Guided ES, seconds."""
    config = result["config"]
    print(f"Perturbed quadratic n={config['n']}, m={config['m']}: {config['iterations']} "
          f"iterations, {config['num_particles']} particles, sigma={config['sigma']}, "
          f"alpha={config['alpha']}, beta={config['beta']}, k={config['k']}, "
          f"f* = {config['f_star']:.5f}")
    print(f"{'method':<20}{'lr':>8}{'final f - f*':>14}{'x guided':>10}{'seconds':>9}")
    guided = result["methods"]["guided_es"]["final_gap"]
    for name in METHODS:
        values = result["methods"][name]
        print(f"{name:<20}{values['learning_rate']:>8g}{values['final_gap']:>14.4e}"
              f"{values['final_gap'] / guided:>10.2f}{values['seconds']:>9.1f}")


def plot(result: dict, path: pathlib.Path) -> None:
    """Writes ``f - f*`` (log scale) against iterations for the three methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    labels = {"guided_es": rf"Guided ES ($\alpha$={config['alpha']:g})",
              "vanilla_es": r"vanilla ES ($\alpha$=1)",
              "surrogate_descent": "SGD on the surrogate"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in METHODS:
        values = result["methods"][name]
        tuned = " (best of grid)" if "learning_rate_grid" in values else ""
        ax.semilogy(result["curve_iterations"], values["curve"],
                    label=f"{labels[name]}, lr {values['learning_rate']:g}{tuned}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$f(\theta) - f^*$")
    ax.set_title(f"Perturbed quadratic (n={config['n']}, m={config['m']}, "
                 f"{config['num_particles']} particles/iteration)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """The command line and the `Config` it selects."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"CI-sized run: {QUICK_ITERATIONS} iterations (same expectation).")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"Iterations per method (default {FULL_ITERATIONS}).")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="Seed of the ES perturbations and the surrogate noise.")
    parser.add_argument("--num-particles", type=int, default=defaults.num_particles)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                        help="SGD learning rate of both ES methods.")
    parser.add_argument("--descent-learning-rates", type=float, nargs="+",
                        default=list(defaults.descent_learning_rates),
                        help="Grid for surrogate descent; the best final gap is reported.")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, or guided_es_quadratic.png).")
    args = parser.parse_args(argv)
    if args.iterations is not None:
        iterations = args.iterations
    else:
        iterations = QUICK_ITERATIONS if args.quick else FULL_ITERATIONS
    if iterations < 1:
        parser.error(f"--iterations={iterations} is invalid; expected a positive integer.")
    config = dataclasses.replace(
        defaults, iterations=iterations, seed=args.seed, num_particles=args.num_particles,
        learning_rate=args.learning_rate,
        descent_learning_rates=tuple(args.descent_learning_rates))
    return args, config


def main(argv: list[str] | None = None) -> dict:
    """Runs the demo; prints a summary, writes the PNG (and JSON with ``--out``)."""
    args, config = parse_args(argv)
    result = run_all(make_problem(), config)
    print_summary(result)

    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("guided_es_quadratic.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(result, plot_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
