"""vggbench: the VGG08 vs VGG38 vanishing-gradient study on CIFAR-100, measured and scaled."""

__version__ = "0.1.0"
