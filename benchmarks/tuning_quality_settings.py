"""Which ESSearch settings `benchmarks/tuning_quality.py` runs: a sweep on held-out seeds.

Settings chosen on the seeds and split a benchmark reports would flatter it. This sweep
runs ES-Single (`keras_es.ESSearch`, particle engine) on the same three tasks at a 12x
budget, on seeds 100-104 (the benchmark uses 0-4), and scores each choice by retraining
it once and evaluating on the *validation* split (the benchmark scores on the test
split). Configurations are overrides of the benchmark's ES settings:

* ``base``: N = 8, sigma 0.1, K = S / 16, the outer rate from the planned outer steps,
  ``meta_objective="final"`` (the benchmark's setting before this sweep);
* ``s03``, ``s05``: sigma 0.3, 0.5; ``n4``: N = 4; ``w8``: K = S / 8;
* ``sum``: ``meta_objective="sum"`` (ESSearch's default), and ``sum_*`` combined with the
  above; ``sum_b2``: the outer Adam with ``beta_2=0.9`` instead of Keras's 0.999 (see
  docs/tuning-quality.md: a long search whose theta a run of large estimates pushed to
  the bottom of the learning-rate range stayed there under 0.999); ``sum_rank``:
  ``fitness_shaping="rank"`` (each pair's estimate weighted by the signed rank of its
  loss difference, so one pair whose twin stalls cannot outweigh the others).

    python benchmarks/tuning_quality_settings.py            # resumes from its JSON

Results: ``benchmarks/results/tuning_quality_settings.json`` (``runs``: one entry per
task/config/budget/seed; ``table``: mean validation loss per task and config).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tuning_quality as tq  # noqa: E402

CONFIGS = {
    "base": {}, "s03": {"sigma": 0.3}, "s05": {"sigma": 0.5}, "n4": {"num_particles": 4},
    "w8": {"windows": 8}, "sum": {"meta_objective": "sum"},
    "sum_s03": {"meta_objective": "sum", "sigma": 0.3},
    "sum_n4": {"meta_objective": "sum", "num_particles": 4},
    "sum_w8": {"meta_objective": "sum", "windows": 8},
    "sum_b2": {"meta_objective": "sum", "outer_beta_2": 0.9},
    "sum_rank": {"meta_objective": "sum", "fitness_shaping": "rank"},
}
BASE = {"num_particles": 8, "windows": 16, "sigma": None, "outer_learning_rate": None,
        "meta_objective": "final"}


def table(runs: dict) -> dict:
    out = {}
    for key, run in runs.items():
        task, config, _, _ = key.split("/")
        out.setdefault(task, {}).setdefault(config, []).append(run["val_loss"])
    return {task: {config: {"mean_val_loss": float(np.mean([v if v is not None else np.inf
                                                              for v in values])),
                            "n": len(values)}
                   for config, values in sorted(configs.items())}
            for task, configs in out.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tasks", nargs="+", default=list(tq.TASKS), choices=list(tq.TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path,
                        default=tq.RESULTS / "tuning_quality_settings.json")
    args = parser.parse_args(argv)
    tq.set_threads(args.threads)
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = saved.get("runs", {})
    tasks = {name: tq.Task(name) for name in args.tasks}
    for seed in args.seeds:
        for name, task in tasks.items():
            for config in args.configs:
                key = f"{name}/{config}/{args.budget}/{seed}"
                if key in runs:
                    continue
                settings = {**BASE, **CONFIGS[config]}
                start = time.perf_counter()
                budget = args.budget * task.run_steps
                with tempfile.TemporaryDirectory() as directory:
                    track = tq.es_search(task, "es_single", seed, budget, directory, settings)
                entry = tq._at_budget(track, budget)
                values = entry[1] if entry else {}
                runs[key] = {**task.retrain(values, seed, split="val"), "values": values,
                             "wall_s": time.perf_counter() - start}
                print(key, runs[key]["val_loss"], values, flush=True)
                _write(args.out, runs)
    return _write(args.out, runs)


def _write(path: pathlib.Path, runs: dict) -> dict:
    result = {"benchmark": "tuning_quality_settings", "base": BASE, "configs": CONFIGS,
              "score": "validation loss of one retrain at the chosen values",
              "machine": {"tensorflow": tf.__version__, "cpus": os.cpu_count(),
                          "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")},
              "runs": runs, "table": table(runs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, path)
    return result


if __name__ == "__main__":
    main()
