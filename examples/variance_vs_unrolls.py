"""Variance of PES and ES-Single against the number of truncated unrolls.

The ES-Single paper's Fig. 1 and Proposition 3.2: cutting an inner problem of T steps
into T/K truncated unrolls leaves ES-Single's variance unchanged, at the full-unroll ES
value ``(P + 1) ||g||^2`` (P = dim theta, g = the exact gradient of the episode's
objective), while PES's variance depends on the number of unrolls.

Every system here has linear dynamics and a quadratic loss, so the exact gradient and
the exact variance of both estimators are known in closed form (for PES: the variance
of a quadratic form in the Gaussian noise of every unroll; see `exact_variances`). For
each number of unrolls J = T/K the script runs keras_es's `es_single` and `pes` over one
episode per pair (``stagger=False``, J windows of K steps, ``clip_outliers=None``), sums
each pair's J online estimates into its per-episode estimate, and measures the total
variance (trace of the covariance) of one pair's estimate over many pairs, with its
standard error. keras_es's convention: a window's loss is the sum of its per-step losses
and the estimate is the mean over pairs, so the variance of the mean of n pairs is the
per-pair value below divided by n.

Systems (``--systems``):

* ``independent``: step t's loss ``0.5 ||theta - a_t||^2`` with random targets
  (`keras_es.testing.MemorylessSystem`): per-unroll gradients independent of each
  other, the setting where PES's variance grows linearly in the number of unrolls.
* ``rnn_far``: a linear RNN ``s_t = A s_{t-1} + B theta`` (state 8, spectral radius
  0.99, P = 4) with loss ``0.5 ||s_t - y||^2``, evaluated far from its optimum
  (theta = 0), where every unroll's gradient points roughly the same way.
* ``rnn_near``: the same RNN at 90% of the way from 0 to its optimum theta*, where the
  per-unroll gradients largely cancel in the episode's total.

Usage::

    python examples/variance_vs_unrolls.py --quick --out results/variance_vs_unrolls.json

Writes the JSON (per system: the exact and measured variances of both estimators at
every number of unrolls, with z-scores) and a PNG of variance against unrolls beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import keras_es  # noqa: E402
from keras_es import testing  # noqa: E402
from keras_es.systems import LinearQuadraticSystem  # noqa: E402

SYSTEMS = ("independent", "rnn_far", "rnn_near")
TITLES = {"independent": "independent per-step gradients",
          "rnn_far": "linear RNN, far from its optimum",
          "rnn_near": "linear RNN, near its optimum"}
DIM = 4
SIGMA = 0.1
SETTINGS = {
    # quick: a few seconds; the same expectations at fewer unrolls and pairs.
    "quick": dict(horizon=16, unrolls=(1, 4, 16), pairs=4000, systems=("independent",)),
    "full": dict(horizon=64, unrolls=(1, 2, 4, 8, 16, 32, 64), pairs=20_000,
                 systems=SYSTEMS),
}


# ---------------------------------------------------------------------- systems
def linear_rnn(seed: int = 0, state_dim: int = 8, radius: float = 0.99) -> LinearQuadraticSystem:
    """A stable linear RNN with long memory: ``A = radius * Q`` (Q random orthogonal)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(state_dim, state_dim)))
    b = rng.normal(size=(state_dim, DIM)) / np.sqrt(state_dim)
    return LinearQuadraticSystem(A=radius * q, B=b, y=rng.normal(size=state_dim),
                                 s0=rng.normal(size=state_dim))


def linear_cross_gradients(system: LinearQuadraticSystem, theta, horizon: int) -> np.ndarray:
    """``G[t, tau] = d loss_t / d theta_tau`` ``[T, T, P]`` (float64): the gradient of
    step t's loss with respect to the theta used at step tau <= t (zero for tau > t)."""
    a, b = system.A.astype(np.float64), system.B.astype(np.float64)
    h, y = system.H.astype(np.float64), system.y.astype(np.float64)
    states = system.trajectory(theta, horizon)
    responses = [b]  # A^k B: how theta at one step moves the state k steps later
    for _ in range(horizon - 1):
        responses.append(a @ responses[-1])
    grads = np.zeros((horizon, horizon, b.shape[1]))
    for t in range(horizon):
        readout = h.T @ (h @ states[t] - y)
        for tau in range(t + 1):
            grads[t, tau] = responses[t - tau].T @ readout
    return grads


