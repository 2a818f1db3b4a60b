"""Datasets (IDX, CIFAR-10, image folders, scikit-learn digits) held in memory, their splits, and
batches preprocessed and augmented on the device."""

from capas.data.batches import Augment, Preprocess, default_preprocess, iterate_batches
from capas.data.dataset import ArrayDataset
from capas.data.images import read_image
from capas.data.sources import NAMES, load_dataset
from capas.data.splits import Splits, make_splits

__all__ = [
    "NAMES",
    "ArrayDataset",
    "Augment",
    "Preprocess",
    "Splits",
    "default_preprocess",
    "iterate_batches",
    "load_dataset",
    "make_splits",
    "read_image",
]
