"""The keras-tuner internals keras_es relies on, in one place.

keras-tuner has no public way to ask these things; each helper below reads one private
attribute (`HeldSaves` overrides one private method), and ``tests/tuner/test_kt_compat.py``
fails loudly (naming the attribute) if a keras-tuner release moves it.
"""

from __future__ import annotations

import keras_tuner


def retries_used(oracle: keras_tuner.Oracle, trial_id: str) -> int:
    """How many runs of trial ``trial_id`` have ended (keras-tuner counts them for
    ``max_retries_per_trial`` in a private dict, in ``end_trial``)."""
    return oracle._run_times[trial_id]


def has_retry_queued(oracle: keras_tuner.Oracle) -> bool:
    """Whether ``oracle`` has failed trials waiting to be retried."""
    return bool(oracle._retry_queue)


def display_trial_begin(oracle: keras_tuner.Oracle, trial) -> None:
    """Prints keras-tuner's "Running Trial" banner for ``trial`` (its oracle's display
    does this inside ``create_trial``, which a reassigned trial bypasses)."""
    oracle._display.on_trial_begin(trial)


class HeldSaves:
    """Lets an oracle hold back keras-tuner's writes while ``holding_saves()`` is true.

    keras-tuner writes ``oracle.json`` (``Oracle.save``) and the trial's ``trial.json``
    (the private ``Oracle._save_trial``) when a trial is created and ended, the trial's
    file again when it is updated, and ``Tuner.on_trial_end`` writes ``oracle.json`` once
    more: six writes per trial, which cost more than a trial of a round on the particle
    engine. There, every trial of a round can be answered again from the round's file,
    so `keras_es.ESOracle` writes at round ends only: a search killed mid-round resumes
    from the round's start and reads its trials' results back without training twice.
    Mix in before `keras_tuner.Oracle`; ``flush_saves()`` writes what was held (the
    trials first, so ``oracle.json`` never names a trial without a file).
    """

    def holding_saves(self) -> bool:
        return False

    def _save_trial(self, trial):
        held = self.__dict__.setdefault("_held_trials", {})
        if self.holding_saves():
            held[trial.trial_id] = trial
            return
        held.pop(trial.trial_id, None)
        super()._save_trial(trial)

    def save(self):
        if not self.holding_saves():
            self.flush_saves()

    def flush_saves(self) -> None:
        """Writes the held trials, then ``oracle.json``."""
        held = self.__dict__.setdefault("_held_trials", {})
        for trial_id in list(held):
            super()._save_trial(held.pop(trial_id))
        super().save()
