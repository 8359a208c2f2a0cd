"""FID evaluation throughput: DDIM sampling with the EMA model, and Inception-v3 feature extraction."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from bench.measure import Clock


def bench_sampler(trainer, clock: Clock, batch: int, steps: int, windows: int, sampler: str = "ddim") -> dict:
    """Samples/s of `sampler` with the EMA model, one generator per image as the FID evaluation draws them."""
    from diffrun.sampling import PerImageGenerator, SamplerOptions, run_sampler

    shape = (batch, trainer.data.channels, trainer.data.image_size, trainer.data.image_size)

    def draw(n_steps: int) -> int:
        return run_sampler(trainer.ema.model, trainer.schedule, shape, SamplerOptions(sampler=sampler, steps=n_steps),
                           generator=PerImageGenerator(trainer.device, range(batch)), device=trainer.device,
                           autocast_dtype=trainer.autocast_dtype).nfe

    draw(2)                                                    # warm-up (kernels, allocator)
    nfe = SamplerOptions(sampler=sampler, steps=steps).nfe
    seconds = statistics.median(clock.time(lambda: draw(steps)) for _ in range(windows))
    return {"stage": f"{sampler} {steps} steps ({nfe} NFE, EMA model)", "batch": batch, "steps": steps, "nfe": nfe,
            "images_per_s": batch / seconds, "net_evals_per_s": batch * nfe / seconds, "seconds": seconds,
            "notes": "eager EMA model, per-image generators, as Trainer.generate runs it"}


def load_inception(device: torch.device, download: bool, random_init: bool) -> tuple[torch.nn.Module | None, str]:
    """(extractor taking uint8 images, description) or (None, 'n/a (reason)')."""
    reason = None
    try:
        from diffrun.evaluation.inception import resolve_inception_weights
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        weights = resolve_inception_weights(download=download)
        cls = FEATURE_EXTRACTORS_REGISTRY[weights.feature_extractor]
        net = cls(weights.feature_extractor, ["2048"], feature_extractor_weights_path=str(weights.path))
        return net.to(device).eval(), f"torch-fidelity {weights.feature_extractor}, weights: {weights.source}"
    except Exception as exc:                                   # missing module, no weights offline, ...
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if not random_init:
        return None, f"n/a ({reason})"
    from torchvision.models import inception_v3

    body = inception_v3(weights=None, aux_logits=False, init_weights=False)
    body.fc = torch.nn.Identity()

    class RandomInit(torch.nn.Module):                         # same input handling as torch-fidelity's
        def forward(self, x):
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            return body((x - 128) / 128)

    return RandomInit().to(device).eval(), f"RANDOM-INIT torchvision inception_v3: throughput only, no FID ({reason})"


def bench_inception(device: torch.device, clock: Clock, batch: int, windows: int, download: bool,
                    random_init: bool) -> dict:
    row = {"stage": "Inception-v3 features (299 px)", "batch": batch, "images_per_s": None,
           "net_evals_per_s": None}
    net, notes = load_inception(device, download, random_init)
    row["notes"] = notes
    if net is None:
        return row
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    with torch.no_grad():
        net(images)                                            # warm-up
        seconds = statistics.median(clock.time(lambda: net(images)) for _ in range(windows))
    row.update(images_per_s=batch / seconds, net_evals_per_s=batch / seconds, seconds=seconds)
    return row
