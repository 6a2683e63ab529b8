"""Particles across replicas: what crosses devices, and throughput against devices.

Writes ``benchmarks/results/distributed.json`` with two parts:

* ``communication``: the tensors one outer step of a `keras_es.MetaTrainer` under
  ``MirroredStrategy`` (2 logical CPU devices) sends between replicas, counted in its
  traced step by `keras_es.distribute.collective_payloads` (every collective op's
  per-replica input, and every edge between ops placed on different replicas'
  devices), for MLPs 784-w-w-10 of growing width w. Next to it: the bytes one
  all-reduce of the model's weights would move (what data-parallel training exchanges
  per step), and the copy of the reduced ``dim``-vector to the other replicas' theta,
  which the outer optimizer's mirrored update makes and the graph leaves unplaced
  (computed, not counted).
* ``throughput``: particle-steps per second (one particle, one optimizer step) of the
  same trainer on 1, 2 and 4 logical CPU devices, each in its own process (logical
  devices are fixed when TensorFlow starts), with and without XLA inside the replicas,
  and ratios against the one-device run (``MirroredStrategy`` over one device, and no
  strategy at all) of the same invocation. Logical CPU devices share the machine's
  cores, so these ratios measure the cost of sharding, not a speed-up: on separate
  GPUs or TPU cores each replica brings its own compute.

This machine may be shared: each device count runs twice (order 1 2 4 4 2 1), windows
go round-robin over the cases inside a process, and the best window is reported (the
median is kept), with particle-steps per second of wall time and per second of this
process's CPU time (less sensitive to other processes taking cores), the process's CPU
cores used and the load average during each window.

Usage: ``python benchmarks/distributed.py [--quick] [--seconds 3] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
WIDTHS = (16, 128, 512, 2048)
DEVICES = (1, 2, 4)
NUM_PARTICLES, TRUNCATION, BATCH, THROUGHPUT_WIDTH = 32, 10, 32, 64


# ---------------------------------------------------------------------- child side
def _configure(devices):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _trainer(strategy, width, num_particles, jit_compile=False, normalize=False):
    import keras
    import numpy as np

    import keras_es

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=2048).astype(np.int32)
    space = keras_es.SearchSpace([keras_es.Hyperparameter("lr", 0.05, "log"),
                                  keras_es.Hyperparameter("momentum", 0.9, "logit")])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((784,)),
                                  keras.layers.Dense(width, activation="relu"),
                                  keras.layers.Dense(width, activation="relu"),
                                  keras.layers.Dense(10)])
        population = keras_es.Population(
            model, num_particles, space,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras_es.engine.SGD("lr", momentum="momentum"))
        system = keras_es.KerasSystem(population, (x, y), batch_size=BATCH)
        optimizer = keras.optimizers.Adam(0.01)
    estimator = keras_es.es_single(0.1, TRUNCATION, horizon=200, normalize=normalize)
    trainer = keras_es.MetaTrainer(system, estimator, space, num_particles,
                                   outer_optimizer=optimizer, seed=0, strategy=strategy,
                                   jit_compile=jit_compile)
    parameters = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    return trainer, parameters


def child_communication(args):
    import tensorflow as tf

    from keras_es import distribute

    devices = _configure(2)
    strategy = tf.distribute.MirroredStrategy(devices)
    cases = []
    for width, normalize in [(w, False) for w in WIDTHS] + [(WIDTHS[0], True)]:
        trainer, parameters = _trainer(strategy, width, 16, normalize=normalize)
        entries = distribute.collective_payloads(trainer)
        collectives = [e for e in entries if e["kind"] == "collective"]
        copies = [e for e in entries if e["kind"] == "copy"]
        replicas = strategy.num_replicas_in_sync
        per_replica = sum(e["bytes"] for e in collectives) // replicas
        # The mirrored theta's update reads the reduced estimate on the first replica.
        update_copy = trainer.dim * 4 * (replicas - 1)
        cases.append({
            "width": width, "parameters": parameters, "normalize": normalize,
            "num_particles": 16, "replicas": replicas, "dim": trainer.dim,
            "collective_ops": [{k: e[k] for k in ("op", "shape", "dtype", "bytes")}
                               for e in collectives],
            "collective_bytes_per_replica": per_replica,
            "collective_bytes_all_replicas": sum(e["bytes"] for e in collectives),
            "implicit_copy_bytes": sum(e["bytes"] for e in copies),
            "mirrored_update_bytes_computed": update_copy,
            "bytes_per_outer_step": sum(e["bytes"] for e in collectives)
            + sum(e["bytes"] for e in copies) + update_copy,
            "weights_all_reduce_bytes_per_replica": parameters * 4,
        })
    return {"cases": cases}


def _load():
    return os.getloadavg()[0]


def child_throughput(args):
    import tensorflow as tf

    devices = _configure(args.devices)
    strategies = [("mirrored", tf.distribute.MirroredStrategy(devices))]
    if args.devices == 1:
        strategies.append(("none", tf.distribute.get_strategy()))
    cases = []
    for name, strategy in strategies:
        for jit_compile in (False, True):
            trainer, parameters = _trainer(strategy, THROUGHPUT_WIDTH, NUM_PARTICLES,
                                           jit_compile=jit_compile)
            start = time.perf_counter()
            trainer.step()  # compile
            compile_s = time.perf_counter() - start
            trainer.step()
            cases.append({"strategy": name, "devices": args.devices,
                          "jit_compile": jit_compile,
                          "replicas": strategy.num_replicas_in_sync,
                          "parameters": parameters,
                          "compile_and_first_step_s": round(compile_s, 2),
                          "trainer": trainer, "windows": []})
    # Windows round-robin over the cases, so a change in the machine's load during the
    # run falls on all of them alike.
    for _ in range(args.windows):
        for case in cases:
            trainer, steps = case["trainer"], 0
            load = _load()
            cpu, begin = time.process_time(), time.perf_counter()
            while time.perf_counter() - begin < args.seconds:
                trainer.step()
                steps += 1
            wall, cpu = time.perf_counter() - begin, time.process_time() - cpu
            particle_steps = steps * NUM_PARTICLES * TRUNCATION
            case["windows"].append({
                "particle_steps_per_s": round(particle_steps / wall, 1),
                "particle_steps_per_cpu_s": round(particle_steps / cpu, 1),
                "own_cpu_cores": round(cpu / wall, 2), "load_average_1min": round(load, 2)})
    for case in cases:
        del case["trainer"]
    return {"runs": cases}


# ---------------------------------------------------------------------- parent side
def _spawn(args, *child_args):
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "out.json")
        command = [sys.executable, __file__, "--child", *child_args, "--child-out", out,
                   "--seconds", str(args.seconds), "--windows", str(args.windows)]
        subprocess.run(command, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (smoke run)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind = args.child[0]
        if kind == "throughput":
            args.devices = int(args.child[1])
            result = child_throughput(args)
        else:
            result = child_communication(args)
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return 0

    if args.quick:
        args.seconds, args.windows = 0.5, 2
    import tensorflow as tf

    communication = _spawn(args, "communication")
    # Each device count runs in its own process (logical devices are fixed when
    # TensorFlow starts), twice, in the order 1 2 4 4 2 1, so drift in the machine's load
    # does not favour one of them; each case reports its best window over both rounds.
    merged = {}
    for devices in DEVICES + DEVICES[::-1]:
        for run in _spawn(args, "throughput", str(devices))["runs"]:
            key = (run["strategy"], run["devices"], run["jit_compile"])
            merged.setdefault(key, {**run, "windows": []})["windows"].extend(run["windows"])
    throughput = list(merged.values())
    for run in throughput:
        for metric in ("particle_steps_per_s", "particle_steps_per_cpu_s"):
            values = [w[metric] for w in run["windows"]]
            run[metric] = max(values)
            run[metric + "_median"] = round(statistics.median(values), 1)
    for jit_compile in (False, True):
        same = [r for r in throughput if r["jit_compile"] == jit_compile]
        one = next(r for r in same if r["strategy"] == "mirrored" and r["devices"] == 1)
        none = next(r for r in same if r["strategy"] == "none")
        for r in same:
            for metric in ("particle_steps_per_s", "particle_steps_per_cpu_s"):
                r[f"{metric}_ratio_vs_mirrored_1_device"] = round(r[metric] / one[metric], 3)
                r[f"{metric}_ratio_vs_no_strategy"] = round(r[metric] / none[metric], 3)
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "tensorflow": tf.__version__},
        "settings": {"num_particles": NUM_PARTICLES, "truncation_length": TRUNCATION,
                     "batch_size": BATCH, "throughput_model": f"784-{THROUGHPUT_WIDTH}-"
                     f"{THROUGHPUT_WIDTH}-10", "seconds_per_window": args.seconds,
                     "windows": args.windows, "quick": bool(args.quick)},
        "communication": communication["cases"],
        "throughput": throughput,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for case in communication["cases"]:
        print(f"w={case['width']:5d} params={case['parameters']:8d} "
              f"normalize={case['normalize']!s:5} bytes/outer step="
              f"{case['bytes_per_outer_step']} (weights all-reduce would be "
              f"{case['weights_all_reduce_bytes_per_replica']} per replica)")
    for r in throughput:
        print(f"{r['strategy']:8s} devices={r['devices']} xla={r['jit_compile']!s:5} "
              f"{r['particle_steps_per_s']:9.1f} particle-steps/s "
              f"(x{r['particle_steps_per_s_ratio_vs_mirrored_1_device']} vs 1 device), "
              f"{r['particle_steps_per_cpu_s']:9.1f} per CPU-second "
              f"(x{r['particle_steps_per_cpu_s_ratio_vs_mirrored_1_device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
