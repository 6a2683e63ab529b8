"""What ESCallback costs inside ``model.fit``.

Writes ``benchmarks/results/callback_overhead.json``: for N in {8, 32} particles, the
wall time of one ``fit`` with `keras_es.ESCallback` against, measured in the same
process on the same model, data and steps, (a) one plain ``fit`` and (b) N + 1 plain
fits run one after another (what tuning N + 1 configurations by separate runs costs).
Target: fit + callback with N particles < half of N + 1 plain fits.

Model: MLP 784-32-32-10 on random data, batch 32, SGD with momentum; ES-Single tunes
the learning rate and momentum with K = 10. Every fit is timed after a warm-up fit of
the same configuration, so tracing is not counted twice for the baseline.

Two fit lengths: a short fit (2 epochs x 200 steps), where the callback's fixed costs
(tracing the particles' window and the re-traced train step) dominate, and a longer one
(5 epochs x 400 steps), closer to a real tuning run.

Usage: ``python benchmarks/callback_overhead.py [--fits 2x200 5x400] [--out PATH]``.
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


def parse_fit(text: str) -> tuple[int, int]:
    try:
        epochs, steps = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected EPOCHSxSTEPS, "
                                         "e.g. 2x200") from None
    if epochs <= 0 or steps <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected positive numbers")
    return epochs, steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fits", type=parse_fit, nargs="+", default=[(2, 200), (5, 400)],
                        help="Fit lengths as EPOCHSxSTEPS (batches per epoch).")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "callback_overhead.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = []
    for epochs, steps in args.fits:
        x = rng.normal(size=(32 * steps, 784)).astype("float32")
        y = rng.integers(0, 10, len(x))
        x_val, y_val = x[:1024], y[:1024]

        timed_fit(x, y, 1)  # warm-up: first-trace costs of the process
        plain = timed_fit(x, y, epochs)
        for n in args.n:
            def callback(n=n, x=x, y=y, x_val=x_val, y_val=y_val):
                return keras_es.ESCallback(
                    SPACE, keras_es.engine.SGD("lr", momentum="momentum"), train_data=(x, y),
                    meta_data=(x_val, y_val), num_particles=n, truncation_length=10,
                    batch_size=32, meta_batch_size=32)

            with_callback = timed_fit(x, y, epochs, [callback()])
            start = time.perf_counter()
            for _ in range(n + 1):
                timed_fit(x, y, epochs)
            sequential = time.perf_counter() - start
            ratio = with_callback / sequential
            cases.append({"n": n, "epochs": epochs, "steps_per_epoch": steps,
                          "fit_with_callback_s": with_callback, "plain_fit_s": plain,
                          "n_plus_one_plain_fits_s": sequential,
                          "ratio_to_plain_fit": with_callback / plain,
                          "ratio_to_n_plus_one_fits": ratio,
                          "target_ratio_to_n_plus_one_fits": 0.5, "met": ratio < 0.5})
            case = cases[-1]
            print(f"{epochs}x{steps} steps, N={n:<3} fit+callback {with_callback:.1f} s, "
                  f"plain fit {plain:.1f} s ({case['ratio_to_plain_fit']:.1f}x), N+1 plain "
                  f"fits {sequential:.1f} s (ratio {ratio:.2f}, target < 0.5)", flush=True)
    result = {"cases": cases, "config": {"batch_size": 32, "truncation_length": 10,
                                         "model": "MLP 784-32-32-10, SGD momentum"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
