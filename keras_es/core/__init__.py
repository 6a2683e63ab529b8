"""The pieces every keras_es estimator is composed of.

An `keras_es.Estimator` is a configuration; what it does per step is the work of four
small pieces, each with its own (possibly empty) state:

* `sampling`: how a perturbation is drawn and what it is credited with (isotropic, or
  Guided ES's subspace sampler);
* `resampling`: when a pair draws new noise and whether its credit accumulates over
  the episode (the one difference between full ES, truncated ES, PES and ES-Single);
* `credit`: which loss differences are credited (every step's, or the telescoped
  final loss);
* `guard`: what happens to non-finite or outlying losses.
"""
