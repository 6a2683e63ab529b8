"""Particles sharded over tf.distribute replicas reproduce the one-device run.

Logical devices must be configured before TensorFlow initializes, so every
distributed run happens in a subprocess (`tests/distribute/distributed_runs.py`); the
one-device references run in the same subprocess or, for the multi-worker test, here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es import distribute, testing

pytestmark = pytest.mark.slow  # subprocesses with several logical devices

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RUNS = os.path.join(HERE, "distributed_runs.py")
sys.path.insert(0, HERE)
import distributed_runs  # noqa: E402

# Sums over pairs are taken in another order on several replicas: float32 rounding only.
RTOL, ATOL = 1e-4, 1e-5


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _run(args, out, timeout=600, **env):
    subprocess.run([sys.executable, RUNS, *args, "--out", str(out)], env=_env(**env),
                   check=True, timeout=timeout, capture_output=True)
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    """2 and 4 logical CPU devices, each in its own process, run side by side."""
    procs, outs = {}, {}
    for devices, flags in ((2, ["--checkpoints", "--callback", "--payloads"]), (4, ["--xla"])):
        scratch = tmp_path_factory.mktemp(f"mirrored{devices}")
        outs[devices] = scratch / "out.json"
        procs[devices] = subprocess.Popen(
            [sys.executable, RUNS, "mirrored", "--devices", str(devices), *flags,
             "--out", str(outs[devices])],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for devices, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-3000:]
        with open(outs[devices]) as f:
            results[devices] = json.load(f)
    return results


def _assert_same(got, expected):
    np.testing.assert_allclose(got["theta"], expected["theta"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=RTOL, atol=ATOL)
    assert got["valid_pairs"] == expected["valid_pairs"]
    assert got["diverged_pairs"] == expected["diverged_pairs"]


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("system", ["oracle", "keras", "guided", "cnn"])
def test_mirrored_matches_one_device(mirrored_runs, devices, system):
    runs = mirrored_runs[devices]
    _assert_same(runs[f"{system}/{devices}"], runs[f"{system}/1"])
    # theta moved: the comparison is not between two untouched starting points.
    assert np.abs(np.subtract(runs[f"{system}/1"]["theta"][-1],
                              runs[f"{system}/1"]["theta"][0])).max() > 1e-3


@pytest.mark.parametrize("devices", [2, 4])
def test_diverging_particles_on_some_replicas(mirrored_runs, devices):
    """Non-finite particles are excluded on their own replica: the same pairs are left
    out as on one device, and theta stays finite and on the same trajectory."""
    runs = mirrored_runs[devices]
    _assert_same(runs[f"poisoned/{devices}"], runs["poisoned/1"])
    assert sum(runs["poisoned/1"]["diverged_pairs"]) > 0
    assert min(runs["poisoned/1"]["valid_pairs"]) > 0
    assert np.all(np.isfinite(runs[f"poisoned/{devices}"]["theta"]))


def test_checkpoints_restore_across_strategies(mirrored_runs):
    runs = mirrored_runs[2]
    _assert_same(runs["keras/restore_2_to_1"], runs["keras/1"])
    _assert_same(runs["keras/restore_1_to_2"], runs["keras/1"])


def test_callback_inherits_the_fitted_models_strategy(mirrored_runs):
    """ESCallback in a fit under MirroredStrategy shards its particles over the same
    replicas and tunes theta as it does in a one-device fit."""
    runs = mirrored_runs[2]
    assert runs["callback/2"]["replicas"] == 2 and runs["callback/1"]["replicas"] == 1
    np.testing.assert_allclose(runs["callback/2"]["theta"], runs["callback/1"]["theta"],
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(runs["callback/2"]["es_lr"], runs["callback/1"]["es_lr"],
                               rtol=RTOL)
    assert runs["callback/1"]["es_lr"][-1] != 0.05  # it tuned something


def test_only_small_tensors_cross_replicas(mirrored_runs):
    """Per replica and step, whatever the model size: one all-reduce of every pair's
    loss difference and validity (2 x pairs floats, for clip_outliers) and one of
    dim + 7 floats; no implicit copies between replicas (the data and weights are
    mirrored)."""
    small, large = (mirrored_runs[2][f"payloads/{h}"] for h in (8, 1024))
    assert large["parameters"] > 100 * small["parameters"]
    for run in (small, large):
        assert [e["kind"] for e in run["entries"]] == ["collective"] * 4  # 2 per replica
        # dim = 2; 8 particles = 4 pairs
        assert sorted({e["bytes"] for e in run["entries"]}) == [2 * 4 * 4, (2 + 7) * 4]
    assert small["entries"] == large["entries"]


def test_xla_inside_replicas_matches(mirrored_runs):
    runs = mirrored_runs[4]
    # Compared with XLA on one device: XLA fuses and rounds differently from graph
    # mode, and loss differences divided by sigma^2 magnify that over a few steps.
    _assert_same(runs["keras/4_xla"], runs["keras/1_xla"])


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_matches_single_process(tmp_path):
    """Two worker processes (MultiWorkerMirroredStrategy, TF_CONFIG on localhost) run
    the engine's own loop and reproduce the single-process trajectory; the chief's
    checkpoint restores into a single-process trainer."""
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        out = tmp_path / f"worker{index}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, RUNS, "worker", "--out", str(out), "--scratch",
             str(tmp_path / f"scratch{index}")],
            env=_env(TF_CONFIG=json.dumps(config)), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)))
        os.makedirs(tmp_path / f"scratch{index}", exist_ok=True)
    results = []
    for out, proc in procs:
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err.decode()[-3000:]
        with open(out) as f:
            results.append(json.load(f))

    assert [r["replicas"] for r in results] == [2, 2]
    default = tf.distribute.get_strategy()
    oracle = distributed_runs.trajectory(distributed_runs.oracle_trainer(default))
    reference = distributed_runs.keras_trainer(default)
    keras_run = distributed_runs.trajectory(reference)
    for result in results:
        _assert_same(result["oracle/workers"], oracle)
        _assert_same(result["keras/workers"], keras_run)

    chief_checkpoint = results[0]["checkpoint"]
    assert os.path.exists(chief_checkpoint + ".index")
    assert not os.listdir(tmp_path / "scratch1")  # the other worker left nothing behind
    restored = distributed_runs.keras_trainer(default)
    restored.restore(chief_checkpoint)
    assert int(restored.outer_step.numpy()) == 2
    tail = distributed_runs.trajectory(restored, distributed_runs.STEPS - 2)
    np.testing.assert_allclose(tail["theta"], keras_run["theta"][2:], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- in-process
def test_bad_num_particles_for_replicas():
    class FakeStrategy(tf.distribute.Strategy):
        def __init__(self):  # only num_replicas_in_sync is read before the error
            pass

        num_replicas_in_sync = 4

    with pytest.raises(ValueError, match=r"num_particles=12 is invalid .* 4 replicas.*"
                                         r"multiple of 8"):
        distribute.check_strategy(FakeStrategy(), 12)
    with pytest.raises(ValueError, match="strategy='mirrored' is invalid"):
        distribute.check_strategy("mirrored", 8)


def test_optimizer_from_another_strategy_scope_is_rejected():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    optimizer = keras.optimizers.SGD(0.1)  # created outside strategy.scope()
    with pytest.raises(ValueError, match="outside the scope of strategy=OneDeviceStrategy"):
        keras_es.MetaTrainer(testing.oracle_system(), keras_es.pes(0.1, 2), [0.0, 0.0], 4,
                             outer_optimizer=optimizer, strategy=strategy)


def test_one_device_strategy_matches_default():
    """A strategy with one replica runs the same code path as no strategy."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    default = distributed_runs.trajectory(
        distributed_runs.oracle_trainer(tf.distribute.get_strategy()))
    one = distributed_runs.trajectory(distributed_runs.oracle_trainer(strategy))
    np.testing.assert_array_equal(one["theta"], default["theta"])


