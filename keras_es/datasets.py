"""Datasets for keras_es's examples and benchmarks, all read through ``tfds.load``.

``load("digits")`` serves scikit-learn's bundled handwritten digits (1,797 8x8 images,
shipped inside the scikit-learn wheel) through a small TFDS builder, so examples run
offline on the same ``tfds.load`` code path as the real datasets (``"mnist"``,
``"fashion_mnist"``, ...), which they reach by name.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# The digits builder's split: the first 1,437 shuffled images train, the last 360
# validate (a fixed 80/20 split, the same on every machine).
_DIGITS_TRAIN = 1437


class KerasEsDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as a TFDS dataset (``"keras_es_digits"``).

    Images are ``uint8 [8, 8, 1]`` with values 0..16 scaled to 0..255, like MNIST's
    pixel range; labels 0..9. Splits ``train`` (1,437) and ``test`` (360).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn's digits, fixed 80/20 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's bundled 8x8 handwritten digits.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        # No download: the images ship inside scikit-learn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        images = np.round(digits.images[order] * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target[order].astype(np.int64)
        return {
            "train": self._generate_examples(images[:_DIGITS_TRAIN], labels[:_DIGITS_TRAIN]),
            "test": self._generate_examples(images[_DIGITS_TRAIN:], labels[_DIGITS_TRAIN:]),
        }

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


#: Names `load` accepts besides any TFDS dataset name.
EMBEDDED = {"digits": "keras_es_digits"}


def load(name: str, split: str, data_dir: str | None = None, max_examples: int | None = None):
    """Loads a supervised image-classification split as float32 arrays.

    Args:
        name: ``"digits"`` (embedded, offline) or a TFDS dataset name such as
            ``"mnist"`` or ``"fashion_mnist"`` (downloaded by TFDS on first use).
        split: A TFDS split, e.g. ``"train"``, ``"test"`` or ``"train[:80%]"``.
        data_dir: TFDS data directory (default: TFDS's).
        max_examples: Keep at most this many examples (the first ones of the split).

    Returns:
        ``(x, y)``: ``float32 [n, height * width * channels]`` in ``[0, 1]`` and
        ``int32 [n]`` labels.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is invalid; expected 'digits' or a TFDS dataset "
                         "name such as 'mnist'.")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples <= 0):
        raise ValueError(f"max_examples={max_examples!r} is invalid; expected a positive int "
                         "or None.")
    ds = tfds.load(EMBEDDED.get(name, name), split=split, data_dir=data_dir,
                   as_supervised=True)
    if max_examples is not None:
        ds = ds.take(max_examples)
    images, labels = [], []
    for image, label in tfds.as_numpy(ds.batch(4096)):
        images.append(image)
        labels.append(label)
    x = np.concatenate(images).astype(np.float32) / 255.0
    return x.reshape(len(x), -1), np.concatenate(labels).astype(np.int32)
