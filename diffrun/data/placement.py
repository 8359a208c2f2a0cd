"""Where the training data lives: `dataset.placement` = auto | device | stream, and `dataset.order` = auto | iid | epoch.

    device   the whole dataset as one tensor on the training device (`InMemoryImages`), batches gathered there
    stream   DataLoader workers read items into pinned memory (`StreamingData`)
    auto     device when the dataset takes at most half of the device's free memory, else stream. The free
             memory is measured before the model is built (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable
             of /proc/meminfo), and the other half is left to the model, its optimizer state and activations.

An explicit `placement=device` fails before training when the dataset is larger than all the free memory.
Orders: `iid` draws each batch's indices and flips from the global torch RNG (diffrun's original fast path;
device only); `epoch` takes seeded per-epoch permutations (`EpochOrder`). `auto` is iid on the device and
epoch for the stream, and on the device continues a checkpoint that was streamed in its epoch order (a run
resumed, or scored by diffrun-eval, on a machine with more memory). With order=epoch the device and the
stream give the same batches, bit for bit.
"""
from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from diffrun.data.base import Source
from diffrun.data.device import InMemoryImages
from diffrun.data.order import EpochOrder
from diffrun.data.streaming import StreamingData
from diffrun.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "stream")
ORDERS = ("auto", "iid", "epoch")
DEVICE_SHARE = 0.5          # placement=auto: at most this share of the free device memory for the dataset
GB = 1024**3


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now (CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_placement(requested: str, nbytes: int, free: int, device: torch.device, name: str) -> str:
    """`device` or `stream`, by the rule of the module docstring."""
    if requested not in PLACEMENTS:
        raise ConfigError(f"dataset.placement={requested!r}: allowed {', '.join(PLACEMENTS)}")
    if requested == "device" and nbytes > free:
        raise DataError(f"dataset.placement=device: dataset {name} takes {nbytes / GB:.2f} GiB and {device} has "
                        f"{free / GB:.2f} GiB free; use dataset.placement=stream (or auto)")
    if requested != "auto":
        return requested
    return "device" if nbytes <= DEVICE_SHARE * free else "stream"


def resolve_order(order: str, placement: str) -> str:
    if order not in ORDERS:
        raise ConfigError(f"dataset.order={order!r}: allowed {', '.join(ORDERS)}")
    if order == "auto":
        return "iid" if placement == "device" else "epoch"
    if order == "iid" and placement == "stream":
        raise ConfigError("dataset.order=iid draws from the global RNG on the device, but the data is streamed "
                          "(dataset.placement=stream, or auto for a dataset too large for the device); "
                          "use dataset.order=epoch (or auto)")
    return order


def place(source: Source, dataset: DictConfig, device: torch.device, seed: int, rank: int = 0,
          world_size: int = 1):
    """The training data for this rank: `source` placed as `dataset.placement` and `dataset.order` say."""
    num_classes = int(dataset.get("num_classes", 0) or 0)
    source.check_labels(num_classes)
    nbytes = source.nbytes()
    placement = choose_placement(str(dataset.get("placement", "auto")), nbytes, free_memory(device), device,
                                 source.name)
    requested_order = str(dataset.get("order", "auto"))
    order = resolve_order(requested_order, placement)

    def epoch_order() -> EpochOrder:
        return EpochOrder(len(source), seed, rank, world_size, source.random_flip)

    epochs = epoch_order() if order == "epoch" else None
    log.info("dataset %s: %d items, %.2f GiB, placement=%s, order=%s", source.name, len(source), nbytes / GB,
             placement, order)
    workers = min(int(dataset.get("workers", 4)), len(os.sched_getaffinity(0)))   # no more readers than CPUs
    if placement == "device":
        return InMemoryImages(source, num_classes=num_classes, order=epochs, workers=workers,
                              epoch_order=epoch_order if requested_order == "auto" else None).to(device)
    return StreamingData(source, epochs, device, num_classes=num_classes, workers=workers)
