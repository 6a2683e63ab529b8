"""ESOracle / ESTuner / ESSearch: keras-tuner integration of the ES estimators."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf

import keras_es
from keras_es import noise
from keras_es.tuner.oracle import PREFIX

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "oracle_search_script.py")


# ---------------------------------------------------------------------- helpers
def _space():
    hp = kt.HyperParameters()
    hp.Float("lr", 1e-4, 1.0, sampling="log", default=0.01)
    hp.Float("decay", 1e-4, 0.5, sampling="reverse_log", default=0.45)
    hp.Float("dropout", 0.0, 0.5, default=0.25)
    hp.Int("units", 8, 64, step=8, default=32)
    hp.Choice("activation", ["relu", "tanh"], default="tanh")
    hp.Boolean("batch_norm", default=True)
    hp.Fixed("epochs", 3)
    with hp.conditional_scope("activation", ["relu"]):
        hp.Float("leak", 0.01, 0.3, default=0.1)
    return hp


def _oracle(**kwargs):
    args = dict(objective="val_loss", max_trials=200, num_particles=4, sigma=0.3,
                truncation_length=5, horizon=20, seed=7, stagger=False,
                hyperparameters=_space())
    args.update(kwargs)
    oracle = keras_es.ESOracle(**args)
    oracle._set_project_dir(kwargs.pop("directory", "/tmp/unused"), "p")
    return oracle


def _values(oracle, trial):
    """A trial's hyperparameter values and, under ``es/``, ESOracle's metadata for it
    (kept out of the values keras-tuner shows)."""
    meta = oracle.trial_metadata(trial.trial_id)
    return {**trial.hyperparameters.values, **{PREFIX + k: v for k, v in meta.items()}}


def _run_round(oracle, loss_fn, tuner="t0"):
    """Creates, scores and ends every trial of the current round (no training); each
    returned trial has ``es_values``, its values with ESOracle's metadata."""
    plan_round = oracle._es["round_index"] if oracle._es else 0
    trials = []
    while True:
        trial = oracle.create_trial(tuner)
        if trial.status != "RUNNING":
            break
        values = _values(oracle, trial)
        if values[PREFIX + "round"] != plan_round:
            # Already the next round's first trial: give it back for the next call.
            oracle.ongoing_trials[tuner] = trial
            break
        trial.es_values = values  # as the tuner saw it (past rounds keep less metadata)
        oracle.update_trial(trial.trial_id, {"val_loss": loss_fn(values)})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
        trials.append(trial)
    return trials


def _quadratic(values):
    return (np.log10(values["lr"]) + 1.0) ** 2 + (values["dropout"] - 0.1) ** 2


@pytest.fixture
def tmp_oracle(tmp_path):
    def make(**kwargs):
        oracle = _oracle(**kwargs)
        oracle._set_project_dir(str(tmp_path), "p")
        return oracle
    return make


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "full_es"}, "estimator='full_es'"),
    ({"num_particles": 3}, "num_particles=3"),
    ({"sigma": 0.0}, "sigma=0.0"),
    ({"horizon": 12, "truncation_length": 5}, "horizon=12"),
    ({"unit": "batches"}, "unit='batches'"),
    ({"meta_objective": "mean"}, "meta_objective='mean'"),
    ({"reassign_after": -1.0}, "reassign_after=-1.0"),
    ({"per_episode": "units"}, "per_episode='units'"),
    ({"outer_optimizer": "adam"}, "outer_optimizer='adam'"),
    ({"objective": ["val_loss", "loss"]}, "single objective"),
])
def test_bad_arguments_raise_before_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _oracle(**kwargs)


def test_tuner_needs_es_oracle(tmp_path):
    with pytest.raises(ValueError, match="expected a keras_es.ESOracle"):
        keras_es.ESTuner(kt.oracles.RandomSearchOracle(objective="val_loss", max_trials=1),
                         lambda hp: None, directory=str(tmp_path))


