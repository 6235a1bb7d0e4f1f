"""Transforms, transformed views of a base dataset, and DataLoaders."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import functional as TF

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


PADDING = 4  # RandomCrop(32, padding=4)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one sample's augmentation: a function of (seed, epoch, sample index) alone.

    Python's Random seeds from a string through SHA-512: the same stream in every process,
    DataLoader worker and rank, whatever else has drawn random numbers.
    """
    return random.Random(f"{seed}/{epoch}/{index}")


def crop_and_flip(pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """RandomCrop(size, padding=4) (zero padding) and RandomHorizontalFlip of a (C, H, W) tensor, drawn from `rng`."""
    height, width = pixels.shape[-2:]
    top, left = rng.randint(0, 2 * PADDING), rng.randint(0, 2 * PADDING)
    padded = F.pad(pixels, (PADDING,) * 4)
    pixels = padded[:, top:top + height, left:left + width]
    return pixels.flip(-1) if rng.random() < 0.5 else pixels


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`'s shuffle: a function of (seed, epoch) alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # a non-negative 63-bit seed


class TransformedView(Dataset):
    """The samples ``indices`` of ``base`` (untransformed PIL images) as normalised tensors, optionally augmented.

    Several views (e.g. train and validation) share one base dataset. With ``augment``,
    sample i of epoch e is cropped and flipped as ``sample_rng(seed, e, i)`` says (set the
    epoch with ``set_epoch``), so an epoch's images do not depend on the number of
    DataLoader workers, on the rank that loads them, or on a resume.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], *, augment: bool = False, seed: int = 0):
        self.base = base
        self.indices = indices
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augment as in `epoch` from now on (a DataLoader created afterwards carries it to its workers)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = self.base[self.indices[index]]
        pixels = TF.to_tensor(image)
        if self.augment:
            pixels = crop_and_flip(pixels, sample_rng(self.seed, self.epoch, index))
        return TF.normalize(pixels, CIFAR_MEAN, CIFAR_STD), target

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

    ``generator`` drives the shuffling, making the order reproducible (the trainer builds one
    loader per epoch from a per-epoch generator). A ``sampler`` (a DistributedSampler in
    distributed training) replaces the shuffling. Memory is pinned only for CUDA devices.
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
