"""What ESCallback costs inside ``model.fit``, and where that time goes.

Writes ``benchmarks/results/callback_overhead.json``. For each model, fit length and N
in {8, 32} particles, the wall time of one ``fit`` with `keras_es.ESCallback` against
one plain ``fit`` of the same model, data and steps, measured in the same process,
interleaved (plain, N = 8, N = 32, plain, ...) and taken as the median of a few repeats
(a fresh model and callback every time). Reported as ratios to one plain fit and to
N + 1 plain fits (what tuning N + 1 configurations by separate runs costs). Targets:
fit + callback at most 0.4 of N + 1 plain fits at N = 8 and 0.2 at N = 32.

The callback's part of each fit is split into its one-off costs:

* ``data_setup_s``: the particles' data read into tensors and copied into variables;
* ``population_s``: building the `keras_es.Population`;
* ``particles_init_s``: `keras_es.MetaTrainer` built (traces and runs the particles'
  initial state);
* ``other_setup_s``: the rest of ``on_train_begin`` (reading the compiled optimizer,
  checking the data against the model, serving tuned values to the train step);
* ``trace_window_s``: tracing the window function (`MetaTrainer.concrete_step`);
* ``first_window_extra_s``: the first window's run beyond a steady one (TensorFlow's
  graph optimization and set-up, or XLA's compilation);
* ``later_windows_extra_s``: the later windows' time beyond the steady one (mostly the
  first restart of the particles, whose function is prepared when it first runs:
  ES-Single restarts them after the fit's last window);

and its steady costs: ``window_ms`` (median wall time of a window after the first),
``windows_s`` (every window, the first at the steady cost) and ``batch_hooks_s`` (the
callback's per-batch work besides windows). ``model_fit_s`` is the rest of the fit:
the model's own training, and what the callback costs it indirectly (garbage
collection of the traced graphs, caches a window evicts). ``step_with_callback_ms`` is
a step of the fit with the callback over its epochs after the first (windows included,
one-off costs not), and ``steady_ratio_to_n_plus_one_fits`` the limit of the ratio for
a long fit: that step over (N + 1) plain steps, timed likewise.

Models (``--models``; 2 CPU cores, K = 10, batch 32, SGD with momentum, the callback
tunes ``["learning_rate", "momentum"]`` by their Keras names with ES-Single):

* ``mlp``: MLP 784-32-32-10 on random data;
* ``conv1d``: Conv1D(16, 5) - MaxPool1D - Conv1D(16, 5) - global average pool -
  Dense(4) on generated sequences (64 steps; four classes of noisy sine waves);
* ``conv2d``: Conv2D(16, 3) - MaxPool2D - Dense(10) on scikit-learn's 8x8 digits.

Run with ``TF_ENABLE_ONEDNN_OPTS=0`` (what CI and most CPUs have: convolutional
particles then run vectorized, not stacked). Timings depend on the machine and its
load: compare ratios measured in one run.

Usage: ``python benchmarks/callback_overhead.py [--models mlp conv1d conv2d]
[--fits short=2x150 long=5x400] [--n 8 32] [--repeats 3] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_es  # noqa: E402
from keras_es.callback import es_callback  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TARGETS = {8: 0.4, 32: 0.2}
BATCH, K = 32, 10
DEFAULT_FITS = {"mlp": ["short=2x150", "long=5x400"], "conv1d": ["short=2x150"],
                "conv2d": ["short=2x150"]}


# ---------------------------------------------------------------------- models and data
def _compile(model: keras.Model) -> keras.Model:
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def mlp_model() -> keras.Model:
    return _compile(keras.Sequential([
        keras.Input((784,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]))


def conv1d_model() -> keras.Model:
    return _compile(keras.Sequential([
        keras.Input((64, 1)), keras.layers.Conv1D(16, 5, activation="relu"),
        keras.layers.MaxPooling1D(2), keras.layers.Conv1D(16, 5, activation="relu"),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(4)]))


def conv2d_model() -> keras.Model:
    return _compile(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)]))


def data(name: str, rows: int, rng: np.random.Generator):
    """``(x, y)`` with ``rows`` examples for model ``name``."""
    if name == "mlp":
        return rng.normal(size=(rows, 784)).astype("float32"), rng.integers(0, 10, rows)
    if name == "conv1d":
        y = rng.integers(0, 4, rows)
        t = np.arange(64) / 64.0
        phase = rng.uniform(0, 2 * np.pi, (rows, 1))
        x = np.sin(2 * np.pi * (y[:, None] + 1) * 2 * t + phase)
        x = x + 0.5 * rng.normal(size=x.shape)
        return x[..., None].astype("float32"), y
    from sklearn.datasets import load_digits  # an extra: examples and dev

    digits = load_digits()
    index = rng.integers(0, len(digits.target), rows)
    return (digits.images[index] / 16.0).astype("float32")[..., None], digits.target[index]


MODELS = {"mlp": mlp_model, "conv1d": conv1d_model, "conv2d": conv2d_model}


# ---------------------------------------------------------------------- instrumentation
class Timings:
    """Wall times of the callback's parts during one fit (see the module docstring)."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.windows: list[float] = []
        self.hooks = 0.0
        self.trace = 0.0

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds


