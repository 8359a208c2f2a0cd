"""Training data (conf/dataset/*.yaml): a source of items (base.py, loaders.py, latents.py) placed on the device
or streamed from disk (placement.py), behind one interface (base.py's docstring)."""
from diffrun.data.base import ArraySource, Source
from diffrun.data.cifar import load_cifar
from diffrun.data.device import InMemoryImages
from diffrun.data.labels import balanced_labels, drop_labels
from diffrun.data.latents import LatentSource, encode_images, load_latents
from diffrun.data.loaders import load_celeba, load_digits, load_image_folder, load_imagenet64
from diffrun.data.order import EpochOrder
from diffrun.data.placement import place
from diffrun.data.streaming import StreamingData

__all__ = ["ArraySource", "Source", "InMemoryImages", "StreamingData", "EpochOrder", "LatentSource", "place",
           "balanced_labels", "drop_labels", "encode_images", "load_latents", "load_celeba", "load_cifar",
           "load_digits", "load_image_folder", "load_imagenet64"]
