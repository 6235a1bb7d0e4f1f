"""A small, learnable stand-in for CIFAR-100 when the real data is not available (demos, tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

NUM_CLASSES = 100
IMAGE_SIZE = 32
COLOUR_RANGE = 64.0  # class colours are uniform in 128 +- COLOUR_RANGE per channel
COLOUR_JITTER = 10.0  # per-sample shift of the colour (std, 0..255 units): colour alone is ambiguous
GRATING_AMPLITUDE = 48.0  # contrast of the class's oriented grating
FREQUENCIES = (2.0, 3.5, 5.0)  # grating cycles per image
NOISE_STD = 24.0  # per-pixel Gaussian noise, in 0..255 units

_STYLE_STREAM, _TRAIN_STREAM, _TEST_STREAM = range(3)


def class_styles(seed: int) -> dict[str, np.ndarray]:
    """Each class's look: a colour (NUM_CLASSES, 3), a grating orientation (radians) and frequency."""
    rng = np.random.default_rng([seed, _STYLE_STREAM])
    return {
        "colour": rng.uniform(-COLOUR_RANGE, COLOUR_RANGE, size=(NUM_CLASSES, 3)).astype(np.float32),
        "angle": rng.uniform(0.0, np.pi, size=NUM_CLASSES).astype(np.float32),
        "frequency": rng.choice(np.asarray(FREQUENCIES, np.float32), size=NUM_CLASSES),
    }


def _samples(styles: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``size`` balanced, shuffled samples as uint8 images (N, 32, 32, 3) and their labels.

    A sample is its class colour (jittered) plus its class grating at a random phase (so
    position carries no information) plus pixel noise.
    """
    labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), size // NUM_CLASSES))
    colour = styles["colour"][labels] + COLOUR_JITTER * rng.standard_normal((size, 3), dtype=np.float32)
    angle, frequency = styles["angle"][labels], styles["frequency"][labels]
    phase = rng.uniform(0.0, 2 * np.pi, size=size).astype(np.float32)
    y, x = np.meshgrid(np.arange(IMAGE_SIZE, dtype=np.float32), np.arange(IMAGE_SIZE, dtype=np.float32),
                       indexing="ij")
    along = x[None] * np.cos(angle)[:, None, None] + y[None] * np.sin(angle)[:, None, None]
    grating = np.sin(2 * np.pi * frequency[:, None, None] * along / IMAGE_SIZE + phase[:, None, None])
    images = colour[:, None, None, :] + GRATING_AMPLITUDE * grating[..., None]
    images += NOISE_STD * rng.standard_normal(size=images.shape, dtype=np.float32)
    return np.clip(np.rint(images + 128.0), 0, 255).astype(np.uint8), labels


class SyntheticCIFAR(Dataset):
    """Synthetic 32x32 colour images in 100 balanced classes, with the interface of torchvision's CIFAR100.

    Every class has a colour and an oriented grating (orientation and frequency) drawn from
    ``seed``; a sample is its class colour, jittered, plus the grating at a random phase, plus
    Gaussian pixel noise. Colour alone is ambiguous between neighbouring classes, the grating
    separates them; both survive global average pooling, so the study's networks pick them up
    within a few hundred steps when their gradients flow. The train and test parts share the
    class styles but draw samples from different random streams derived from ``seed``; the
    same arguments give identical bytes.

    Attributes:
        data: uint8 array (N, 32, 32, 3).
        targets: class index of every image.
        classes: class names, ``"synthetic-class-00"`` .. ``"synthetic-class-99"``.
    """

    def __init__(self, size: int, *, train: bool = True, seed: int = 0, transform: Callable | None = None):
        if size <= 0 or size % NUM_CLASSES:
            raise ValueError(f"synthetic dataset size must be a positive multiple of {NUM_CLASSES}, got {size}")
        rng = np.random.default_rng([seed, _TRAIN_STREAM if train else _TEST_STREAM])
        self.data, labels = _samples(class_styles(seed), size, rng)
        self.targets: list[int] = labels.tolist()
        self.classes = [f"synthetic-class-{i:02d}" for i in range(NUM_CLASSES)]
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """The image (a PIL image passed through ``transform``) and its class index, as torchvision returns them."""
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __len__(self) -> int:
        return len(self.data)