def _timed(timings: Timings, name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings.add(name, time.perf_counter() - start)
    return wrapper


@contextlib.contextmanager
def instrumented(timings: Timings):
    """Times the callback's parts by wrapping the functions it calls; restored after."""
    step = keras_es.MetaTrainer.step
    originals = [(es_callback, "as_tensors"), (es_callback, "KerasSystem"),
                 (es_callback.engine, "Population"), (es_callback, "MetaTrainer"),
                 (es_callback.ESCallback, "on_train_begin"),
                 (es_callback.ESCallback, "on_train_batch_begin"),
                 (es_callback.ESCallback, "on_train_batch_end")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]

    def timed_step(trainer):
        if not timings.windows:  # the first window: tracing apart from running
            start = time.perf_counter()
            trainer.concrete_step()
            timings.trace = time.perf_counter() - start
        start = time.perf_counter()
        try:
            return step(trainer)
        finally:
            timings.windows.append(time.perf_counter() - start)

    names = ["as_tensors", "data_variables", "population", "particles_init", "train_begin",
             "batch_begin", "batch_end"]
    for (owner, attribute, function), name in zip(saved, names, strict=True):
        setattr(owner, attribute, _timed(timings, name, function))
    keras_es.MetaTrainer.step = timed_step
    try:
        yield timings
    finally:
        for owner, attribute, function in saved:
            setattr(owner, attribute, function)
        keras_es.MetaTrainer.step = step


def breakdown(timings: Timings) -> dict:
    """The callback's one-off and steady costs of one fit, in seconds."""
    p, windows = timings.parts, timings.windows
    steady = statistics.median(windows[1:]) if len(windows) > 1 else 0.0
    first = windows[0] if windows else 0.0  # its tracing is timed apart
    inner = sum(p.get(k, 0.0) for k in ("as_tensors", "data_variables", "population",
                                         "particles_init"))
    one_off = {"data_setup_s": p.get("as_tensors", 0.0) + p.get("data_variables", 0.0),
               "population_s": p.get("population", 0.0),
               "particles_init_s": p.get("particles_init", 0.0),
               "other_setup_s": p.get("train_begin", 0.0) - inner,
               "trace_window_s": timings.trace,
               "first_window_extra_s": first - steady if windows else 0.0,
               "later_windows_extra_s": sum(windows[1:]) - steady * len(windows[1:])}
    hooks = p.get("batch_begin", 0.0) + p.get("batch_end", 0.0) - sum(windows) - timings.trace
    steady_costs = {"windows": len(windows), "window_ms": 1e3 * steady,
                    "windows_s": steady * len(windows), "batch_hooks_s": hooks}
    return {"one_off": one_off, "one_off_s": sum(one_off.values()), "steady": steady_costs,
            "callback_s": sum(one_off.values()) + steady * len(windows) + hooks}


# ---------------------------------------------------------------------- fits
class EpochTimes(keras.callbacks.Callback):
    """Wall time of every epoch (the first includes tracing the train step)."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def plain_fit(build, x, y, epochs: int) -> tuple[float, list[float]]:
    keras.utils.set_random_seed(0)
    model, epoch_times = build(), EpochTimes()
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[epoch_times])
    return time.perf_counter() - start, epoch_times.times


def callback_fit(build, x, y, epochs: int, n: int) -> tuple[float, dict, dict]:
    keras.utils.set_random_seed(0)
    model = build()
    callback = keras_es.ESCallback(["learning_rate", "momentum"], train_data=(x, y),
                                   meta_data=(x[:1024], y[:1024]), num_particles=n,
                                   truncation_length=K, batch_size=BATCH,
                                   meta_batch_size=BATCH)
    epoch_times = EpochTimes()
    with instrumented(Timings()) as timings:
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[callback, epoch_times])
        wall = time.perf_counter() - start
    population = callback.trainer.system.population
    choices = {"execution": "stacked" if population.stacked else "vectorized",
               "jit_compile": callback.trainer.jit_compile}
    parts = breakdown(timings)
    parts["epoch_times_s"] = epoch_times.times
    return wall, parts, choices


def _median_breakdown(runs: list[dict]) -> dict:
    """Every number the median over repeats."""
    def median(values):
        if isinstance(values[0], dict):
            return {k: median([v[k] for v in values]) for k in values[0]}
        return statistics.median(values)
    return median(runs)


def run_case(model: str, label: str, epochs: int, steps: int, ns, repeats: int,
             rng: np.random.Generator) -> list[dict]:
    build = MODELS[model]
    x, y = data(model, BATCH * steps, rng)
    plain_fit(build, x, y, 1)  # warm-up: the process's first-trace costs
    plains, epoch_steps, runs = [], [], {n: [] for n in ns}
    for _ in range(repeats):  # interleaved, so slow drifts of the machine hit all alike
        wall, epoch_times = plain_fit(build, x, y, epochs)
        plains.append(wall)
        epoch_steps += [t / steps for t in epoch_times[1:]]
        for n in ns:
            runs[n].append(callback_fit(build, x, y, epochs, n))
    plain = statistics.median(plains)
    plain_step = statistics.median(epoch_steps) if epoch_steps else plain / (epochs * steps)
    cases = []
    for n in ns:
        with_callback = statistics.median(r[0] for r in runs[n])
        # The fit's steps after its first epoch: windows, hooks and every indirect cost
        # (garbage collection, caches the windows evict), none of the one-off ones.
        later = [t / steps for r in runs[n] for t in r[1].pop("epoch_times_s")[1:]]
        step = statistics.median(later) if later else with_callback / (epochs * steps)
        parts = _median_breakdown([r[1] for r in runs[n]])
        ratio = with_callback / ((n + 1) * plain)
        cases.append({
            "model": model, "fit": label, "epochs": epochs, "steps_per_epoch": steps,
            "n": n, **runs[n][0][2], "repeats": repeats,
            "fit_with_callback_s": with_callback, "fit_with_callback_runs_s":
            [r[0] for r in runs[n]], "plain_fit_s": plain, "plain_fit_runs_s": plains,
            "plain_step_ms": 1e3 * plain_step, "n_plus_one_plain_fits_s": (n + 1) * plain,
            **parts, "model_fit_s": with_callback - parts["callback_s"],
            "step_with_callback_ms": 1e3 * step,
            "ratio_to_plain_fit": with_callback / plain, "ratio_to_n_plus_one_fits": ratio,
            "steady_ratio_to_n_plus_one_fits": step / ((n + 1) * plain_step),
            "target_ratio_to_n_plus_one_fits": TARGETS.get(n),
            "met": None if n not in TARGETS else ratio <= TARGETS[n]})
        c = cases[-1]
        print(f"{model:6s} {label:5s} {epochs}x{steps} N={n:<2d} fit+callback "
              f"{with_callback:5.1f} s = {c['ratio_to_plain_fit']:4.1f} x plain "
              f"{plain:4.2f} s = {ratio:.2f} of N+1 fits (target {TARGETS.get(n)}; "
              f"{'met' if c['met'] else 'not met'}); one-off {parts['one_off_s']:.1f} s "
              f"(trace {parts['one_off']['trace_window_s']:.1f}, first window +"
              f"{parts['one_off']['first_window_extra_s']:.1f}), "
              f"{parts['steady']['windows']} windows x {parts['steady']['window_ms']:.0f} ms; "
              f"steady ratio {c['steady_ratio_to_n_plus_one_fits']:.2f}", flush=True)
    return cases


def parse_fit(text: str) -> tuple[str, int, int]:
    """``LABEL=EPOCHSxSTEPS`` (or ``EPOCHSxSTEPS``) -> ``(label, epochs, steps)``."""
    label, _, shape = text.rpartition("=")
    try:
        epochs, steps = (int(v) for v in shape.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected [LABEL=]EPOCHSxSTEPS,"
                                         " e.g. short=2x150") from None
    if epochs <= 0 or steps <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected positive numbers")
    return label or shape, epochs, steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["mlp", "conv1d", "conv2d"])
    parser.add_argument("--fits", type=parse_fit, nargs="+", default=None,
                        help="[LABEL=]EPOCHSxSTEPS (batches per epoch); default: short=2x150 "
                             "for every model and long=5x400 for the MLP.")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "callback_overhead.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    cases = []
    for model in args.models:
        fits = args.fits or [parse_fit(f) for f in DEFAULT_FITS[model]]
        for label, epochs, steps in fits:
            cases += run_case(model, label, epochs, steps, args.n, args.repeats,
                              np.random.default_rng(0))
    result = {"cases": cases, "config": {
        "batch_size": BATCH, "truncation_length": K, "estimator": "es_single",
        "tune": ["learning_rate", "momentum"], "optimizer": "SGD(0.01, momentum=0.9)",
        "meta_data": "the first 1,024 training examples, meta batches of 32",
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "cpu_count": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - start}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
