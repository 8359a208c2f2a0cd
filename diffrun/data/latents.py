"""Precomputed latents: SD-VAE latents of every training image and of its mirror image, memory-mapped.

A latent folder (written by `encode_images`, the work of scripts/encode_latents.py):

    meta.json      {"format": "diffrun-latents", "version": 1, "count": N, "shape": [2, C, h, w], "dtype",
                    "scale_factor", "vae", "posterior", "seed", "image_size", "image_channels", "preprocess",
                    "num_classes", "labels", "source"}; written last, so a folder without it is unfinished
    latents.npy    (N, 2, C, h, w): [:, 0] the latent of image i, [:, 1] of its horizontal mirror, both already
                   multiplied by scale_factor (0.18215 for SD-VAE, Rombach et al. 2022 §4.3.2 / DiT), as the
                   network sees them
    labels.npy     (N,) int64 class labels (absent for an unlabelled source)

`decode` divides by the scale factor and runs the VAE's decoder (diffusers' AutoencoderKL), which is loaded
from a local folder or the Hugging Face cache only: compute nodes are offline, so a missing VAE is an error
that says what to provide, never a download.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from diffrun.checks import POSITIVE, Interval, check_number, show
from diffrun.config import NOT_TRAINED
from diffrun.data.base import LATENTS, Source, pixels_to_input
from diffrun.data.loader_checks import LoaderChecks, Needs, checked_by
from diffrun.data.loaders import ImageFileSource, image_files
from diffrun.errors import ConfigError, DataError
from diffrun.files import atomic_path, atomic_write_json

FORMAT, VERSION = "diffrun-latents", 1
POSTERIORS = ("sample", "mean")   # one draw of the VAE posterior (DiT's `latent_dist.sample()`), or its mean
DTYPES = ("float16", "float32")
DECODE_BATCH = 32                 # images decoded at once


# --- the VAE ---------------------------------------------------------------------------------------
def vae_location(name: str) -> str | None:
    """Where `from_pretrained(name, local_files_only=True)` finds the VAE: a local folder with config.json, or a
    Hugging Face repository id already in the hub cache. None: not on this machine."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path) if (path / "config.json").is_file() else None
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return name if isinstance(cached, str) else None


