"""`ESCallback`: tune hyperparameters online, inside ``model.fit``.

* `es_callback`: the callback;
* `keras_optimizers`: reading the compiled Keras optimizer (tuning by Keras names);
* `backup`: the callback's resumable state beside ``keras.callbacks.BackupAndRestore``.
"""

from keras_es.callback.es_callback import ESCallback

__all__ = ["ESCallback"]
