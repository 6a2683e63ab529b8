"""The collapsed ES-Single search of `benchmarks/tuning_quality.py`, replayed with remedies.

In the benchmark, ES-Single on the CNN task at seed 2 and a 30x budget ended at a
learning rate of 6e-5, whose retrain did not train (test loss 2.15). This script runs
that search again (same task, seed, budget and settings: ESSearch's defaults,
`meta_objective="sum"`, N = 8, K = S / 16) and, on the same search, three remedies:

* ``beta_2``: the outer Adam at the budget's rate with ``beta_2=0.9`` (Keras's 0.999
  keeps the second moment of a run of large estimates for hundreds of steps);
* ``rank``: ``fitness_shaping="rank"`` (each pair's utility bounded);
* ``clip10``: ``clip_outliers=10`` (a pair beyond 10x the running scale clipped).

For each: every outer step's values and gradient (``history``), the final values, and
a retrain at them scored on the validation split.

    python benchmarks/tuning_quality_collapse.py    # ~5 min on 2 cores

Results: ``benchmarks/results/tuning_quality_collapse.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import tuning_quality as tq  # noqa: E402

import keras_es  # noqa: E402

VARIANTS = ("plain", "beta_2", "rank", "clip10")


def search(task: tq.Task, seed: int, budget_runs: int, variant: str) -> list[dict]:
    length = task.run_steps // 16
    trials = budget_runs * task.run_steps // length
    settings = {"truncation_length": length, "horizon": task.run_steps}
    if variant in ("rank", "clip10"):
        option = ({"fitness_shaping": "rank"} if variant == "rank"
                  else {"clip_outliers": 10.0})
        settings = {"estimator": keras_es.estimators.es_single(
            0.1, length, task.run_steps, objective="sum", **option)}
    else:
        settings.update(estimator="es_single", meta_objective="sum")
    if variant == "beta_2":
        estimator = keras_es.estimators.resolve("es_single", truncation_length=length,
                                                horizon=task.run_steps)
        settings["outer_optimizer"] = tq.budget_adam(estimator, 8, trials, beta_2=0.9)
    with tempfile.TemporaryDirectory() as directory:
        tuner = keras_es.ESSearch(task.hypermodel, objective="val_loss", max_trials=trials,
                                  num_particles=8, seed=seed, execution="engine",
                                  directory=directory, project_name="p", **settings)
        tuner.search(task.x, task.y, batch_size=tq.BATCH,
                     validation_data=(task.xv, task.yv), verbose=0)
        return [{"outer_step": h["outer_step"], "values": h["values"],
                 "gradient": h["gradient"], "val_loss": h.get("val_loss"),
                 "valid_pairs": h["valid_pairs"], "clipped_pairs": h["clipped_pairs"]}
                for h in tuner.oracle.history]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="cnn", choices=list(tq.TASKS))
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path,
                        default=tq.RESULTS / "tuning_quality_collapse.json")
    args = parser.parse_args(argv)
    tq.set_threads(args.threads)
    task = tq.Task(args.task)
    result = {"benchmark": "tuning_quality_collapse", "task": args.task, "seed": args.seed,
              "budget": args.budget, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
              "variants": {}}
    for variant in args.variants:
        history = search(task, args.seed, args.budget, variant)
        final = history[-1]["values"]
        result["variants"][variant] = {
            "final": final, "retrain": task.retrain(final, args.seed, split="val"),
            "history": history}
        print(variant, final, result["variants"][variant]["retrain"], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