# ---------------------------------------------------------------------- hyperparameters
def test_trials_get_plain_decoded_values(tmp_oracle):
    oracle = tmp_oracle()
    trial = oracle.create_trial("t0")
    values = trial.hyperparameters.values
    # Fixed stays out of theta; the inactive conditional child is not sent.
    assert oracle._es["config"]["names"] == ["lr", "decay", "dropout", "units", "activation",
                                             "batch_norm", "leak"]
    # A Choice is drawn from its categorical distribution; the conditional child is
    # sent only when its parent's drawn value activates it.
    assert values["activation"] in ("relu", "tanh")
    assert ("leak" in values) == (values["activation"] == "relu")
    assert values["epochs"] == 3
    assert 1e-4 <= values["lr"] <= 1.0 and 1e-4 <= values["decay"] <= 0.5
    assert values["units"] % 8 == 0 and 8 <= values["units"] <= 64
    for name in ("lr", "decay", "dropout"):
        assert type(values[name]) is float
    assert type(values["units"]) is int and type(values["batch_norm"]) is bool
    # The mean theta decodes back to the declared defaults.
    mean = oracle.mean_values()
    assert mean["lr"] == pytest.approx(0.01, rel=1e-5)
    assert mean["decay"] == pytest.approx(0.45, rel=1e-5)
    assert mean["dropout"] == pytest.approx(0.25, rel=1e-5)
    assert (mean["units"], mean["activation"], mean["batch_norm"]) == (32, "tanh", True)
    json.dumps(oracle.get_state(), allow_nan=False)


def test_twins_share_initialization_and_data_keys(tmp_oracle):
    oracle = tmp_oracle()
    trials = _run_round(oracle, _quadratic)
    by_particle = {t.es_values[PREFIX + "particle"]: t.es_values for t in trials}
    assert sorted(by_particle) == [0, 1, 2, 3]
    for p in range(2):
        plus, minus = by_particle[2 * p], by_particle[2 * p + 1]
        assert plus["lr"] != minus["lr"]
        assert plus[PREFIX + "init_seed"] == minus[PREFIX + "init_seed"]
        assert plus[PREFIX + "data_seed"] == minus[PREFIX + "data_seed"]
    assert by_particle[0][PREFIX + "init_seed"] != by_particle[2][PREFIX + "init_seed"]


def test_update_is_the_estimator_cores(tmp_oracle):
    """One credited round with SGD outer steps: every particle got theta0 +/- eps_p with
    eps_p drawn by keras_es.noise, and theta1 = theta0 - lr * g with the pair formula
    g = mean_p (L+ - L-) eps_p / (2 sigma^2)."""
    outer_lr = 0.05
    oracle = tmp_oracle(outer_optimizer=keras.optimizers.SGD(outer_lr))
    reported, values, theta0 = {}, {}, []

    def loss(v):
        if not theta0:
            theta0.append(oracle.theta.astype(np.float64))
        i = v[PREFIX + "particle"]
        reported[i], values[i] = _quadratic(v), v
        return reported[i]

    _run_round(oracle, loss)
    theta0 = theta0[0]
    assert len(reported) == 4
    eps = 0.3 * noise.normal_rows(
        noise.pair_seeds(7, noise.STREAM_PERTURBATION, tf.range(2), tf.zeros([2], tf.int32)),
        len(theta0)).numpy().astype(np.float64)  # 9: one logit per Choice/Boolean value
    for p in range(2):
        for sign, i in ((1.0, 2 * p), (-1.0, 2 * p + 1)):
            expected = oracle._decode(theta0 + sign * eps[p])
            for name in ("lr", "decay", "dropout"):
                assert values[i][name] == pytest.approx(expected[name], rel=1e-5)
            assert values[i]["units"] == expected["units"]
    g = sum((reported[2 * p] - reported[2 * p + 1]) * eps[p] for p in range(2)) / (
        2 * 0.3 ** 2 * 2)
    np.testing.assert_allclose(oracle.theta, theta0 - outer_lr * g, rtol=1e-5, atol=1e-6)
    assert oracle.history[0]["valid_pairs"] == 2