# ---------------------------------------------------------------------- TPU readiness
@pytest.mark.parametrize("builder", ["oracle", "keras"])
def test_replica_step_is_tpu_shaped(builder):
    """Static shapes (XLA compiles the replica step with a tensor replica id), no
    Python callbacks, no float64, and a graph whose size does not depend on the number
    of particles (no host-side Python per particle)."""
    trainer = distributed_runs.BUILDERS[builder](tf.distribute.get_strategy())
    report = distribute.check_tpu_compatible(trainer)
    assert not {"PyFunc", "EagerPyFunc"} & set(report["op_types"])
    assert {"StatelessWhile", "StatelessRandomNormalV2"} <= set(report["op_types"])
    if builder == "oracle":
        estimator = keras_es.pes(0.1, 3, horizon=7, objective="final", normalize=True)
        larger = keras_es.MetaTrainer(testing.oracle_system(), estimator,
                                      testing.ORACLE_THETA, num_particles=64, seed=5)
        assert distribute.check_tpu_compatible(larger)["num_ops"] == report["num_ops"]


class _PythonCallbackSystem(keras_es.UnrolledSystem):
    def init(self, keys):
        return tf.zeros([keys.shape[0]])

    def step(self, state, theta, keys):
        loss = tf.py_function(lambda t: tf.reduce_sum(t ** 2, -1), [theta], tf.float32)
        return state + 1.0, tf.reshape(loss, [theta.shape[0]]), None


def test_python_callback_is_reported():
    trainer = keras_es.MetaTrainer(_PythonCallbackSystem(), keras_es.es_single(0.1, 2),
                                   [0.0], num_particles=4)
    with pytest.raises(ValueError, match="_PythonCallbackSystem"):
        distribute.check_tpu_compatible(trainer)