def linear_optimum(system: LinearQuadraticSystem, horizon: int) -> np.ndarray:
    """theta* minimizing the episode's summed loss (a linear least-squares problem)."""
    a, b, h = (m.astype(np.float64) for m in (system.A, system.B, system.H))
    free = system.trajectory(np.zeros(b.shape[1]), horizon)
    response, normal, rhs = np.zeros_like(b), np.zeros((b.shape[1],) * 2), np.zeros(b.shape[1])
    for t in range(horizon):
        response = a @ response + b  # d s_t / d theta for a constant theta
        normal += response.T @ h.T @ h @ response
        rhs += response.T @ h.T @ (h @ free[t] - system.y)
    return -np.linalg.solve(normal, rhs)


def make_system(name: str, horizon: int):
    """``(system, theta, cross gradients [T, T, P], description)``."""
    if name == "independent":
        targets = np.random.default_rng(0).normal(size=(horizon, DIM))
        theta = np.zeros(DIM)
        grads = np.zeros((horizon, horizon, DIM))
        grads[np.arange(horizon), np.arange(horizon)] = theta - targets
        return (testing.MemorylessSystem(targets), theta, grads,
                "loss_t = 0.5 ||theta - a_t||^2, random a_t: independent per-step gradients")
    system = linear_rnn()
    if name == "rnn_far":
        theta, where = np.zeros(DIM), "theta = 0, far from theta*"
    elif name == "rnn_near":
        theta, where = 0.9 * linear_optimum(system, horizon), "theta = 0.9 theta*, near it"
    else:
        raise ValueError(f"system={name!r} is invalid; expected one of {SYSTEMS}.")
    return (system, theta, linear_cross_gradients(system, theta, horizon),
            f"linear RNN (state 8, spectral radius 0.99, P = {DIM}), {where}")


# ---------------------------------------------------------------------- exact variances
def exact_variances(cross_gradients: np.ndarray, truncation_length: int) -> tuple[float, float]:
    """Exact total variance of one pair's per-episode estimate: ``(ES-Single, PES)``.

    With antithetic pairs on a quadratic loss, ``l_t(+) - l_t(-)`` is exactly twice the
    first-order term, so window j's credit is linear in the noises ``eps_1..eps_j`` of
    the unrolls so far and PES's per-episode estimate is a quadratic form
    ``sum_a z^T Q_a z e_a`` in the standardized noise ``z = eps / sigma`` of all J
    unrolls: ``g_a = sum_{i,k} z_{k,a} z_i . M[i, k]`` with
    ``M[i, k] = sum_{j >= max(i, k)} C[j, i]`` and ``C[j, i]`` the gradient of window
    j's loss with respect to window i's theta. ``Var(z^T Q z) = 2 ||sym(Q)||_F^2``.
    ES-Single is the one-unroll case: ``(P + 1) ||g||^2``.
    """
    horizon, _, dim = cross_gradients.shape
    windows = horizon // truncation_length
    blocks = cross_gradients.reshape(windows, truncation_length, windows, truncation_length,
                                     dim).sum(axis=(1, 3))                    # C[j, i]
    suffix = np.cumsum(blocks[::-1], axis=0)[::-1]                            # sum_{j >= m} C[j, i]
    later = np.maximum.outer(np.arange(windows), np.arange(windows))          # max(i, k)
    m = suffix[later, np.arange(windows)[:, None]]                            # M[i, k] [J, J, P]
    q = np.zeros((dim, windows, dim, windows, dim))
    for a in range(dim):
        q[a, :, a] = m.transpose(1, 0, 2)                                     # rows (k, a)
    q = q.reshape(dim, windows * dim, windows * dim)
    symmetric = 0.5 * (q + q.transpose(0, 2, 1))
    pes = float(2.0 * np.sum(symmetric ** 2))
    return testing.es_total_variance(cross_gradients.sum(axis=(0, 1))), pes


# ---------------------------------------------------------------------- measurement
def measure(method: str, system, theta, horizon: int, unrolls: int, pairs: int, seed: int,
            gradient: np.ndarray) -> dict:
    """keras_es's estimate over one episode per pair: total variance, its SE, bias z."""
    factory = keras_es.ESTIMATORS[method]
    estimator = factory(SIGMA, horizon // unrolls, horizon=horizon, stagger=False,
                        clip_outliers=None)
    totals, _ = testing.run_windows(estimator, system, theta, pairs, unrolls, seed)
    variance, se = testing.total_variance(totals)
    bias_z = testing.z_scores(totals, np.broadcast_to(gradient, totals.shape))
    return {"variance": variance, "se": se, "bias_z_max": float(np.max(np.abs(bias_z)))}


