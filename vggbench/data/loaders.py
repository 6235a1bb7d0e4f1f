"""Transforms, transformed views of a base dataset, and DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def make_transform(*, augment: bool) -> transforms.Compose:
    """PIL image -> normalised float tensor (3, 32, 32); with ``augment``, random crop (padding 4) and flip first."""
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    return transforms.Compose([*augmentation, transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])


class TransformedView(Dataset):
    """The samples ``indices`` of ``base`` (which returns untransformed PIL images), passed through ``transform``.

    Several views (e.g. train and validation, with different transforms) share one base dataset.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Any], Any]):
        self.base = base
        self.indices = indices
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.base[self.indices[index]]
        return self.transform(image), target

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader for training (reshuffled every epoch, last partial batch kept) or evaluation (fixed order).

    ``generator`` drives the shuffling and the worker seeds (hence the augmentation in workers), making
    the batches reproducible (the trainer builds one loader per epoch from a per-epoch generator, so
    workers are not kept across epochs). A ``sampler`` (a DistributedSampler in distributed training)
    replaces the shuffling. Memory is pinned only for CUDA devices.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def rank_shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Rank ``rank``'s share of ``dataset`` for evaluation: every ``world_size``-th sample from ``rank`` on.

    The shares of all ranks hold every sample exactly once (unlike DistributedSampler, which
    pads them to equal length with repeated samples), so sums over the shares equal the sums
    over the dataset. The dataset itself for a single process.
    """
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))
