"""Measured bias and variance of every estimator against exact answers.

Writes ``benchmarks/results/estimator_statistics.json``:

* ``oracle``: z-scores of each estimator x objective against the exact gradient of a
  linear-dynamics / quadratic-loss oracle (T = 12, K = 5, staggered starts), including
  truncated ES, which must be far off;
* ``variance``: ES-Single's and PES's measured total variance over their closed forms
  for an episode of T = 16 steps cut into 16, 4 or 1 windows, and PES over ES-Single
  (the baseline measured in the same run).

Usage: ``python benchmarks/estimator_statistics.py [--pairs 20000] [--out PATH]``.
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

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def oracle_z_scores(pairs: int, seed: int) -> dict:
    system = testing.oracle_system()
    theta = testing.ORACLE_THETA
    cases = testing.oracle_estimators(0.1, 5, 12)
    cases["truncated_es"] = lambda obj: keras_es.truncated_es(0.1, 5, horizon=12,
                                                              objective=obj)
    out = {}
    for name, factory in cases.items():
        for objective in ("sum", "final"):
            estimator = factory(objective)
            windows = 1 if name == "full_es" else 6
            surrogate = [1.0, 0.5] if estimator.guided is not None else None
            totals, _ = testing.run_windows(estimator, system, theta, pairs, windows, seed,
                                            surrogate=surrogate)
            expected = testing.expected_totals(estimator, system, theta, pairs, windows)
            z = testing.z_scores(totals, expected)
            out[f"{name}/{objective}"] = [round(float(v), 3) for v in z]
    return out


def variance_ratios(pairs: int, seed: int) -> dict:
    p, horizon = 4, 16
    targets = np.random.default_rng(0).normal(size=(horizon, p))
    grads = -targets
    system = testing.MemorylessSystem(targets)
    out = {}
    for k in (1, 4, 16):
        windows = horizon // k
        row = {"windows": windows}
        for name, factory in (("es_single", keras_es.es_single), ("pes", keras_es.pes)):
            estimator = factory(0.1, k, horizon=horizon, stagger=False)
            totals, _ = testing.run_windows(estimator, system, np.zeros(p), pairs, windows,
                                            seed)
            variance, se = testing.total_variance(totals)
            theory = (testing.es_total_variance(grads.sum(0)) if name == "es_single" else
                      testing.pes_total_variance(grads.reshape(windows, k, p).sum(1)))
            row[name] = {"variance": variance, "closed_form": theory,
                         "ratio_to_closed_form": variance / theory,
                         "z": (variance - theory) / se}
        row["pes_over_es_single"] = row["pes"]["variance"] / row["es_single"]["variance"]
        out[f"K={k}"] = row
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000, help="Pairs for the oracle.")
    parser.add_argument("--variance-pairs", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path,
                        default=RESULTS / "estimator_statistics.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = {"oracle_z_scores": oracle_z_scores(args.pairs, args.seed),
              "variance": variance_ratios(args.variance_pairs, args.seed),
              "config": {"pairs": args.pairs, "variance_pairs": args.variance_pairs,
                         "seed": args.seed}}
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, z in result["oracle_z_scores"].items():
        print(f"{name:<32} z = {z}")
    for k, row in result["variance"].items():
        es, pes = row["es_single"], row["pes"]
        print(f"{k:<5} windows={row['windows']:<3} "
              f"es_single/closed={es['ratio_to_closed_form']:.4f} "
              f"pes/closed={pes['ratio_to_closed_form']:.4f} "
              f"pes/es_single={row['pes_over_es_single']:.3f}")
    return result


if __name__ == "__main__":
    main()
