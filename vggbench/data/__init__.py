"""Data for the study: CIFAR-100 (or a synthetic stand-in) split into train / validation / test.

The validation set is carved class-balanced out of the official training set (2,500 images, 25 per
class, leaving 47,500 for training); the official 10,000 test images are the test set. Training
images are augmented (random crop with padding 4, horizontal flip); all images are normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vggbench.data.cifar import (
    DataError,
    cifar100_available,
    prepare_cifar100,
    read_cifar100,
)
from vggbench.data.loaders import (
    CIFAR_MEAN,
    CIFAR_STD,
    TransformedView,
    build_loader,
    epoch_generator,
    rank_shard,
)
from vggbench.data.synthetic import IMAGE_SIZE, SyntheticCIFAR

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "IMAGE_SIZE",
    "DataError",
    "DataSplits",
    "SyntheticCIFAR",
    "TransformedView",
    "build_loader",
    "build_splits",
    "cifar100_available",
    "class_balanced_split",
    "epoch_generator",
    "rank_shard",
]

DATASETS = ("cifar100", "synthetic")


@dataclass
class DataSplits:
    """The three splits (datasets of ``(normalised image tensor, class index)``) and what they hold."""

    train: Dataset
    val: Dataset
    test: Dataset
    kind: str  # "cifar100" or "synthetic"
    num_classes: int


def _per_class(size: int, num_classes: int, name: str, *, minimum: int) -> int:
    if size < minimum or size % num_classes:
        raise ValueError(
            f"{name} must be a multiple of the number of classes ({num_classes}), at least {minimum}; got {size}"
        )
    return size // num_classes


def class_balanced_split(
    targets: Sequence[int],
    val_size: int,
    num_classes: int = 100,
    seed: int = 0,
    train_limit: int | None = None,
) -> tuple[list[int], list[int]]:
    """Split sample indices into training and validation indices with ``val_size // num_classes`` per class.

    The result depends only on the arguments (a private ``torch.Generator`` seeded with ``seed``).
    ``train_limit`` caps the training indices at ``train_limit // num_classes`` per class; it does not
    change the validation indices. Both index lists are sorted.

    Raises:
        ValueError: ``val_size`` or ``train_limit`` is not a multiple of ``num_classes``, a label is out
            of range, or a class has too few samples (it needs more than its validation share).
    """
    labels = torch.as_tensor(targets, dtype=torch.long)
    val_per_class = _per_class(val_size, num_classes, "val_size", minimum=0)
    train_per_class = (
        None if train_limit is None else _per_class(train_limit, num_classes, "train_limit", minimum=num_classes)
    )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels, minlength=num_classes)
    needed = val_per_class + (train_per_class or 1)
    if counts.min() < needed:
        smallest = int(counts.argmin())
        raise ValueError(
            f"class {smallest} has {int(counts[smallest])} samples, but every class needs at least {needed} "
            f"({val_per_class} for validation with val_size={val_size}, the rest for training "
            f"with train_limit={train_limit})"
        )
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val.append(members[:val_per_class])
        train.append(members[val_per_class:][:train_per_class])
    return sorted(torch.cat(train).tolist()), sorted(torch.cat(val).tolist())


def _base_datasets(
    dataset: str,
    data_dir: str | Path,
    download: bool,
    verify_checksums: bool,
    train_size: int,
    test_size: int,
    seed: int,
) -> tuple[Dataset, Dataset]:
    """The untransformed training and test sets of ``dataset``."""
    if dataset == "cifar100":
        prepare_cifar100(data_dir, download=download, verify_checksums=verify_checksums)
        return read_cifar100(data_dir, train=True), read_cifar100(data_dir, train=False)
    if dataset == "synthetic":
        return SyntheticCIFAR(train_size, train=True, seed=seed), SyntheticCIFAR(test_size, train=False, seed=seed)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def build_splits(
    dataset: str,
    data_dir: str | Path = "data",
    *,
    download: bool = False,
    verify_checksums: bool = True,
    val_size: int = 2500,
    split_seed: int = 0,
    train_limit: int | None = None,
    synthetic_train_size: int = 5000,
    synthetic_test_size: int = 1000,
    synthetic_seed: int = 0,
    augment: bool = True,
    augment_seed: int = 0,
) -> DataSplits:
    """Load ``dataset`` ("cifar100" from ``data_dir``, or "synthetic") and split it into train / val / test.

    Validation is ``val_size`` images carved class-balanced out of the training set (see
    ``class_balanced_split``); train and val are views of one base dataset. Training images get the
    augmentation (when ``augment``), drawn per sample from (``augment_seed``, epoch, index); all are
    normalised.

    Raises:
        DataError: CIFAR-100 is missing, corrupt, or could not be downloaded.
        ValueError: unknown ``dataset`` or inconsistent sizes.
    """
    train_base, test_base = _base_datasets(
        dataset, data_dir, download, verify_checksums, synthetic_train_size, synthetic_test_size, synthetic_seed
    )
    num_classes = len(train_base.classes)
    train_idx, val_idx = class_balanced_split(train_base.targets, val_size, num_classes, split_seed, train_limit)
    return DataSplits(
        train=TransformedView(train_base, train_idx, augment=augment, seed=augment_seed),
        val=TransformedView(train_base, val_idx),
        test=TransformedView(test_base, range(len(test_base))),
        kind=dataset,
        num_classes=num_classes,
    )