def missing_vae_message(name: str, key: str) -> str:
    if Path(name).expanduser().is_dir():
        return (f"{key}={name!r} is a folder without config.json; allowed a folder written by "
                f"AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)")
    return (f"{key}={name!r}: the VAE is not on this machine (not a local folder, not in the Hugging Face cache "
            f"{_hub_cache()}), and nothing is downloaded at run time. Provide it: on a machine with internet run "
            f"`python -c \"from diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('{name}')\"` and copy "
            f"the cache here (or set HF_HOME), or save it with .save_pretrained(folder) and set {key}=<folder>")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def load_vae(name: str, device: torch.device | str = "cpu", key: str = "dataset.loader.vae"):
    """diffusers' AutoencoderKL from a local folder or the hub cache, in eval mode, without gradients."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise DataError("latents need diffusers for their VAE: pip install diffusers") from exc
    location = vae_location(name)
    if location is None:
        raise DataError(missing_vae_message(name, key))
    vae = AutoencoderKL.from_pretrained(location, local_files_only=True, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


# --- reading ---------------------------------------------------------------------------------------
def read_meta(root: str | Path, key: str = "dataset.root") -> dict:
    root = Path(root).expanduser()
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        unfinished = (root / "latents.npy").exists() or any(root.glob(".latents.npy*"))
        raise DataError(f"{key}={root} is not a latent folder written by scripts/encode_latents.py: no meta.json"
                        + (" (the encoding did not finish: run it again)" if unfinished else ""))
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc}); re-run scripts/encode_latents.py") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                        f"{FORMAT!r} version {VERSION}; re-encode with scripts/encode_latents.py")
    return meta


def check_meta(meta: dict, root: str | Path, channels: int | None, image_size: int | None,
               scale_factor: float | None, num_classes: int | None) -> None:
    """The latent folder is what the config says it trains on: shape, scale factor, labels."""
    _flips, stored_channels, height, width = meta["shape"]
    if channels is not None and channels != stored_channels:
        raise DataError(f"dataset.channels={channels}, but the latents in {root} have {stored_channels} channels "
                        f"(shape {meta['shape'][1:]}); set dataset.channels={stored_channels}")
    if image_size is not None and (height, width) != (image_size, image_size):
        raise DataError(f"dataset.image_size={image_size}, but the latents in {root} are {height}x{width} "
                        f"(from {meta['image_size']}px images); set dataset.image_size={height}")
    if scale_factor is not None and not math.isclose(scale_factor, meta["scale_factor"], rel_tol=1e-9):
        raise DataError(f"dataset.loader.scale_factor={scale_factor}, but the latents in {root} were scaled by "
                        f"{meta['scale_factor']} (VAE {meta['vae']}); set dataset.loader.scale_factor="
                        f"{meta['scale_factor']} or re-encode")
    if num_classes and not meta.get("labels"):
        raise DataError(f"dataset.num_classes={num_classes}, but the latents in {root} have no labels; "
                        f"set dataset.num_classes=0 or encode a labelled source")
    if num_classes and meta.get("num_classes", 0) > num_classes:
        raise DataError(f"dataset.num_classes={num_classes}, but the latents in {root} have labels of "
                        f"{meta['num_classes']} classes; set dataset.num_classes={meta['num_classes']}")


class LatentSource(Source):
    """Memory-mapped latents (and labels) of a latent folder; `decode` runs the VAE."""

    kind = LATENTS

    def __init__(self, root: str | Path, random_flip: bool = False, scale_factor: float | None = None,
                 vae: str | None = None, reference_root: str | None = None):
        self.root = Path(root).expanduser()
        self.meta = meta = read_meta(self.root)
        check_meta(meta, self.root, None, None, scale_factor, None)
        self.name = f"latents:{self.root.name}"
        self.random_flip, self.scale_factor = random_flip, float(meta["scale_factor"])
        self.shape = tuple(meta["shape"][1:])
        self.vae_name, self.reference_root = vae or meta["vae"], reference_root
        array = self._open()
        expected = (meta["count"], *meta["shape"])
        if array.shape != expected or str(array.dtype) != meta["dtype"]:
            raise DataError(f"{self.root / 'latents.npy'} is {array.dtype} {array.shape}, meta.json says "
                            f"{meta['dtype']} {expected}: the folder is damaged; re-run scripts/encode_latents.py")
        self.labels = None
        if meta.get("labels"):
            self.labels = np.array(np.load(self.root / meta["labels"], mmap_mode="r"), dtype=np.int64)
            if self.labels.shape != (meta["count"],):
                raise DataError(f"{self.root / meta['labels']} holds {self.labels.shape[0]} labels for "
                                f"{meta['count']} latents; re-run scripts/encode_latents.py")
        self._vae = None

    def _open(self) -> np.ndarray:
        try:
            return np.load(self.root / "latents.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.root / 'latents.npy'} cannot be read ({exc}); re-run scripts/encode_latents.py") from exc

    @property
    def array(self) -> np.ndarray:
        if getattr(self, "_array", None) is None:
            self._array = self._open()        # opened in each worker process, never pickled
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_vae": None}

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def stored_flips(self) -> int:
        """Latent variants kept on a device: both with random flips, else only the unflipped one."""
        return 2 if self.random_flip else 1

    def item(self, index: int, flip: bool) -> Tensor:
        return torch.from_numpy(np.array(self.array[index, int(flip and self.random_flip)]))

    def materialize(self, workers: int = 0) -> Tensor:
        return torch.from_numpy(np.array(self.array[:, :self.stored_flips]))

    def nbytes(self) -> int:
        per_item = self.stored_flips * int(np.prod(self.shape)) * np.dtype(self.meta["dtype"]).itemsize
        return len(self) * per_item + (0 if self.labels is None else 8 * len(self))

    def decode(self, x: Tensor) -> Tensor:
        """Latents → pixels in [−1, 1]: x / scale_factor through the VAE's decoder, in float32."""
        if self._vae is None:
            self._vae = load_vae(self.vae_name, x.device)
        with torch.no_grad():
            pixels = [self._vae.decode(chunk.float() / self.scale_factor).sample
                      for chunk in x.split(DECODE_BATCH)]
        return torch.cat(pixels).clamp(-1, 1)

    def reference_images(self, count: int, seed: int) -> Tensor:
        """The FID reference is the original images, not decoded latents: `reference_root`, a folder of them,
        centre-cropped as they were encoded. Without it, evaluation needs eval.reference_stats."""
        if self.reference_root is None:
            raise DataError(f"dataset {self.name} holds latents, and FID compares pixels: set "
                            f"dataset.loader.reference_root=<folder of the original images> or "
                            f"eval.reference_stats=<precomputed Inception statistics>")
        root = Path(self.reference_root).expanduser()
        files = image_files(root, "dataset.loader.reference_root")
        size, channels = self.meta["image_size"], self.meta["image_channels"]
        images = ImageFileSource(files, f"reference:{root.name}", size, channels, random_flip=False, center_crop=True)
        return images.reference_images(count, seed)


def _values(spec: dict, dataset: dict) -> None:
    check_number("dataset.channels", dataset["channels"], POSITIVE, integer=True)
    check_number("dataset.loader.scale_factor", spec.get("scale_factor"),
                 Interval(0, low_open=True, note="or null: the latent folder's own"))


