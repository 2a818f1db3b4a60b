"""Datasets (IDX, CIFAR-10, image folders, scikit-learn digits) held in memory, their splits, and
batches preprocessed and augmented on the device."""

from capas.data.batches import Preprocess, augment_batch, default_preprocess, iterate_batches
from capas.data.dataset import ArrayDataset
from capas.data.images import image_size, read_image
from capas.data.sources import NAMES, load_dataset
from capas.data.splits import Splits, make_splits, splits_for

__all__ = [
    "NAMES",
    "ArrayDataset",
    "Preprocess",
    "Splits",
    "augment_batch",
    "default_preprocess",
    "image_size",
    "iterate_batches",
    "load_dataset",
    "make_splits",
    "read_image",
    "splits_for",
]
