"""Datasets as device-resident uint8 tensors (conf/dataset/*.yaml)."""
from diffrun.data.base import InMemoryImages
from diffrun.data.loaders import load_cifar, load_digits, load_image_folder

__all__ = ["InMemoryImages", "load_cifar", "load_digits", "load_image_folder"]
