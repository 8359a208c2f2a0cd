"""Images from a model's EMA weights with the options of one config section (`sample.*` or `eval.*`): what a
sample grid and an FID evaluation draw, in training and in diffrun-eval alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffrun.data import balanced_labels
from diffrun.sampling.images import to_uint8
from diffrun.sampling.options import SamplerOptions, autocast_dtype
from diffrun.sampling.samplers import PerImageGenerator, run_sampler
from diffrun.schedules import NoiseSchedule


@dataclass(frozen=True)
class ImageSampler:
    model: nn.Module                        # the EMA network
    schedule: NoiseSchedule
    data: object                            # the dataset: image shape, classes, latents decoded to pixels
    device: torch.device
    train_dtype: torch.dtype | None         # the run's autocast dtype (`precision: train`)

    @torch.no_grad()
    def __call__(self, num_images: int, seed: int | range, settings, section: str,
                 class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """(uint8 images, network evaluations per image) with the sampler options of `settings` (the `section`
        node) and a generator of their own (a fixed seed: comparable across runs and steps); with a range of
        `num_images` seeds, one generator per image (the same images at any batch size: FID). A class-conditional
        model samples `class_labels` ((num_images,) int64), by default every class equally often
        (`balanced_labels(num_images, num_classes, seed)`); latents are decoded to pixels first."""
        options = SamplerOptions.from_config(settings, section)
        if isinstance(seed, range):
            generator = PerImageGenerator(self.device, seed)
            seed = seed.start
        else:
            generator = torch.Generator(self.device).manual_seed(seed)
        num_classes, labels = self.data.num_classes, None
        if num_classes:
            labels = class_labels if class_labels is not None else balanced_labels(num_images, num_classes, seed)
            labels = labels.to(self.device)
        result = run_sampler(self.model, self.schedule, (num_images, *self.data.shape), options,
                             generator=generator, device=self.device, class_labels=labels,
                             num_classes=num_classes or None,
                             autocast_dtype=autocast_dtype(settings.precision, self.train_dtype, section))
        return to_uint8(self.data.decode(result.images)), result.nfe
