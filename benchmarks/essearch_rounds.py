"""ESSearch round cost: the particle engine path against the per-trial path.

A round of an ES search is N trials of K steps each. On the per-trial path every trial
builds the hypermodel, loads its particle's checkpoint and runs ``fit`` for K steps; on
the engine path (`keras_es.tuner.engine_rounds`) the round's first trial trains all N
particles in one compiled window and the others only report. Measured on the digits
MLP (scikit-learn's bundled 8x8 digits, Dense 32-32-10, SGD learning rate and momentum
tuned), N = 8, K = 50, in one process:

* ``engine_window_s``: the engine's own time for N x K particle steps (the search's
  compiled window, called directly; median of repeats);
* ``engine_round_s``: a round of `keras_es.ESSearch` on the engine path, from its first
  trial's start to the next round's (keras-tuner's bookkeeping of N trials included;
  round 0, which traces and compiles, is reported apart as ``engine_first_round_s``);
* ``per_trial_round_s``: the same search with ``execution="per_trial"``.

Targets: ``engine_round_s <= 1.5 x engine_window_s`` and
``per_trial_round_s >= 5 x engine_round_s``.

Usage: ``python benchmarks/essearch_rounds.py [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_es  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def data():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return x[:1400], y[:1400], x[1400:], y[1400:]


def build_model(hp):
    model = keras.Sequential([keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.SGD(
        hp.Float("learning_rate", 1e-3, 0.5, sampling="log", default=0.02),
        momentum=hp.Float("momentum", 0.0, 0.95, default=0.5)),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class TimedSearch(keras_es.ESSearch):
    """Records when each trial starts, with its round, and keeps the engine."""

    def run_trial(self, trial, *args, **kwargs):
        meta = self.oracle.trial_metadata(trial.trial_id)
        self.starts.append((meta["round"], time.perf_counter()))
        if self.engine is not None:
            self.kept_engine = self.engine
        return super().run_trial(trial, *args, **kwargs)


def run_search(execution: str, rounds: int, n: int, k: int) -> dict:
    x, y, xv, yv = data()
    tuner = TimedSearch(build_model, objective="val_loss", max_trials=rounds * n,
                        num_particles=n, truncation_length=k, horizon=4 * k, stagger=False,
                        sigma=0.3, seed=0, directory=tempfile.mkdtemp(), project_name="p",
                        execution=execution)
    tuner.starts, tuner.kept_engine = [], None
    start = time.perf_counter()
    tuner.search(x, y, validation_data=(xv, yv), batch_size=32, verbose=0)
    end = time.perf_counter()
    firsts = {}
    for r, t in tuner.starts:
        firsts.setdefault(r, t)
    marks = [firsts[r] for r in sorted(firsts)] + [end]
    durations = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"first_round_s": durations[0], "round_s": durations[1:],
            "search_s": end - start, "outer_steps": len(tuner.oracle.history),
            "engine": tuner.kept_engine}


def engine_window(engine, n: int, k: int, repeats: int) -> list[float]:
    """The engine's own time for one window of N x K particle steps."""
    window = tf.function(engine._window_fn, jit_compile=False, autograph=False)
    state = engine.population.init(tf.zeros([n, 2], tf.int32))
    theta = tf.constant(np.tile([engine.starts[x] for x in engine.names], [n, 1]), tf.float32)
    keys = tf.constant(np.stack(np.meshgrid(np.arange(n), np.arange(k)), -1)[..., ::-1],
                       tf.int32)
    window(state, theta, keys)[1].numpy()  # trace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        window(state, theta, keys)[1].numpy()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "essearch_rounds.json")
    parser.add_argument("--quick", action="store_true", help="Fewer rounds (a smoke run).")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args(argv)
    n, k = args.n, args.k
    engine_rounds, per_trial_rounds = (3, 2) if args.quick else (10, 3)
    engine = run_search("engine", engine_rounds, n, k)
    window = engine_window(engine.pop("engine"), n, k, 3 if args.quick else 10)
    per_trial = run_search("per_trial", per_trial_rounds, n, k)
    per_trial.pop("engine")
    median = statistics.median
    result = {
        "benchmark": "essearch_rounds", "n": n, "k": k, "model": "digits MLP 64-32-32-10",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")},
        "engine_window_s": median(window), "engine_window_all_s": window,
        "engine_round_s": median(engine["round_s"]), "engine_round_all_s": engine["round_s"],
        "engine_first_round_s": engine["first_round_s"],
        "per_trial_round_s": median(per_trial["round_s"] + [per_trial["first_round_s"]]),
        "per_trial_round_all_s": [per_trial["first_round_s"], *per_trial["round_s"]],
        "engine_search_s": engine["search_s"], "per_trial_search_s": per_trial["search_s"],
    }
    result["ratio_round_to_window"] = result["engine_round_s"] / result["engine_window_s"]
    result["speedup_over_per_trial"] = result["per_trial_round_s"] / result["engine_round_s"]
    result["targets"] = {"round_to_window_at_most_1.5": result["ratio_round_to_window"] <= 1.5,
                         "speedup_at_least_5": result["speedup_over_per_trial"] >= 5.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"engine window {result['engine_window_s'] * 1e3:.1f} ms, engine round "
          f"{result['engine_round_s'] * 1e3:.1f} ms (x{result['ratio_round_to_window']:.2f}), "
          f"first round {result['engine_first_round_s']:.1f} s, per-trial round "
          f"{result['per_trial_round_s']:.2f} s (engine x{result['speedup_over_per_trial']:.1f} "
          f"faster); targets {result['targets']}")
    return result


if __name__ == "__main__":
    main()
