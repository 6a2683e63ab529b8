"""What ESCallback costs inside ``model.fit``.

Writes ``benchmarks/results/callback_overhead.json``: for N in {8, 32} particles, the
wall time of one ``fit`` with `keras_es.ESCallback` against, measured in the same
process on the same model, data and steps, (a) one plain ``fit`` and (b) N + 1 plain
fits run one after another (what tuning N + 1 configurations by separate runs costs).
Target: fit + callback with N particles < half of N + 1 plain fits.

Model: MLP 784-32-32-10 on random data, batch 32, SGD with momentum; ES-Single tunes
the learning rate and momentum with K = 10. Every fit is timed after a warm-up fit of
the same configuration, so tracing is not counted twice for the baseline.

Usage: ``python benchmarks/callback_overhead.py [--epochs 2] [--steps 200] [--out PATH]``.
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

import keras_es  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SPACE = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.01, "log"),
                              keras_es.Hyperparameter("momentum", 0.9, "logit")])


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def timed_fit(x, y, epochs, callbacks=()) -> float:
    model = build(0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="Batches per epoch.")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "callback_overhead.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * args.steps, 784)).astype("float32")
    y = rng.integers(0, 10, len(x))
    x_val, y_val = x[:1024], y[:1024]

    timed_fit(x, y, 1)  # warm-up: first-trace costs of the process
    plain = timed_fit(x, y, args.epochs)
    cases = []
    for n in args.n:
        def callback(n=n):
            return keras_es.ESCallback(
                SPACE, keras_es.engine.SGD("lr", momentum="momentum"), train_data=(x, y),
                meta_data=(x_val, y_val), num_particles=n, truncation_length=10,
                batch_size=32, meta_batch_size=32)

        with_callback = timed_fit(x, y, args.epochs, [callback()])
        start = time.perf_counter()
        for _ in range(n + 1):
            timed_fit(x, y, args.epochs)
        sequential = time.perf_counter() - start
        cases.append({"n": n, "fit_with_callback_s": with_callback, "plain_fit_s": plain,
                      "n_plus_one_plain_fits_s": sequential,
                      "ratio_to_plain_fit": with_callback / plain,
                      "ratio_to_n_plus_one_fits": with_callback / sequential,
                      "target_ratio_to_n_plus_one_fits": 0.5,
                      "met": with_callback / sequential < 0.5})
    result = {"cases": cases, "config": {"epochs": args.epochs, "steps_per_epoch": args.steps,
                                         "batch_size": 32, "truncation_length": 10,
                                         "model": "MLP 784-32-32-10, SGD momentum"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for case in cases:
        print(f"N={case['n']:<3} fit+callback {case['fit_with_callback_s']:.1f} s, plain fit "
              f"{plain:.1f} s ({case['ratio_to_plain_fit']:.1f}x), N+1 plain fits "
              f"{case['n_plus_one_plain_fits_s']:.1f} s "
              f"(ratio {case['ratio_to_n_plus_one_fits']:.2f}, target < 0.5)")
    return result


if __name__ == "__main__":
    main()
