"""keras_es: evolution-strategies hyperparameter optimization for Keras.

Unbiased gradient estimates of hyperparameters through long training runs, from short
truncated unrolls: PES, ES-Single (noise reuse), Guided ES and telescoping sums.

The names in ``__all__`` are the public root, listed in the API reference: the three
front ends (`ESCallback` for ``model.fit``, `ESOracle`/`ESTuner`/`ESSearch` for
keras-tuner, `MetaTrainer` for any `UnrolledSystem`), the estimators and the pieces
they are built from. Everything else lives in submodules, such as ``keras_es.engine``
or ``keras_es.layers``, which load when first used.
"""

import importlib
import importlib.util

from keras_es.callback import ESCallback
from keras_es.engine import Population, PopulationState
from keras_es.engine.keras_system import KerasSystem
from keras_es.estimators import (
    ESTIMATORS,
    Estimator,
    EstimatorState,
    GuidedConfig,
    WindowResult,
    es_single,
    full_es,
    pes,
    truncated_es,
)
from keras_es.outer import MetaTrainer
from keras_es.transforms import Hyperparameter, SearchSpace
from keras_es.unrolled import UnrolledSystem

__version__ = "0.1.0"

# The keras-tuner integration is imported when first used: importing keras_tuner costs
# ~1.7 s, which a user of ESCallback or MetaTrainer should not pay.
_LAZY = {"ESOracle": "keras_es.tuner", "ESSearch": "keras_es.tuner",
         "ESTuner": "keras_es.tuner"}

# Names the root exported before it was curated, and where they live now.
_MOVED = {"select": "keras_es.unrolled"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MOVED:
        import warnings

        warnings.warn(f"keras_es.{name} is {_MOVED[name]}.{name}; the root no longer "
                      "exports it.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    # A submodule (keras_es.layers, keras_es.systems, ...) loads on first access.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'keras_es' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ESCallback",
    "ESOracle",
    "ESSearch",
    "ESTIMATORS",
    "ESTuner",
    "Estimator",
    "EstimatorState",
    "GuidedConfig",
    "Hyperparameter",
    "KerasSystem",
    "MetaTrainer",
    "Population",
    "PopulationState",
    "SearchSpace",
    "UnrolledSystem",
    "WindowResult",
    "es_single",
    "full_es",
    "pes",
    "truncated_es",
]
