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


class _Holding(kt_compat.HeldSaves, kt.oracles.RandomSearchOracle):
    hold = True

    def holding_saves(self):
        return self.hold


def test_held_saves_wait_for_the_flush(tmp_path):
    # keras-tuner writes trial.json through the private Oracle._save_trial on
    # create_trial, update_trial and end_trial, and oracle.json through save().
    assert callable(getattr(kt.Oracle, "_save_trial", None)), \
        "keras_tuner.Oracle._save_trial moved"
    written = []
    plain = _oracle(tmp_path / "plain")
    plain._save_trial = lambda trial: written.append(trial.trial_id)
    plain.hyperparameters.Float("lr", 0.1, 1.0)
    trial = plain.create_trial("t")
    plain.update_trial(trial.trial_id, {"val_loss": 1.0})
    trial.status = "COMPLETED"
    plain.end_trial(trial)
    assert written == [trial.trial_id] * 3, "keras-tuner no longer saves trials via _save_trial"

    oracle = _Holding(objective="val_loss", max_trials=2)
    oracle._set_project_dir(str(tmp_path), "p")
    oracle.hyperparameters.Float("lr", 0.1, 1.0)
    trial = oracle.create_trial("t")
    oracle.update_trial(trial.trial_id, {"val_loss": 1.0})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)
    project = tmp_path / "p"
    assert not (project / "oracle.json").exists()
    assert not (project / f"trial_{trial.trial_id}" / "trial.json").exists()
    oracle.hold = False
    oracle.flush_saves()
    assert (project / f"trial_{trial.trial_id}" / "trial.json").exists()
    reloaded = kt.oracles.RandomSearchOracle(objective="val_loss", max_trials=2)
    reloaded._set_project_dir(str(tmp_path), "p")
    reloaded.reload()
    assert reloaded.end_order == [trial.trial_id]
    assert reloaded.trials[trial.trial_id].score == 1.0
