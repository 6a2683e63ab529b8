"""The keras-tuner internals keras_es reads exist where keras_es.tuner.kt_compat expects them.

If a keras-tuner release moves one, these fail first, naming the attribute."""

from __future__ import annotations

import keras_tuner as kt

from keras_es.tuner import kt_compat


def _oracle(tmp_path):
    oracle = kt.oracles.RandomSearchOracle(objective="val_loss", max_trials=2)
    oracle._set_project_dir(str(tmp_path), "p")  # what a Tuner does when it takes it
    return oracle


def test_run_times_counts_runs_per_trial(tmp_path):
    oracle = _oracle(tmp_path)
    assert hasattr(oracle, "_run_times"), "keras_tuner.Oracle._run_times moved"
    trial = oracle.create_trial("t")
    assert kt_compat.retries_used(oracle, trial.trial_id) == 0
    oracle.update_trial(trial.trial_id, {"val_loss": 1.0})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)
    assert kt_compat.retries_used(oracle, trial.trial_id) == 1  # counted when a run ends


def test_retry_queue(tmp_path):
    oracle = _oracle(tmp_path)
    assert hasattr(oracle, "_retry_queue"), "keras_tuner.Oracle._retry_queue moved"
    assert kt_compat.has_retry_queued(oracle) is False


def test_display_prints_a_trial_banner(tmp_path, capsys):
    oracle = _oracle(tmp_path)
    assert hasattr(oracle, "_display"), "keras_tuner.Oracle._display moved"
    oracle.hyperparameters.Float("lr", 0.1, 1.0)
    trial = oracle.create_trial("t")
    capsys.readouterr()
    kt_compat.display_trial_begin(oracle, trial)
    assert "Running Trial" in capsys.readouterr().out
