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

# The benchmark's ES-Single settings (ESSearch's defaults, K = S / 16) and each remedy.
SETTINGS = {"num_particles": 8, "windows": 16, "sigma": None, "outer_learning_rate": None,
            "meta_objective": "sum"}
REMEDIES = {"plain": {}, "beta_2": {"outer_beta_2": 0.9},
            "rank": {"fitness_shaping": "rank"}, "clip10": {"clip_outliers": 10.0}}


def search(task: tq.Task, seed: int, budget_runs: int, variant: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        tuner = tq.es_tuner(task, "es_single", seed, budget_runs * task.run_steps, directory,
                            {**SETTINGS, **REMEDIES[variant]})
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
    parser.add_argument("--variants", nargs="+", default=list(REMEDIES), choices=list(REMEDIES))
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
