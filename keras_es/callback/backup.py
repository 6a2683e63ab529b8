"""The ES state of a fit, kept beside Keras's ``BackupAndRestore`` so a kill at any
instant resumes exactly.

Keras's backup and keras_es's are two saves at every epoch end, in an order the user's
callback list decides, so a kill can fall between them. What makes that harmless: the
particles' windows do not read the fitted model (they train on ``train_data`` with keys
derived from integers, and restart from initializers sampled from those keys; only a
weight whose initializer keras_es cannot sample, such as an LSTM's forget-gate bias, is
copied from the model), so the ES state at any optimizer step of the fit can be
*recomputed* from an earlier one by running the windows in between. Each save is
tagged with the fitted model's optimizer step count (``iterations``), which Keras's
backup restores too; a resume takes the newest ES save at or before that step and
replays the windows since, whichever of the two saves a kill cut off.

Files in ``backup_dir``:

* ``es_start.json``: the model's step count when the ES run started (written before
  the first step), so the run can be replayed from its start;
* ``es_state_a*`` and ``es_state_b*``: two alternating ``tf.train.Checkpoint`` saves
  of the trainer, each with a record ``es_state_a.json`` / ``es_state_b.json``
  (``batches``: fit batches the ES state has seen, ``iterations``: the model's step
  count at that save). A slot's record is removed before its checkpoint is rewritten
  and written (atomically) after, so a record always describes the files beside it.

A record that does not parse, or a checkpoint that does not load, is reported by name
and the other slot (or a replay from the start) is used instead; with no usable ES
state while Keras's backup is there, the resume refuses instead of silently starting
ES over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import tensorflow as tf

from keras_es import keras_compat

SLOTS = ("es_state_a", "es_state_b")
START = "es_start.json"
LEGACY_POINTER = "es_state.json"  # keras_es 0.1: one pointer to the current slot


class ESStateError(ValueError):
    """The ES state in ``backup_dir`` cannot resume this fit."""


def _read_json(path: str, keys: tuple[str, ...]) -> dict | None:
    """The record at ``path`` with non-negative integer ``keys``; None if missing.
    Raises ``ESStateError`` naming the file if it is not such a record."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise ESStateError(f"{path} is unreadable or not JSON ({error}).") from None
    if not isinstance(record, dict) or not all(
            isinstance(record.get(k), int) and not isinstance(record.get(k), bool)
            and record[k] >= 0 for k in keys):
        raise ESStateError(f"{path} does not hold the expected record (non-negative "
                           f"integers {list(keys)}): {record!r}.")
    return record


def _write_json(path: str, record: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


class ESBackup:
    """The ES state files of one ``backup_dir`` (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = str(directory)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def mark_start(self, iterations: int) -> None:
        """Records the model's step count at the start of a new ES run."""
        os.makedirs(self.directory, exist_ok=True)
        _write_json(self._path(START), {"iterations": int(iterations)})

    def save(self, trainer, batches: int, iterations: int) -> None:
        """Saves ``trainer`` into the older slot, tagged with ``batches`` and the
        model's ``iterations``."""
        os.makedirs(self.directory, exist_ok=True)
        records = self._records(report=False)
        newest = max(records, key=lambda s: records[s]["iterations"], default=None)
        slot = SLOTS[1] if newest == SLOTS[0] else SLOTS[0]
        record_path = self._path(slot + ".json")
        if os.path.exists(record_path):
            os.remove(record_path)  # the slot's files are about to change
        trainer.save(self._path(slot))
        _write_json(record_path, {"batches": int(batches), "iterations": int(iterations),
                                  "outer_step": int(trainer.outer_step.numpy())})

    def _records(self, report: bool = True) -> dict:
        records = {}
        for slot in SLOTS:
            try:
                record = _read_json(self._path(slot + ".json"), ("batches", "iterations"))
            except ESStateError as error:
                if report:
                    warnings.warn(f"keras_es: ignoring a damaged ES save: {error}",
                                  RuntimeWarning, stacklevel=3)
                continue
            if record is not None:
                records[slot] = record
        return records

    def restore(self, trainer, iterations: int) -> tuple:
        """Restores into ``trainer`` the newest usable save at or before the model's
        step count ``iterations``.

        Args:
            trainer: The freshly built `keras_es.MetaTrainer`.
            iterations: The fitted model's optimizer step count (as Keras's backup
                restored it).

        Returns:
            ``(restored, target)``: the fit batches the restored ES state has seen, and
            the fit batches it must reach (the caller runs the windows in between);
            ``target`` is None for a fresh ES run.

        Raises:
            ESStateError: No usable ES state for a fit that Keras's backup resumes.
        """
        records = self._records()
        candidates = sorted(((r["iterations"], slot) for slot, r in records.items()
                             if r["iterations"] <= iterations), reverse=True)
        fresh = None
        if candidates:
            # A damaged save may fail halfway through loading: keep the fresh state to
            # fall back to for a replay from the start.
            fresh = tempfile.mkdtemp(prefix="keras_es_fresh_")
            trainer.save(os.path.join(fresh, "trainer"))
        try:
            return self._restore_newest(trainer, iterations, records, candidates, fresh)
        finally:
            if fresh is not None:
                shutil.rmtree(fresh, ignore_errors=True)

    def _restore_newest(self, trainer, iterations, records, candidates, fresh):
        for _, slot in candidates:
            try:
                trainer.restore(self._path(slot))
            # What a truncated or garbled checkpoint raises varies with the damage
            # (TensorFlow's reader: OpError, IndexError "Read less bytes than
            # requested", ...): any failure to read one save means trying the next.
            except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError,
                    OSError, EOFError) as error:
                warnings.warn(f"keras_es: ignoring a damaged ES save {self._path(slot)}*: "
                              f"{str(error).splitlines()[0]}", RuntimeWarning, stacklevel=2)
                continue
            record = records[slot]
            return record["batches"], record["batches"] + iterations - record["iterations"]
        start = _read_json(self._path(START), ("iterations",))
        legacy = self._path(LEGACY_POINTER)
        if start is not None and start["iterations"] <= iterations:
            # Replay from the run's start, from the trainer's fresh state.
            if fresh is not None:
                trainer.restore(os.path.join(fresh, "trainer"))
            return 0, iterations - start["iterations"]
        if os.path.exists(legacy):
            raise ESStateError(
                f"{legacy} was written by keras_es 0.1, whose saves this version does not "
                "resume; finish that fit with keras_es 0.1, or delete backup_dir to start "
                "the fit over.")
        if keras_compat.backup_present(self.directory):
            raise ESStateError(
                f"Keras's backup in {self.directory} resumes this fit at optimizer step "
                f"{iterations}, but no usable ES state is there ({', '.join(SLOTS)} and "
                f"{START} are missing or damaged); starting ES over would silently "
                "break the tuned trajectory. Restore those files, or delete backup_dir "
                "to start the fit over.")
        return 0, None
