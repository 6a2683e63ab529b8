"""The Keras internals keras_es relies on, in one place.

``tests/test_keras_compat.py`` fails loudly, naming what moved, if a Keras release
changes one of them.
"""

from __future__ import annotations

import os

# The files keras.callbacks.BackupAndRestore writes into its backup_dir (Keras 3).
BACKUP_FILES = ("latest.weights.h5", "training_metadata.json")


def backup_present(directory: str) -> bool:
    """Whether ``keras.callbacks.BackupAndRestore`` has saved a backup in
    ``directory`` (it does not say so publicly)."""
    return any(os.path.exists(os.path.join(directory, name)) for name in BACKUP_FILES)
