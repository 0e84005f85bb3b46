"""Datasets, allocations and batch streams."""

from advbct.data.allocation import Allocation, load_or_make_allocation, make_allocation
from advbct.data.batches import BatchStream, Preprocessing, normalise, random_crop_flip
from advbct.data.cifar import find_cifar100_root, load_cifar100
from advbct.data.images import DataError, ImageSet, load_image_folder

__all__ = [
    "Allocation",
    "BatchStream",
    "DataError",
    "ImageSet",
    "Preprocessing",
    "find_cifar100_root",
    "load_cifar100",
    "load_image_folder",
    "load_or_make_allocation",
    "make_allocation",
    "normalise",
    "random_crop_flip",
]
