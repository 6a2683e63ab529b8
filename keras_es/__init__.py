"""keras_es: evolution-strategies hyperparameter optimization for Keras.

Unbiased gradient estimates of hyperparameters through long training runs, from short
truncated unrolls: PES, ES-Single (noise reuse), Guided ES and telescoping sums.
"""

from keras_es import (
    distribute,
    engine,
    guided,
    keras_system,
    layers,
    noise,
    schedules,
    systems,
    transforms,
)
from keras_es.callback import ESCallback
from keras_es.engine import Population, PopulationState
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
from keras_es.keras_system import KerasSystem
from keras_es.outer import MetaTrainer
from keras_es.transforms import Hyperparameter, SearchSpace
from keras_es.unrolled import UnrolledSystem, select

__version__ = "0.1.0"

# The keras-tuner integration is imported when first used: importing keras_tuner costs
# ~1.7 s, which a user of ESCallback or MetaTrainer should not pay.
_LAZY = {"ESOracle": "keras_es.oracle", "ESSearch": "keras_es.oracle",
         "ESTuner": "keras_es.oracle"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keras_es' has no attribute {name!r}")

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
    "distribute",
    "engine",
    "es_single",
    "full_es",
    "guided",
    "keras_system",
    "layers",
    "noise",
    "pes",
    "schedules",
    "select",
    "systems",
    "transforms",
    "truncated_es",
]
