"""The keras-tuner integration: ES as a keras-tuner search algorithm.

* `oracle`: `ESOracle`, the keras-tuner adaptor;
* `search_state`: the search's state machine (rounds of ask and tell);
* `kt_space`: keras-tuner hyperparameters as keras_es transforms;
* `tuners`: `ESTuner` and `ESSearch`;
* `engine_rounds`: a round's trials trained together on the particle engine;
* `kt_compat`: the keras-tuner internals it relies on.

Importing it imports keras_tuner (``import keras_es`` does not).
"""

from keras_es.tuner.oracle import ESOracle
from keras_es.tuner.tuners import ESSearch, ESTuner

__all__ = ["ESOracle", "ESSearch", "ESTuner"]
