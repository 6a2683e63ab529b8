"""ESSearch on the particle engine (`keras_es.tuner.engine_rounds`) and the search's
budget: one outer step per round, rounds never cut off."""

from __future__ import annotations

import json
import os
import signal

import keras
import keras_tuner as kt
import numpy as np
import pytest
from test_oracle import _oracle, _run, _run_round, _state

import keras_es
from keras_es.tuner import engine_rounds, search_state
from keras_es.tuner import oracle as oracle_module


def _data(rows=160):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 6)).astype("float32")
    y = (x[:, 0] - x[:, 1] > 0).astype("int32")
    return x[:128], y[:128], x[128:], y[128:]


def build_sgd(hp):
    """keras-tuner's usual form: the optimizer's values from hp, nothing else."""
    model = keras.Sequential([keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(
        learning_rate=hp.Float("learning_rate", 1e-3, 0.5, sampling="log", default=0.05),
        momentum=hp.Float("momentum", 0.0, 0.95, default=0.5)),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def build_units(hp):
    model = keras.Sequential([keras.layers.Dense(hp.Int("units", 4, 16, step=4),
                                                 activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(hp.Float("lr", 1e-4, 1e-1, sampling="log")),
                  loss="sparse_categorical_crossentropy")
    return model


def _search(tmp_path, build=build_sgd, name="p", **kwargs):
    args = dict(objective="val_loss", max_trials=12, num_particles=4, sigma=0.3,
                truncation_length=5, horizon=10, seed=3, stagger=False,
                directory=str(tmp_path), project_name=name)
    args.update(kwargs)
    return keras_es.ESSearch(build, **args)


def test_probe_maps_optimizer_values_and_refuses_what_changes_the_model():
    hp = kt.HyperParameters()
    build_sgd(hp)
    model, mapping = engine_rounds.probe(_Wrapped(build_sgd), hp, hp.space, hp.values)
    assert mapping == {"learning_rate": "learning_rate", "momentum": "momentum"}
    assert isinstance(model, keras.Model)
    hp = kt.HyperParameters()
    build_units(hp)
    with pytest.raises(engine_rounds.NotOnEngine, match="'units' changes the model"):
        engine_rounds.probe(_Wrapped(build_units), hp, hp.space, hp.values)


class _Wrapped(kt.HyperModel):
    def __init__(self, build=build_sgd):
        super().__init__()
        self._build = build

    def build(self, hp):
        return self._build(hp)


@pytest.mark.slow
def test_a_search_of_optimizer_values_runs_on_the_engine(tmp_path, capsys):
    x, y, xv, yv = _data()
    tuner = _search(tmp_path)
    logs = tmp_path / "tensorboard"
    tuner.search(x, y, validation_data=(xv, yv), batch_size=16, verbose=0,
                 callbacks=[keras.callbacks.TensorBoard(str(logs))])
    out = capsys.readouterr().out
    assert "train together on the particle engine (learning_rate -> learning_rate, " \
           "momentum -> momentum)" in out
    oracle = tuner.oracle
    assert oracle.search_state.es["execution"] == "engine"
    trials = list(oracle.trials.values())
    assert len(trials) == 12 and all(t.status == "COMPLETED" for t in trials)
    assert len(oracle.history) == 3 and oracle.steps_spent == 60
    # A trial's report is its particle's model: the loaded weights give the same
    # validation loss and accuracy.
    best = oracle.get_best_particle_trials(1)[0]
    model = tuner.load_model(best)
    loss, accuracy = model.evaluate(xv, yv, verbose=0)
    assert loss == pytest.approx(best.metrics.get_last_value("val_loss"), rel=1e-5)
    assert accuracy == pytest.approx(best.metrics.get_last_value("val_accuracy"), abs=1e-6)
    assert len(tuner.get_best_models(2)) == 2
    tuner.results_summary(1)
    assert "60 steps of training" in capsys.readouterr().out
    # Each trial's logs where its fit would have written them, for TensorBoard.
    trial_id = trials[0].trial_id
    for split in ("train", "validation"):
        assert os.listdir(logs / trial_id / split)
    # Only the last round's states and the best trial's round are kept.
    files = sorted(os.listdir(tuner.engine_dir))
    assert "round_00002.npz" in files and len(files) <= 2


@pytest.mark.slow
def test_shape_changing_hyperparameters_keep_the_per_trial_path(tmp_path, capsys):
    x, y, xv, yv = _data()
    tuner = _search(tmp_path, build=build_units, max_trials=4, horizon=5)
    tuner.search(x, y, validation_data=(xv, yv), batch_size=16, verbose=0)
    assert "each trial trains its own model with fit ('units' changes the model" in \
        capsys.readouterr().out
    assert tuner.oracle.search_state.es["execution"] == "per_trial"
    with pytest.raises(ValueError, match="execution='engine' cannot run this search: 'units'"):
        _search(tmp_path, build=build_units, name="q", execution="engine").search(
            x, y, validation_data=(xv, yv), batch_size=16, verbose=0)


def test_execution_is_checked():
    with pytest.raises(ValueError, match="execution='gpu' is invalid"):
        keras_es.ESSearch(build_sgd, objective="val_loss", max_trials=4, execution="gpu",
                          directory="/tmp/unused_es", project_name="x")


def test_fit_data_refuses_what_the_engine_does_not_apply():
    x, y, xv, yv = _data()
    with pytest.raises(engine_rounds.NotOnEngine, match="class_weight"):
        engine_rounds.fit_data((x, y), {"class_weight": {0: 1.0, 1: 2.0}})
    train, validation, batch = engine_rounds.fit_data((x, y), {"validation_split": 0.25})
    assert train[0].shape[0] == 96 and validation[0].shape[0] == 32 and batch == 32


# ---------------------------------------------------------------------- budget
def test_rounds_of_the_staggered_start_are_credited_and_never_cut_off():
    est = keras_es.es_single(0.1, 1, horizon=4)  # in trials: 4 windows per training run
    waits = search_state.start_waits(est, 8)
    assert sorted(waits) == [0, 1, 2, 3]
    # Pairs join one per round: 2, 4, 6 then 8 trials, each round one outer step.
    assert search_state.plan_rounds(est, 8, 27) == [2, 4, 6, 8]
    assert search_state.plan_rounds(est, 8, 20) == [2, 4, 6, 8]
    assert search_state.first_update_trials(est, 8) == 2


def test_max_trials_stops_at_a_round_boundary(capsys):

    oracle = _oracle(max_trials=9, stagger=True)  # 4 particles, 4 windows per run
    sizes = []
    while True:
        trials = _run_round(oracle, lambda values: 1.0)
        if not trials:
            break
        sizes.append(len(trials))
    planned = search_state.plan_rounds(oracle.estimator, 4, 9)
    assert sizes == planned and planned[0] == 2 and sum(planned) < 9
    assert len(oracle.history) == len(planned)  # every round moved theta
    assert oracle.history[0]["valid_pairs"] == 1  # the pair that starts first
    left = 9 - sum(planned)
    assert (f"stopping after {len(planned)} outer steps: the {left} trials left of "
            "max_trials=9 cannot complete a round of 4") in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_engine_search_resumes_exactly(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    reference.mkdir()
    crashed.mkdir()
    ref = _run(str(reference), "--engine", wait=False)
    # Killed mid-round: round 1's first trial (trial 3) trained the round and saved its
    # states, trials 3 and 4 reported, trial 5 ran and had not reported. The oracle
    # writes at round ends on the engine path, so storage still holds round 1's start.
    first = _run(str(crashed), "--engine", "--kill-after-trial", "5")
    assert first.returncode == -signal.SIGKILL
    files = os.listdir(crashed / "search" / "es_engine")
    assert "round_00001.npz" in files
    saved = _state(str(crashed))
    assert saved["es"]["round_index"] == 1 and saved["end_order"] == ["00", "01"]
    assert not (crashed / "search" / "trial_03").exists()
    second = _run(str(crashed), "--engine")
    assert second.returncode == 0, open(second.log).read()[-2000:]
    assert ref.wait(timeout=600) == 0
    done, expected = _state(str(crashed))["es"], _state(str(reference))["es"]
    assert done["execution"] == expected["execution"] == "engine"
    assert done["outer_step"] == expected["outer_step"] == 4
    assert done["theta"] == expected["theta"]
    assert [h["val_loss"] for h in done["history"]] == \
        [h["val_loss"] for h in expected["history"]]
    assert [h["gradient"] for h in done["history"]] == \
        [h["gradient"] for h in expected["history"]]
    # Every trial recorded once, under the ids of the uninterrupted run.
    ended = _state(str(crashed))["end_order"]
    assert ended == _state(str(reference))["end_order"]
    assert len(ended) == len(set(ended)) == 14
    trial_dirs = sorted(p.name for p in (crashed / "search").iterdir()
                        if p.name.startswith("trial_"))
    assert trial_dirs == [f"trial_{i:02d}" for i in range(14)]


def test_trial_files_oracle_json_does_not_record_are_ignored_on_resume(tmp_path, capsys):
    # A kill while a round's files are written (each trial's file, then oracle.json)
    # leaves trial files that oracle.json, still at the round's start, does not record.
    x, y, xv, yv = _data()
    args = dict(x=x, y=y, validation_data=(xv, yv), batch_size=16, verbose=0)
    reference = _search(tmp_path, name="reference")
    reference.search(**args)
    first = _search(tmp_path, max_trials=10)  # two rounds of 4; ids of two digits
    first.search(**args)
    assert first.oracle.end_order[-1] == "07"
    project = tmp_path / "p"
    saved = json.loads((project / "trial_07" / "trial.json").read_text())
    (project / "trial_08").mkdir()
    (project / "trial_08" / "trial.json").write_text(json.dumps({**saved, "trial_id": "08"}))
    resumed = _search(tmp_path, overwrite=False)
    resumed.search(**args)
    assert "ignoring the saved files of trial(s) 08" in capsys.readouterr().out
    oracle = resumed.oracle
    assert oracle.end_order == reference.oracle.end_order == [f"{i:02d}" for i in range(12)]
    assert len(oracle.history) == 3
    assert oracle.search_state.es["theta"] == reference.oracle.search_state.es["theta"]


def test_a_search_resumes_only_with_the_same_estimator_options(tmp_path):
    est = keras_es.es_single(0.3, 5, horizon=20, fitness_shaping="rank", stagger=False)
    first = _oracle(estimator=est, sigma=None, truncation_length=None, horizon=None,
                    stagger=None)
    _run_round(first, lambda values: 1.0)
    saved = first.search_state.es["config"]
    second = _oracle(sigma=0.3)
    with pytest.raises(ValueError, match="fitness_shaping=None does not match the saved "
                                         "search's fitness_shaping='rank'"):
        oracle_module._resume(second, first.search_state.es)
    # A search saved before the options existed ran without them.
    old = {k: v for k, v in saved.items() if k not in ("fitness_shaping", "learn_sigma")}
    oracle_module._check_config(old, {**old, "fitness_shaping": None, "learn_sigma": None})


def test_the_outer_learning_rate_follows_the_planned_outer_steps(tmp_path, capsys):
    rate = keras_es.outer.outer_learning_rate_for
    assert rate(4) == 0.3 and rate(100) == pytest.approx(0.1) and rate(10 ** 6) == 0.01
    x, y, xv, yv = _data()
    tuner = _search(tmp_path, max_trials=8)  # 2 rounds of 4: 2 outer steps
    assert tuner.oracle.auto_outer_rate
    from keras_es.tuner.tuners import _plan_search
    _plan_search(tuner.oracle, (x, y), {"batch_size": 16})
    assert "Outer learning rate 0.3, from 2 outer steps" in capsys.readouterr().out
    assert float(tuner.oracle.outer_optimizer.learning_rate) == pytest.approx(0.3)
    given = _search(tmp_path, name="q", outer_learning_rate=0.02)
    assert not given.oracle.auto_outer_rate
    _plan_search(given.oracle, (x, y), {"batch_size": 16})
    assert float(given.oracle.outer_optimizer.learning_rate) == pytest.approx(0.02)