def _files(spec: dict, dataset: dict, key: str, needs: Needs) -> None:
    """meta.json agrees with the config (shape, scale factor, classes); the VAE that decodes samples is on this
    machine when images are made; FID has a pixel reference (the original images, or statistics)."""
    meta = read_meta(spec["root"], key)
    check_meta(meta, spec["root"], dataset["channels"], dataset["image_size"], spec.get("scale_factor"),
               dataset.get("num_classes", 0))
    vae = spec.get("vae") or meta["vae"]
    if needs.decoded and vae_location(vae) is None:
        raise DataError(missing_vae_message(vae, "dataset.loader.vae"))
    reference = spec.get("reference_root")
    if needs.fid_reference and reference is None:
        raise ConfigError("eval.enabled=true on latents: FID compares pixels, so it needs "
                          "dataset.loader.reference_root=<folder of the original images> or "
                          "eval.reference_stats=<precomputed statistics>; or set eval.enabled=false")
    if needs.fid and reference is not None and not Path(reference).expanduser().is_dir():
        raise DataError(f"dataset.loader.reference_root={show(reference)} is not a directory; allowed the folder "
                        f"of the original images the latents were encoded from")


@checked_by(LoaderChecks(values=_values, files=_files))
def load_latents(root: Annotated[str, NOT_TRAINED], random_flip: bool = False, scale_factor: float | None = None,
                 vae: Annotated[str | None, NOT_TRAINED] = None,
                 reference_root: Annotated[str | None, NOT_TRAINED] = None) -> LatentSource:
    """A latent folder written by scripts/encode_latents.py. `random_flip`: each draw takes the latent of the
    image or of its mirror at random; `scale_factor` must equal the folder's; `vae`: the decoder (None: the
    one that encoded them); `reference_root`: the original images, the FID reference."""
    return LatentSource(root, random_flip, scale_factor, vae, reference_root)


# --- writing ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(source: Source, vae, out: str | Path, *, vae_name: str, batch_size: int = 64,
                  dtype: str = "float16", posterior: str = "sample", seed: int = 0, workers: int = 4,
                  scale_factor: float | None = None, description: str = "", log_every: int = 0) -> dict:
    """Encode every image of a pixel `source` and its horizontal mirror with `vae` into a latent folder `out`.
    Returns the metadata. The arrays are written under temporary names and meta.json last."""
    from torch.utils.data import DataLoader

    if source.kind != "pixels" or source.shape[0] != vae.config.in_channels:
        raise DataError(f"{source.name}: the VAE encodes {vae.config.in_channels}-channel pixel images, the source "
                        f"has {source.shape[0]}-channel {source.kind}")
    if posterior not in POSTERIORS or dtype not in DTYPES:
        raise DataError(f"posterior={posterior!r}, dtype={dtype!r}: allowed {POSTERIORS} and {DTYPES}")
    scale = float(scale_factor if scale_factor is not None else vae.config.scaling_factor)
    device = next(vae.parameters()).device
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    size = source.shape[-1]
    if size % down:
        raise DataError(f"{source.name}: {size}px images do not divide by the VAE's downsampling factor {down}")
    shape = (2, vae.config.latent_channels, size // down, size // down)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)           # the folder is unfinished until meta.json is back
    with contextlib.ExitStack() as files:   # each array appears whole (diffrun.files.atomic_path) or not at all
        tmp_latents = files.enter_context(atomic_path(out / "latents.npy"))
        tmp_labels = files.enter_context(atomic_path(out / "labels.npy")) if source.labels is not None else None
        latents = np.lib.format.open_memmap(tmp_latents, mode="w+", dtype=dtype, shape=(len(source), *shape))
        labels = (np.lib.format.open_memmap(tmp_labels, mode="w+", dtype=np.int64, shape=(len(source),))
                  if tmp_labels is not None else None)
        generator = torch.Generator(device).manual_seed(seed)
        loader = DataLoader(_Unflipped(source), batch_size=batch_size, shuffle=False, num_workers=workers)
        start = 0
        for images in loader:
            x = pixels_to_input(images.to(device))
            dist = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
            z = (dist.sample(generator=generator) if posterior == "sample" else dist.mean) * scale
            count = x.shape[0]
            latents[start:start + count] = torch.stack([z[:count], z[count:]], dim=1).cpu().numpy().astype(dtype)
            if labels is not None:
                labels[start:start + count] = source.labels[start:start + count]
            start += count
            if log_every and (start // batch_size) % log_every == 0:
                print(f"encoded {start}/{len(source)}", flush=True)
        latents.flush()
        del latents
        if labels is not None:
            labels.flush()
            del labels
    meta = {
        "format": FORMAT, "version": VERSION, "count": len(source), "shape": list(shape), "dtype": dtype,
        "scale_factor": scale, "vae": vae_name, "posterior": posterior, "seed": seed,
        "image_size": size, "image_channels": source.shape[0], "preprocess": getattr(source, "preprocess", ""),
        "num_classes": int(source.labels.max()) + 1 if source.labels is not None else 0,
        "labels": "labels.npy" if source.labels is not None else None, "source": description or source.name,
    }
    atomic_write_json(out / "meta.json", meta)
    return meta


class _Unflipped(torch.utils.data.Dataset):
    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Tensor:
        return self.source.item(index, False)