@pytest.mark.slow
def test_search_descends_and_holds_architecture_within_episodes(tmp_oracle):
    oracle = tmp_oracle(estimator="pes", outer_learning_rate=0.1)
    start = _quadratic({"lr": 0.01, "dropout": 0.25})
    held = {}
    for _ in range(30):
        for trial in _run_round(oracle, _quadratic):
            v = trial.es_values
            key = (v[PREFIX + "particle"], v[PREFIX + "episode"])
            arch = (v["units"], v["activation"], v["batch_norm"])
            assert held.setdefault(key, arch) == arch  # PES redraws, the shape stays
            assert bool(v[PREFIX + "checkpoint_in"]) == (v[PREFIX + "window"] > 0)
    assert _quadratic(oracle.mean_values()) < 0.5 * start
    assert oracle.history[-1]["outer_step"] == 30
    assert max(e for _, e in held) >= 6  # episodes of 4 windows restarted


def test_non_finite_loss_invalidates_the_pair_and_restarts_it(tmp_oracle):
    oracle = tmp_oracle(max_consecutive_failed_trials=1)
    _run_round(oracle, _quadratic)

    def diverge_particle_1(values):
        return float("nan") if values[PREFIX + "particle"] == 1 else _quadratic(values)

    trials = _run_round(oracle, diverge_particle_1)  # no RuntimeError: not a failure
    assert {oracle.trials[t.trial_id].status for t in trials} == {"COMPLETED"}
    assert oracle.history[-1]["valid_pairs"] == 1
    assert oracle.history[-1]["diverged_pairs"] == 1
    assert np.all(np.isfinite(oracle.theta))
    nxt = oracle._es["round"]["meta"]
    assert nxt["0"]["checkpoint_in"] == "" and nxt["0"]["episode"] == 1
    assert nxt["2"]["checkpoint_in"] != "" and nxt["2"]["episode"] == 0
    json.dumps(oracle.get_state(), allow_nan=False)


def test_idle_while_a_round_is_out_and_state_round_trips(tmp_oracle):
    oracle = tmp_oracle()
    for tuner in ("a", "b", "c", "d"):
        assert oracle.create_trial(tuner).status == "RUNNING"
    assert oracle.create_trial("e").status == "IDLE"
    saved = json.dumps(oracle.get_state(), allow_nan=False)
    twin = _oracle()
    twin._set_project_dir("/tmp/unused", "p")
    twin.trials = oracle.trials
    twin.set_state(json.loads(saved))
    assert twin._es == oracle._es
    np.testing.assert_array_equal(twin.theta, oracle.theta)
    with pytest.raises(ValueError, match="num_particles=6 does not match"):
        other = _oracle(num_particles=6)
        other.trials = oracle.trials
        other.set_state(json.loads(saved))


