"""ESOracle (ES-Single, PES) against keras-tuner's RandomSearch, BayesianOptimization
and Hyperband on the 29-hyperparameter MLP, at equal total training steps.

Every oracle tunes the same hypermodel (``examples/fashion_mnist_29_hparams.py``: a
learning rate and a momentum per weight/bias block and 5 layer widths) and stops once
its trials have taken ``--budget`` optimizer steps in total (counted batch by batch).
A baseline trial trains one model for the horizon T; an ES trial advances one particle
by K steps. The score of an oracle is the best validation loss any of its trials
reported (for ES: any particle at any window end; for Hyperband: any bracket).

    python benchmarks/tuner_comparison.py            # digits, 3 seeds (~35 min, 2 shared cores)
    python benchmarks/tuner_comparison.py --quick    # smoke run
    python benchmarks/tuner_comparison.py --dataset fashion_mnist

Writes ``benchmarks/results/tuner_comparison.json``:
``{"budget_steps": int, "oracles": {name: {"best_val_loss": [per seed]}}}`` and a PNG of
best-so-far validation loss against training steps (median over seeds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_es  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "fashion_mnist_29_hparams",
    os.path.join(HERE, "..", "examples", "fashion_mnist_29_hparams.py"))
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)

ORACLES = ("es_single", "pes", "random", "bayesian", "hyperband")


class _StepCounter(keras.callbacks.Callback):
    """Counts training batches. keras-tuner deep-copies callbacks for every trial, so
    the count lives on the class, keyed by run."""

    steps: dict = {}

    def __init__(self, key):
        super().__init__()
        self.key = key

    def on_train_batch_end(self, batch, logs=None):
        _StepCounter.steps[self.key] = _StepCounter.steps.get(self.key, 0) + 1


def _budgeted(base):
    """A tuner class that stops its search once ``budget`` training steps are spent and
    records (steps so far, trial score) after every trial."""

    class Budgeted(base):
        def __init__(self, *args, budget, key, **kwargs):
            self.budget, self.key, self.curve = budget, key, []
            super().__init__(*args, **kwargs)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            steps = _StepCounter.steps.get(self.key, 0)
            score = self.oracle.trials[trial.trial_id].score
            finite = score is not None and np.isfinite(score)
            self.curve.append((steps, float(score) if finite else None))
            if steps >= self.budget:
                # keras-tuner stops when max_trials trials exist.
                self.oracle.max_trials = len(self.oracle.trials)

    return Budgeted


def run_one(name, seed, data, args, directory):
    x, y, x_val, y_val = data
    key = f"{name}-{seed}"
    _StepCounter.steps[key] = 0
    counter = _StepCounter(key)
    horizon, truncation = args.horizon, args.truncation_length
    common = dict(objective="val_loss", directory=directory, project_name=key, overwrite=True,
                  budget=args.budget, key=key)
    fit = dict(batch_size=32, validation_data=(x_val, y_val),
               validation_batch_size=len(x_val), verbose=0, callbacks=[counter])
    if name in ("es_single", "pes"):
        tuner = _budgeted(keras_es.ESSearch)(
            lambda hp: task.build_model(hp, input_dim=x.shape[1]),
            max_trials=10 ** 6, estimator=name, num_particles=args.num_particles,
            sigma=args.sigma, truncation_length=truncation, horizon=horizon,
            outer_learning_rate=args.outer_learning_rate, seed=seed, **common)
        tuner.search(x, y, **fit)
        history = tuner.oracle.history
        extra = {"outer_steps": len(history), "mean_theta": tuner.oracle.mean_values()}
    else:
        # Full trials are long: a traced graph is faster than eager steps here.
        def build(hp):
            return task.build_model(hp, input_dim=x.shape[1], run_eagerly=False)

        if name == "random":
            tuner = _budgeted(kt.RandomSearch)(build, max_trials=10 ** 6, seed=seed, **common)
        elif name == "bayesian":
            tuner = _budgeted(kt.BayesianOptimization)(build, max_trials=10 ** 6, seed=seed,
                                                       **common)
        else:
            tuner = _budgeted(kt.Hyperband)(build, max_epochs=horizon // truncation, factor=3,
                                            hyperband_iterations=10 ** 3, seed=seed, **common)
        # One "epoch" is K steps of a repeating, shuffled dataset; a trial trains T steps
        # (Hyperband: its bracket's number of K-step epochs).
        dataset = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
                   .repeat().batch(32))
        fit.pop("batch_size")
        tuner.search(dataset, epochs=horizon // truncation, steps_per_epoch=truncation, **fit)
        extra = {}
    curve, best = [], np.inf
    for steps, score in tuner.curve:
        if score is not None:
            best = min(best, score)
        curve.append((steps, best if np.isfinite(best) else None))
    return {"best_val_loss": float(best), "curve": curve,
            "steps": _StepCounter.steps[key], "trials": len(tuner.oracle.trials), **extra}


def plot(results, budget, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, budget, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        curves = []
        for run in runs:
            steps = np.array([s for s, _ in run["curve"]], float)
            values = np.array([np.nan if v is None else v for _, v in run["curve"]], float)
            idx = np.searchsorted(steps, grid, side="right") - 1
            curves.append(np.where(idx >= 0, values[np.clip(idx, 0, None)], np.nan))
        median = np.nanmedian(np.array(curves), axis=0) if curves else grid * np.nan
        ax.plot(grid, median, label=name)
    ax.set_xlabel("training steps (all trials)")
    ax.set_ylabel("best validation loss so far (median over seeds)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=6000, help="training steps per oracle")
    parser.add_argument("--horizon", type=int, default=200, help="T, steps per training run")
    parser.add_argument("--truncation-length", type=int, default=25, help="K, steps per ES trial")
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--outer-learning-rate", type=float, default=0.1)
    parser.add_argument("--oracles", default=",".join(ORACLES))
    parser.add_argument("--output", default=os.path.join(HERE, "results", "tuner_comparison"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.horizon, args.num_particles = 2, 600, 100, 4
    names = [n for n in args.oracles.split(",") if n]
    for n in names:
        if n not in ORACLES:
            raise ValueError(f"--oracles has {n!r}; expected names from {ORACLES}.")

    data = task.load_data(args.dataset)
    directory = tempfile.mkdtemp(prefix="keras_es_tuner_comparison_")
    results, runtime = {}, {}
    try:
        for name in names:
            results[name], runtime[name] = [], 0.0
            for seed in range(1, args.seeds + 1):
                start = time.time()
                run = run_one(name, seed, data, args, directory)
                runtime[name] += time.time() - start
                results[name].append(run)
                extra = (f", {run['outer_steps']} outer steps" if "outer_steps" in run else "")
                print(f"{name:10s} seed {seed}: best val_loss {run['best_val_loss']:.4f} "
                      f"({run['trials']} trials, {run['steps']} steps{extra}, "
                      f"{time.time() - start:.0f} s)", flush=True)
                shutil.rmtree(os.path.join(directory, f"{name}-{seed}"), ignore_errors=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    out = {"budget_steps": int(args.budget),
           "oracles": {n: {"best_val_loss": [r["best_val_loss"] for r in runs]}
                       for n, runs in results.items()}}
    with open(args.output + ".json", "w") as f:
        json.dump(out, f, indent=2)
    plot(results, args.budget, args.output + ".png",
         f"29 hyperparameters, {args.dataset}, budget {args.budget} steps")
    print(f"\n{'oracle':10s} {'median':>8s}  per seed                      runtime")
    for n, runs in results.items():
        losses = [r["best_val_loss"] for r in runs]
        print(f"{n:10s} {np.median(losses):8.4f}  "
              f"{', '.join(f'{v:.4f}' for v in losses):28s}  {runtime[n]:.0f} s")
    for n, runs in results.items():
        if "mean_theta" in runs[0]:
            print(f"{n} mean theta (seed 1): {runs[0]['mean_theta']}")
    print(f"Wrote {args.output}.json and .png")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
