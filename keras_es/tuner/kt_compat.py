"""The keras-tuner internals keras_es relies on, in one place.

keras-tuner has no public way to ask these things; each helper below reads one private
attribute, and ``tests/tuner/test_kt_compat.py`` fails loudly (naming the attribute) if a
keras-tuner release moves it.
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