# ---------------------------------------------------------------------- real trials
class _Probe(kt.HyperModel):
    """Reports, with each trial's objective, the optimizer state it started from."""

    def build(self, hp):
        model = keras.Sequential([keras.Input((3,)),
                                  keras.layers.Dense(hp.Int("units", 2, 6, default=4)),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(hp.Float("lr", 1e-3, 0.5, sampling="log",
                                                    default=0.05),
                                           momentum=hp.Float("momentum", 0.0, 0.99,
                                                             default=0.9)),
                      loss="mse", run_eagerly=True)
        return model

    def fit(self, hp, model, *args, **kwargs):
        start = {"start_iteration": float(model.optimizer.iterations.numpy()),
                 "start_lr": float(model.optimizer.learning_rate.numpy()),
                 "start_velocity": float(sum(np.abs(v.numpy()).sum()
                                             for v in model.optimizer.variables
                                             if len(v.shape) > 0))}
        history = model.fit(*args, **kwargs)
        return {**{k: v[-1] for k, v in history.history.items()}, **start}


@pytest.mark.slow
def test_trials_continue_particles_with_their_optimizer_state(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = x @ np.array([1.0, -2.0, 0.5], np.float32)
    tuner = keras_es.ESSearch(_Probe(), objective="val_loss", max_trials=14, num_particles=4,
                              truncation_length=3, horizon=6, seed=1, directory=str(tmp_path),
                              project_name="p")
    tuner.search(x[:48], y[:48], validation_data=(x[48:], y[48:]), batch_size=8, verbose=0)
    trials = tuner.oracle.trials.values()
    assert len(trials) == 14 and all(t.status == "COMPLETED" for t in trials)
    for trial in trials:
        v = _values(tuner.oracle, trial)
        assert not any(k.startswith(PREFIX) for k in trial.hyperparameters.values)
        m = trial.metrics
        assert m.get_last_value("start_iteration") == 3 * v[PREFIX + "window"]
        assert m.get_last_value("start_lr") == pytest.approx(v["lr"], rel=1e-6)
        assert (m.get_last_value("start_velocity") > 0) == (v[PREFIX + "window"] > 0)
    # One outer step per round: the staggered start's round of 2 trials, then 3 of 4.
    assert tuner.oracle._es["outer_step"] == 4
    best = tuner.get_best_hyperparameters()[0].values
    assert best == tuner.oracle.mean_values() and PREFIX + "particle" not in best
    models = tuner.get_best_models(1)
    assert len(models) == 1 and models[0].optimizer.iterations.numpy() > 0


@pytest.mark.slow
def test_results_summary_reads_well(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = x.sum(1)
    tuner = keras_es.ESSearch(_Probe(), objective="val_loss", max_trials=10, num_particles=4,
                              truncation_length=2, horizon=4, seed=1, stagger=False,
                              directory=str(tmp_path), project_name="p")
    tuner.search(x[:24], y[:24], validation_data=(x[24:], y[24:]), batch_size=8, verbose=0)
    capsys.readouterr()
    tuner.results_summary(1)
    out = capsys.readouterr().out
    assert "es_single, 4 particles" in out and "2 outer steps over 2 rounds" in out
    assert "Mean theta (get_best_hyperparameters()[0]):" in out and "  lr: " in out
    assert "    1: " in out and "    2: " in out  # the trajectory


# ---------------------------------------------------------------------- processes
def _run(directory, *flags, env=None, wait=True):
    log = open(os.path.join(directory, f"log_{time.monotonic_ns()}.txt"), "w")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--directory", directory, *flags],
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(HERE)),
                                 "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log = log.name
    if wait:
        proc.wait(timeout=600)
    return proc


def _state(directory):
    with open(os.path.join(directory, "search", "oracle.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_killed_search_resumes_without_losing_particles_or_steps(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    reference.mkdir()
    crashed.mkdir()
    ref = _run(str(reference), wait=False)
    first = _run(str(crashed), "--kill-mid-trial", "5")  # SIGKILL inside fit
    assert first.returncode == -signal.SIGKILL
    second = _run(str(crashed), "--kill-after-trial", "3")  # after a checkpoint, unreported
    assert second.returncode == -signal.SIGKILL
    assert _state(str(crashed))["es"]["outer_step"] < 4
    third = _run(str(crashed))
    assert third.returncode == 0
    assert ref.wait(timeout=600) == 0
    done, expected = _state(str(crashed))["es"], _state(str(reference))["es"]
    assert done["outer_step"] == expected["outer_step"] == 4
    assert done["round_index"] == expected["round_index"]
    # Every particle window ran exactly as in the uninterrupted run.
    assert done["estimator"][:4] == expected["estimator"][:4]  # episode counters/steps
    np.testing.assert_allclose(done["theta"], expected["theta"], rtol=1e-5, atol=1e-6)
    for a, b in zip(done["history"], expected["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_chief_and_two_workers_survive_a_killed_worker(tmp_path):
    port = str(_free_port())
    env = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port}
    directory = str(tmp_path)
    chief = _run(directory, "--reassign-after", "30", wait=False,
                 env={**env, "KERASTUNER_TUNER_ID": "chief"})
    doomed = _run(directory, "--kill-mid-trial", "2", wait=False,
                  env={**env, "KERASTUNER_TUNER_ID": "tuner0"})
    worker = _run(directory, wait=False, env={**env, "KERASTUNER_TUNER_ID": "tuner1"})
    try:
        assert doomed.wait(timeout=600) == -signal.SIGKILL
        assert worker.wait(timeout=600) == 0
        assert chief.wait(timeout=600) == 0
    finally:
        for proc in (chief, doomed, worker):
            if proc.poll() is None:
                proc.kill()
    state = _state(directory)
    assert state["es"]["outer_step"] == 4  # the staggered start's round, then 3 full ones
    trials = [json.load(open(os.path.join(directory, "search", d, "trial.json")))
              for d in sorted(os.listdir(os.path.join(directory, "search")))
              if d.startswith("trial_")]
    assert len(trials) == 14 and all(t["status"] == "COMPLETED" for t in trials)
    # The chief displays every trial start: 14 trials plus the killed one, started again
    # for the surviving worker.
    with open(chief.log) as f:
        assert f.read().count("Search: Running Trial") == 15


# ---------------------------------------------------------------------- estimator hooks
def test_window_with_waiting_pairs_and_perturbed_theta():
    """The two Estimator entry points ESOracle uses: perturbed_theta() is what window()
    applies, and pairs that wait a window are neither moved nor counted."""
    from keras_es.systems import influence_balancing

    system = influence_balancing()
    estimator = keras_es.es_single(sigma=0.1, truncation_length=3, horizon=9, stagger=False)
    theta = tf.constant([0.5])
    sys_state = estimator.init_system(system, 3, 5)
    state = estimator.init(3, 1)
    active = tf.constant([True, False, True])
    expected = estimator.perturbed_theta(state, theta, 5, active).numpy()
    assert np.all(expected[2:4] == 0.5) and np.all(expected[[0, 4]] != 0.5)
    _, after, result = estimator.window(system, sys_state, state, theta, 5, active=active)
    assert int(result.valid_pairs) == 2
    np.testing.assert_allclose(result.gradient.numpy(),
                               result.pair_gradients.numpy()[[0, 2]].mean(0), rtol=1e-6)
    assert after.episode_step.numpy().tolist() == [3, 0, 3]
    assert after.draws.numpy().tolist() == [1, 0, 1]
    np.testing.assert_allclose(after.noise.numpy()[[0, 2], 0],
                               expected[[0, 4], 0] - 0.5, rtol=1e-6)


def test_tuner_backs_off_while_the_oracle_is_idle(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(keras_es.tuner.oracle.time, "sleep", slept.append)
    tuner = keras_es.ESTuner(_oracle(), _Probe(), idle_sleep=0.1, max_idle_sleep=0.3,
                             directory=str(tmp_path), project_name="p")
    for _ in range(4):  # four create_trial calls in a row, none started a trial (IDLE)
        tuner.pre_create_trial()
    assert slept == [0.1, 0.2, 0.3]
    tuner._asked = False  # what on_trial_begin does when a trial starts
    tuner._idle_streak = 0
    tuner.pre_create_trial()
    tuner.pre_create_trial()
    assert slept[3:] == [0.1]


# ---------------------------------------------------------------------- keras-tuner's guide
def _getting_started_build_model(hp):
    """keras-tuner's getting-started hypermodel, verbatim (a Sequential without Input)."""
    from keras import layers

    model = keras.Sequential()
    model.add(layers.Flatten())
    # Tune the number of layers.
    for i in range(hp.Int("num_layers", 1, 3)):
        model.add(
            layers.Dense(
                # Tune number of units separately.
                units=hp.Int(f"units_{i}", min_value=32, max_value=512, step=32),
                activation=hp.Choice("activation", ["relu", "tanh"]),
            )
        )
    if hp.Boolean("dropout"):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def _digits_like(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.normal(size=(n, 8, 8)).astype("float32") * 0.3
    x[np.arange(n), y % 8, y // 8 * 2] += 2.0  # one bright pixel per class
    return x, keras.utils.to_categorical(y, 10)


@pytest.mark.slow
def test_the_getting_started_swap_is_literal(tmp_path, capsys):
    x_train, y_train = _digits_like(320, 0)
    x_val, y_val = _digits_like(96, 1)
    tuner = keras_es.ESSearch(
        hypermodel=_getting_started_build_model,
        objective="val_accuracy",
        max_trials=40,
        executions_per_trial=1,
        overwrite=True,
        directory=str(tmp_path),
        project_name="helloworld",
    )
    tuner.search_space_summary()
    tuner.search(x_train, y_train, epochs=2, validation_data=(x_val, y_val))
    out = capsys.readouterr().out
    oracle = tuner.oracle
    # epochs=2 of 10 batches: training runs of T = 20 steps, trials of K = 10 steps.
    assert oracle.horizon == 20 and "training runs of 20 steps" in out
    assert oracle._es["outer_step"] >= 2
    assert "So Far: None" not in out and "es/" not in out
    assert "start mid-range" in out and "units_0=288" in out and "lr=0.001" in out
    trials = list(oracle.trials.values())
    # Choice and Boolean values are drawn from their distributions, not frozen.
    assert {t.hyperparameters.values["activation"] for t in trials} == {"relu", "tanh"}
    assert {t.hyperparameters.values["dropout"] for t in trials} == {False, True}
    models = tuner.get_best_models(num_models=2)
    assert len(models) == 2 and all(m.built for m in models)
    models[0].summary()
    tuner.results_summary()
    best_hps = tuner.get_best_hyperparameters(5)
    model = _getting_started_build_model(best_hps[0])
    model.fit(x_train, y_train, epochs=1, verbose=0)
    assert best_hps[0].values == oracle.mean_values()


def test_the_search_refuses_a_budget_or_epochs_it_cannot_honour(tmp_path):
    x, y = _digits_like(64, 0)
    small = keras_es.ESSearch(_getting_started_build_model, objective="val_accuracy",
                              max_trials=3, directory=str(tmp_path), project_name="a")
    with pytest.raises(ValueError, match=r"max_trials=3 is too small.*max_trials >= \d+"):
        small.search(x, y, epochs=2, validation_data=(x, y))
    assert not small.oracle.trials  # refused before any work
    fixed = keras_es.ESSearch(_getting_started_build_model, objective="val_accuracy",
                              max_trials=100, horizon=30, directory=str(tmp_path),
                              project_name="b")
    with pytest.raises(ValueError, match=r"search\(epochs=5\) asks for training runs of 10 "
                                         r"steps.*horizon=30"):
        fixed.search(x, y, epochs=5, batch_size=32, validation_data=(x, y))

    def generator():
        while True:
            yield x[:8], y[:8]

    unknown = keras_es.ESSearch(_getting_started_build_model, objective="val_accuracy",
                                max_trials=100, directory=str(tmp_path), project_name="c")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        unknown.search(generator(), epochs=2, validation_data=(x, y))


@pytest.mark.slow
def test_categorical_estimates_are_unbiased_for_the_expected_loss(tmp_path):
    """A Choice is searched through the softmax of its logits: each inner problem draws
    its value with Gumbel noise shared by the twins. The ES estimate on the logits is
    then unbiased for the gradient of the Gaussian-smoothed expected loss
    E_eps[sum_k softmax(theta + eps)_k L_k] (a z-test against that gradient, computed
    from its closed form by Monte Carlo), and theta moves toward the best value."""
    space = kt.HyperParameters()
    space.Choice("c", ["a", "b", "c"], default="a")
    losses = {"a": 1.0, "b": 0.3, "c": 2.0}
    sigma, pairs, rounds = 0.5, 16, 40
    oracle = keras_es.ESOracle(objective="val_loss", max_trials=None,
                               num_particles=2 * pairs, sigma=sigma, truncation_length=1,
                               horizon=1, seed=11, stagger=False, hyperparameters=space,
                               outer_optimizer=keras.optimizers.SGD(1e-12))
    oracle._set_project_dir(str(tmp_path), "p")
    for _ in range(rounds):
        _run_round(oracle, lambda v: losses[v["c"]])
    theta = oracle.theta.astype(np.float64)  # moved by ~1e-12: fixed
    np.testing.assert_allclose(theta, np.log([0.5, 0.25, 0.25]), atol=1e-6)
    estimates = np.array([h["gradient"] for h in oracle.history])
    assert estimates.shape == (rounds, 3)
    rng = np.random.default_rng(0)
    logits = theta + sigma * rng.normal(size=(1_000_000, 3))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    values = np.array([losses[k] for k in "abc"])
    target = np.mean(p * (values - (p * values).sum(1, keepdims=True)), axis=0)
    z = (estimates.mean(0) - target) / (estimates.std(0, ddof=1) / np.sqrt(rounds))
    assert np.all(np.abs(z) < 4), (z, estimates.mean(0), target)
    # Descent raises "b" (the lowest loss) and lowers "c" (the highest).
    assert target[1] < 0 < target[2]
    assert estimates.mean(0)[1] < 0 < estimates.mean(0)[2]


def test_paths_from_the_search_state_are_checked_before_any_work(tmp_path):
    """A trial writes and deletes the checkpoints its metadata names, and that metadata
    comes from oracle.json or the network: names outside the checkpoint directory (or
    of another form) are refused before the trial does anything."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    tuner = keras_es.ESSearch(_Probe(), objective="val_loss", max_trials=20, horizon=6,
                              truncation_length=3, num_particles=4, seed=1,
                              directory=str(tmp_path / "runs"), project_name="p")
    hp = kt.HyperParameters()
    hp.values = {"units": 4, "lr": 0.05, "momentum": 0.9}
    good = {"particle": 0, "init_seed": 1, "data_seed": 2, "truncation_length": 3,
            "unit": "steps", "checkpoint_in": "",
            "checkpoint_out": "particle_000/episode_00000_window_00001.weights.h5",
            "checkpoint_stale": ""}
    x = np.ones((8, 3), np.float32)
    for key, value in [("checkpoint_stale", "../../victim.txt"),
                       ("checkpoint_out", "/tmp/elsewhere.weights.h5"),
                       ("checkpoint_in", "particle_000/../../../victim.txt"),
                       ("init_seed", "1; rm -rf /")]:
        trial = kt.engine.trial.Trial(hp.copy())
        trial.hyperparameters.values.update({PREFIX + k: v for k, v in
                                             {**good, key: value}.items()})
        with pytest.raises(kt.errors.FatalError, match=f"Refusing.*{key}|Refusing checkpoint"):
            tuner.run_trial(trial, x, x[:, 0])
    assert victim.read_text() == "keep me"
    assert not os.path.exists(tuner.checkpoint_dir)  # nothing was written


class _TunesFit(_Probe):
    """keras-tuner's guide pattern: a hyperparameter declared in HyperModel.fit."""

    def fit(self, hp, model, *args, **kwargs):
        return super().fit(hp, model, *args, shuffle=hp.Boolean("shuffle"), **kwargs)


@pytest.mark.slow
def test_hyperparameters_declared_after_the_start_are_named_not_silently_frozen(
        tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    tuner = keras_es.ESSearch(_TunesFit(), objective="val_loss", max_trials=8,
                              num_particles=4, truncation_length=2, horizon=4, seed=1,
                              stagger=False, directory=str(tmp_path), project_name="p")
    tuner.search(x[:24], x[:24, 0], validation_data=(x[24:], x[24:, 0]), batch_size=8,
                 verbose=0)
    out = capsys.readouterr().out
    assert out.count("ESOracle: shuffle appeared after the search started") == 1
    assert "declare them in build()" in out
    assert {t.hyperparameters.values["shuffle"] for t in tuner.oracle.trials.values()
            if "shuffle" in t.hyperparameters.values} <= {False}
    tuner.results_summary()
    assert "shuffle: False  (not tuned: its default)" in capsys.readouterr().out


@pytest.mark.parametrize("damage, match", [
    (lambda state: state.pop("es"), "has trials but no 'es' section"),
    (lambda state: state["es"]["theta"].__setitem__(0, float("nan")), "theta="),
    (lambda state: state["es"]["optimizer"].__setitem__(  # Adam's first moment
        2, [float("nan")] * len(state["es"]["optimizer"][2])), "outer optimizer"),
    (lambda state: state["es"].__setitem__("round_index", -3), "round_index=-3"),
    (lambda state: state["es"]["particles"][0].__setitem__("checkpoint", 7), "particles"),
])
def test_a_damaged_search_state_is_refused_by_name(tmp_oracle, damage, match):
    """What oracle.json says is checked before the search resumes from it: a removed
    ES section, a NaN theta or optimizer slot, a bad counter or record is refused with
    the reason, instead of restarting ES, failing trials later or freezing theta."""
    oracle = tmp_oracle(outer_optimizer=keras.optimizers.Adam(0.1))
    for _ in range(2):
        _run_round(oracle, _quadratic)
    state = json.loads(json.dumps(oracle.get_state()))
    damage(state)
    twin = _oracle(outer_optimizer=keras.optimizers.Adam(0.1))
    twin.trials = oracle.trials
    with pytest.raises(ValueError, match=match):
        twin.set_state(state)


def test_seed_zero_is_a_seed():
    """keras-tuner reads seed=0 as "no seed"; ESOracle keeps it, so two searches given
    seed=0 perturb alike."""
    assert _oracle(seed=0).seed == 0
