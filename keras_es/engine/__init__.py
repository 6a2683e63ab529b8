"""The particle engine: N copies of a Keras model trained in one compiled step.

* `population` (`Population`, `PopulationState`, the inner optimizers `SGD` and `Adam`
  with per-particle values, `resolve_loss`);
* `vectorize` and `stacked`: the two ways the particles run (per-particle calls under
  ``tf.vectorized_map``, or particles stacked along channels);
* `initializers`: each particle's re-initialization from its key;
* `keras_system`: `KerasSystem`, a population trained on minibatches as an
  `keras_es.UnrolledSystem`.

The names below are importable from ``keras_es.engine`` directly.
"""

from keras_es.engine.population import (
    SGD,
    Adam,
    Population,
    PopulationState,
    check_optimizer,
    count_flops_per_example,
    resolve_loss,
)

__all__ = ["SGD", "Adam", "Population", "PopulationState", "check_optimizer",
           "count_flops_per_example", "resolve_loss"]