def run_system(name: str, config: dict, seed: int) -> dict:
    horizon = config["horizon"]
    system, theta, grads, description = make_system(name, horizon)
    gradient = grads.sum(axis=(0, 1))
    out = {"description": description, "theta": np.asarray(theta).tolist(),
           "gradient": gradient.tolist(),
           "es_reference": testing.es_total_variance(gradient),
           "unrolls": list(config["unrolls"]), "es_single": {}, "pes": {}}
    rows = {"es_single": [], "pes": []}
    for unrolls in config["unrolls"]:
        exact = dict(zip(("es_single", "pes"), exact_variances(grads, horizon // unrolls),
                         strict=True))
        for method in rows:
            row = measure(method, system, theta, horizon, unrolls, config["pairs"], seed,
                          gradient)
            row["exact"] = exact[method]
            row["z_vs_exact"] = (row["variance"] - exact[method]) / row["se"]
            rows[method].append(row)
    for method, values in rows.items():
        out[method] = {key: [v[key] for v in values] for key in values[0]}
    out["pes_over_es_single"] = [p / e for p, e in zip(out["pes"]["variance"],
                                                       out["es_single"]["variance"], strict=True)]
    return out


# ---------------------------------------------------------------------- output
def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["systems"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = results["systems"][name]
        x = np.asarray(r["unrolls"])
        ax.axhline(r["es_reference"], color="C0", ls="--", lw=1, label="(P + 1) ||g||^2")
        ax.plot(x, r["pes"]["exact"], color="C1", lw=1, label="PES, exact")
        for method, color, label in (("es_single", "C0", "ES-Single"), ("pes", "C1", "PES")):
            ax.errorbar(x, r[method]["variance"], yerr=2 * np.asarray(r[method]["se"]),
                        fmt="o", color=color, ms=5, capsize=2, label=f"{label}, measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("truncated unrolls per episode, T / K")
        ax.set_title(f"{name}: {TITLES[name]}", fontsize=10)
    axes[0][0].set_ylabel("total variance of one pair's estimate")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Variance against unrolls (T = {results['settings']['horizon']}, "
                 f"{results['settings']['pairs']} pairs, error bars 2 SE)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run (T = 16, 1/4/16 unrolls, 4000 pairs, 'independent').")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None)
    parser.add_argument("--horizon", type=int, default=None, help="T, steps per episode.")
    parser.add_argument("--unrolls", type=int, nargs="+", default=None,
                        help="Numbers of unrolls T/K to measure (each must divide T).")
    parser.add_argument("--pairs", type=int, default=None, help="Antithetic pairs per point.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results path.")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="PNG path (default: beside --out, or variance_vs_unrolls.png).")
    args = parser.parse_args(argv)
    config = dict(SETTINGS["quick" if args.quick else "full"])
    for name in ("systems", "horizon", "unrolls", "pairs"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    for name in ("horizon", "pairs"):
        if config[name] < 2:
            parser.error(f"--{name}={config[name]} is invalid; expected an integer >= 2.")
    bad = [u for u in config["unrolls"] if u <= 0 or config["horizon"] % u]
    if bad:
        parser.error(f"--unrolls={bad} is invalid; expected positive divisors of "
                     f"--horizon={config['horizon']}.")
    return args, config


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_args(argv)
    start = time.perf_counter()
    results = {"settings": {**{k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in config.items()},
                            "dim": DIM, "sigma": SIGMA, "seed": args.seed,
                            "quick": bool(args.quick)},
               "systems": {name: run_system(name, config, args.seed)
                           for name in config["systems"]}}
    results["seconds"] = round(time.perf_counter() - start, 1)

    for name, r in results["systems"].items():
        print(f"{name}: {r['description']}")
        print(f"  (P + 1) ||g||^2 = {r['es_reference']:.4g}")
        print(f"  {'T/K':>5}{'ES-Single':>12}{'z':>7}{'PES':>12}{'PES exact':>12}{'z':>7}"
              f"{'PES/ES-S':>10}")
        for i, unrolls in enumerate(r["unrolls"]):
            es, pes = r["es_single"], r["pes"]
            print(f"  {unrolls:>5}{es['variance'][i]:>12.4g}{es['z_vs_exact'][i]:>7.2f}"
                  f"{pes['variance'][i]:>12.4g}{pes['exact'][i]:>12.4g}"
                  f"{pes['z_vs_exact'][i]:>7.2f}{r['pes_over_es_single'][i]:>10.3f}")
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out
                              else pathlib.Path("variance_vs_unrolls.png"))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, plot_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{results['seconds']} s; plot: {plot_path}")
    return results


if __name__ == "__main__":
    main()
