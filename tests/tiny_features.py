"""A stand-in for Inception in the default tier's FID tests: 2048 features in microseconds.

The FID plumbing (protocol record, reference caching, metrics/W&B/report records, evaluation never changing
training) does not depend on which network makes the features, so the default tier runs it against this
extractor, registered with torch-fidelity like ours and loaded from a real weights file. The full tier (`--full`)
runs the same tests with TF-Inception; test_fid.py holds the numeric Inception checks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from diffrun.evaluation import inception
from diffrun.evaluation.inception import InceptionWeights

NAME = "diffrun-test-tiny-features"
POOLED = 3 * 4 * 4                   # RGB pooled to 4x4: enough to tell digits from noise


class TinyFeatures(FeatureExtractorBase):
    """uint8 N x 3 x H x W → tanh(W · avgpool₄ₓ₄(x/255) + b), 2048-d."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.project = torch.nn.Linear(POOLED, 2048)
        self.project.load_state_dict(torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True))

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric in ("fid", "kid", "prc"):
            return "2048"
        raise ValueError(f"{NAME} gives no features for {metric}")

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return (torch.tanh(self.project(pooled)),)


class TinyWeights(InceptionWeights):
    @property
    def feature_extractor(self) -> str:
        return NAME


def write_weights(folder: Path) -> TinyWeights:
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, TinyFeatures)
    path = folder / "tiny-features.pt"
    if not path.is_file():
        generator = torch.Generator().manual_seed(0)
        torch.save({"weight": torch.randn(2048, POOLED, generator=generator) * 4 / POOLED ** 0.5,
                    "bias": torch.zeros(2048)}, path)
    return TinyWeights(path, source="converted", has_classifier_head=False)


def use_tiny_features(monkeypatch, weights: TinyWeights) -> None:
    """Every diffrun module that resolves Inception weights gets the tiny extractor instead."""
    original = inception.resolve_inception_weights
    for module in [m for name, m in sys.modules.items() if name.startswith("diffrun.")]:
        if getattr(module, "resolve_inception_weights", None) is original:
            monkeypatch.setattr(module, "resolve_inception_weights", lambda *args, **kwargs: weights)
