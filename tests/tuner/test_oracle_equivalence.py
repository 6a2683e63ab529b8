"""ESOracle's estimates are those of the estimator core, unchanged across versions.

Scripted searches (every trial reports a fixed function of its values: no training)
are compared with histories recorded before ESOracle called the estimator's ask/tell
itself (``tests/data/oracle_v0_2/expected.json``): sum and final meta-objectives,
staggered starts on and off (with the staggered start's rounds uncredited, as then: a
search saved then resumes so), non-finite reports, a Choice. A search saved by keras_es
0.2 (its flat estimator-state layout, saved before ask) resumes and continues exactly as
the uninterrupted search.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import keras
import keras_tuner as kt
import numpy as np
import pytest

import keras_es

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "oracle_v0_2"
EXPECTED = json.loads((DATA / "expected.json").read_text())


def _full_space():
    hp = kt.HyperParameters()
    hp.Float("lr", 1e-4, 1.0, sampling="log", default=0.01)
    hp.Float("decay", 1e-4, 0.5, sampling="reverse_log", default=0.45)
    hp.Float("dropout", 0.0, 0.5, default=0.25)
    hp.Float("wd", 1e-6, 1e-2, sampling="log")  # default = min: starts mid-range
    hp.Float("mom", 0.0, 0.99, default=0.98)  # near the edge: the start is clipped
    hp.Float("step_lr", 1e-3, 1.0, sampling="log", step=10, default=0.01)
    hp.Int("units", 8, 64, step=8, default=32)
    hp.Int("layers", 1, 3)
    hp.Choice("activation", ["relu", "tanh"], default="tanh")
    hp.Boolean("batch_norm", default=True)
    hp.Fixed("epochs", 3)
    with hp.conditional_scope("activation", ["relu"]):
        hp.Float("leak", 0.01, 0.3, default=0.1)
    return hp


def _choice_space():
    hp = kt.HyperParameters()
    hp.Choice("c", ["a", "b", "c"], default="a")
    hp.Float("lr", 1e-4, 1e-1, sampling="log", default=3e-3)
    return hp


CASES = {
    "sum_pes_stagger_nan": dict(kwargs=dict(estimator="pes", meta_objective="sum",
                                            stagger=True), space=_full_space, rounds=9,
                                nan=[[5, 1], [7, 2], [7, 3]]),
    "final_es_single_stagger_nan": dict(kwargs=dict(estimator="es_single",
                                                    meta_objective="final", stagger=True),
                                        space=_full_space, rounds=9, nan=[[6, 0]]),
    "sum_truncated_choice": dict(kwargs=dict(estimator="truncated_es", meta_objective="sum",
                                             stagger=True, clip_loss_difference=0.5),
                                 space=_choice_space, rounds=8, nan=[[4, 0]]),
    "final_pes_nostagger": dict(kwargs=dict(estimator="pes", meta_objective="final",
                                            stagger=False, normalize=True),
                                space=_full_space, rounds=7, nan=[[3, 3]]),
}


def _loss(values, meta, case):
    """A fixed function of a trial's values (and, for "final", its window), summed in
    the order the recorded histories used."""
    if [meta["round"], meta["particle"]] in case.get("nan", []):
        return float("nan")
    v = 0.0
    if "lr" in values:
        v += (math.log10(values["lr"]) + 1.0) ** 2
    if "decay" in values:
        v += 3.0 * (values["decay"] - 0.1) ** 2
    if "dropout" in values:
        v += (values["dropout"] - 0.1) ** 2
    if "wd" in values:
        v += 0.1 * (math.log10(values["wd"]) + 4.0) ** 2
    if "mom" in values:
        v += (values["mom"] - 0.5) ** 2
    if "step_lr" in values:
        v += 0.2 * abs(math.log10(values["step_lr"]) + 2.0)
    if "units" in values:
        v += 0.01 * values["units"] / 8.0 + 0.1 * values["layers"]
    if "activation" in values:
        v += 0.05 if values["activation"] == "relu" else 0.0
        v += 0.02 if values["batch_norm"] else 0.0
    if "leak" in values:
        v += values["leak"]
    if "c" in values:
        v += {"a": 1.0, "b": 0.3, "c": 2.0}[values["c"]]
    if case["kwargs"]["meta_objective"] == "final":
        v *= 1.0 + 1.0 / (1.0 + meta["window"])
    return v


def _oracle(case, directory):
    oracle = keras_es.ESOracle(objective="val_loss", max_trials=None, num_particles=4,
                               sigma=0.3, truncation_length=5, horizon=20, seed=7,
                               hyperparameters=case["space"](), outer_learning_rate=0.1,
                               **case["kwargs"])
    oracle._set_project_dir(str(directory), "search")
    return oracle


def _run(oracle, case, seen=()):
    while oracle.search_state is None or oracle.search_state.es["round_index"] < case["rounds"]:
        trial = oracle.create_trial("t0")
        # The histories were recorded when the staggered start's rounds were not
        # credited; a search saved then (no "credit_burn_in" in its state) still runs so.
        oracle.search_state.es.pop("credit_burn_in", None)
        assert trial.status == "RUNNING"
        if trial.trial_id not in seen:  # a resumed search re-runs its in-flight trial
            meta = oracle.trial_metadata(trial.trial_id)
            oracle.update_trial(trial.trial_id,
                                {"val_loss": _loss(trial.hyperparameters.values, meta, case)})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)


def _assert_same_history(oracle, expected):
    history = oracle.history
    assert len(history) == len(expected["history"])
    for got, want in zip(history, expected["history"], strict=True):
        for key in ("valid_pairs", "diverged_pairs", "updated"):
            assert got[key] == want[key], key
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-12)
        np.testing.assert_allclose(got["gradient"], want["gradient"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(oracle.theta, expected["theta"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_scripted_searches_match_the_recorded_histories(name, tmp_path):
    keras.utils.set_random_seed(0)
    oracle = _oracle(CASES[name], tmp_path)
    _run(oracle, CASES[name])
    _assert_same_history(oracle, EXPECTED["cases"][name])


def test_a_search_saved_by_keras_es_0_2_resumes(tmp_path):
    """Saved mid-round by keras_es 0.2: a flat 13-tensor estimator state, saved before
    the round's ask (no 'estimator_asked' marker). It resumes and continues as the
    uninterrupted search did."""
    shutil.copytree(DATA / "search", tmp_path / "search")
    saved = json.loads((DATA / "search" / "oracle.json").read_text())["es"]
    assert len(saved["estimator"]) == 13 and "estimator_asked" not in saved
    case = CASES["final_pes_nostagger"]
    oracle = _oracle(case, tmp_path)
    oracle.reload()
    assert len(oracle.search_state.es["estimator"]) == 13  # read as saved until the round ends
    _run(oracle, case, seen=set(oracle.trials))
    assert oracle.search_state.es["estimator_asked"] is True
    _assert_same_history(oracle, EXPECTED["cases"]["final_pes_nostagger"])
