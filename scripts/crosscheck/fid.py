"""diffrun's FID against torch-fidelity's own image-folder pipeline, and its Fréchet distance against NVlabs/edm's.

1. The same images two ways: as uint8 tensors through `diffrun.evaluation.fid.compute_fid_kid` (torch-fidelity on
   in-memory datasets, cached reference statistics), and as PNG folders through `torch_fidelity.calculate_metrics`
   with the same Inception weights — the FIDs are compared.
2. `frechet_distance` against EDM `fid.py::calculate_fid_from_inception_stats` (scipy `sqrtm`) on statistics of
   random 2048-d features (two sample sizes, so the covariances are full-rank and rank-deficient).

    PYTHONPATH=. python scripts/crosscheck/fid.py --reference /path/to/edm [--inception-weights FILE]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.evaluation.fid import compute_fid_kid, frechet_distance  # noqa: E402
from diffrun.evaluation.inception import resolve_inception_weights  # noqa: E402


def images(n: int, seed: int, shift: int) -> torch.Tensor:
    """n 3×32×32 uint8 images: smooth random blobs, brightened by `shift` (two sets with a real FID between them)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return (smooth * 200 + shift).clamp(0, 255).round().to(torch.uint8)


def write_png_folder(batch: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(batch):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return folder


def pipeline_rows(n: int, seed: int, weights_path: str | None) -> list:
    weights = resolve_inception_weights(weights_path)
    generated, reference = images(n, seed, 40), images(n, seed + 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        ours = compute_fid_kid(generated, reference, reference_name=f"crosscheck-{seed}-{n}", weights_path=weights,
                               kid=False, cache_dir=tmp)["fid"]
        theirs = torch_fidelity.calculate_metrics(
            input1=str(write_png_folder(generated, Path(tmp) / "generated")),
            input2=str(write_png_folder(reference, Path(tmp) / "reference")),
            feature_extractor=weights.feature_extractor, feature_extractor_weights_path=str(weights.path),
            fid=True, cuda=False, cache=False, verbose=False)[torch_fidelity.KEY_METRIC_FID]
    return [compare(f"FID of {n} vs {n} images: diffrun (tensors) vs torch-fidelity (PNG folders)",
                    torch.tensor(ours), torch.tensor(theirs), 1e-5)]


def formula_rows(edm_fid, seed: int) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    for n in (4096, 1000):   # 1000 < 2048: rank-deficient covariances, as a small FID reference gives
        a = rng.standard_normal((n, 2048)) * rng.uniform(0.2, 2.0, 2048)
        b = rng.standard_normal((n, 2048)) * rng.uniform(0.2, 2.0, 2048) + 0.1
        stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
        ours = frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
        theirs = edm_fid.calculate_fid_from_inception_stats(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
        rows.append(compare(f"Fréchet distance of random 2048-d statistics from {n} samples each (float64)",
                            torch.tensor(ours), torch.tensor(theirs), 1e-9))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "NVlabs/edm")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--inception-weights", default=None, help="torch-fidelity-format weights (default: diffrun's)")
    args = p.parse_args(argv)
    edm_fid = load_reference(args.reference, "fid")
    rows = formula_rows(edm_fid, args.seed) + pipeline_rows(args.images, args.seed, args.inception_weights)
    return report("FID vs torch-fidelity's pipeline and EDM's formula", reference_commit(args.reference),
                  command_line(), rows)


if __name__ == "__main__":
    raise SystemExit(main())
