"""Datasets in their real on-disk formats, the placements and orders behind one interface, and the errors for
missing, broken or mismatched data."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffrun.launching import local_ranks
from diffrun.validation import validate
from diffrun.data import (EpochOrder, InMemoryImages, StreamingData, load_celeba, load_cifar, load_digits,
                          load_image_folder, load_imagenet64, load_latents, place)
from diffrun.data import placement as placement_module
from diffrun.errors import ConfigError, DataError
from diffrun.training.trainer import Trainer

from conftest import write_cifar, write_image_folder
from latent_utils import write_class_folders, write_latents

GIB = 1024**3


# --- formats ---------------------------------------------------------------------------------------
def test_digits_embedded():
    source = load_digits(image_size=16)
    data = InMemoryImages(source)
    assert len(data) == 1797 and data.images.shape[1:] == (1, 16, 16) and data.images.dtype == torch.uint8
    assert data.images.max() > 200  # scaled 0..16 → 0..255
    x, labels = data.batch(32)
    assert x.shape == (32, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and labels is None
    assert sorted(set(source.labels.tolist())) == list(range(10))


def test_default_digits_run_is_unchanged(make_cfg, tmp_path):
    """The in-memory fast path draws exactly what diffrun drew before the data seam: the same batches for a seed,
    and the same losses of the default run (tests/data/digits_default_losses.json, written on commit d581d4c)."""
    from pathlib import Path

    from diffrun.cli import train
    from diffrun.monitoring.metrics import read_jsonl

    before = json.loads((Path(__file__).parent / "data" / "digits_default_losses.json").read_text())
    torch.manual_seed(0)
    data = InMemoryImages(load_digits(16))
    assert [float(data.batch(8)[0].double().sum()) for _ in range(3)] == before["batch_sums_seed0"]
    train(make_cfg(["train.log_every=1", "train.steps=8", "checkpoint.every_steps=0", "sample.num_images=0",
                    "optimizer.optim.lr=2e-4",    # the default of d581d4c
                    "model.net.downsample_padding=symmetric"]),   # the U-Net's padding before DDPM's
          tmp_path / "run")
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses == before["losses"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    write_cifar(tmp_path, name, per_file=7)
    data = load_cifar(name, str(tmp_path), download=False)
    expected = 35 if name == "cifar10" else 7
    assert data.images.shape == (expected, 3, 32, 32) and data.labels.shape == (expected,)
    test = load_cifar(name, str(tmp_path), split="test", download=False)
    assert len(test) == 7


def test_cifar_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)   # torchvision's downloader
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", str(tmp_path), download=True)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "data_batch_1" in msg and str(tmp_path) in msg
    assert "tar -xzf cifar-10-python.tar.gz" in msg


def test_cifar_download_is_torchvisions_md5_checked_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", lambda *a, **k: calls.append((a, k)))
    with pytest.raises(DataError, match="not found"):
        load_cifar("cifar100", str(tmp_path), download=True)
    (url, root), kwargs = calls[0]
    assert url.endswith("cifar-100-python.tar.gz") and kwargs["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_cifar_truncated_file(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=5)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3.*truncated"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_image_folder(tmp_path):
    write_image_folder(tmp_path, count=9, size=16)
    data = load_image_folder(str(tmp_path), image_size=16)
    assert data.materialize().shape == (9, 3, 16, 16) and data.labels is None


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_image_folder(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(str(tmp_path / "empty"), 16)
    write_image_folder(tmp_path / "mixed", count=3, size=16)
    from PIL import Image
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(DataError, match="odd.png is 20x20, expected 16x16"):
        load_image_folder(str(tmp_path / "mixed"), 16).materialize()
    assert len(load_image_folder(str(tmp_path / "mixed"), 16, resize=True).materialize()) == 4
    assert len(load_image_folder(str(tmp_path / "mixed"), 16, center_crop=True).materialize()) == 4
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(str(tmp_path / "bad"), 16).materialize()
    with pytest.raises(DataError, match="not inside a class folder"):
        load_image_folder(str(tmp_path / "mixed"), 16, resize=True, labels="subfolder")


def test_image_folder_labels_and_centre_crop(tmp_path):
    root = write_class_folders(tmp_path / "classes", classes=3, per_class=2, size=16, odd_size=True)
    source = load_image_folder(str(root), 16, center_crop=True, labels="subfolder")
    assert source.labels.tolist() == [0, 0, 1, 1, 2, 2] and source.materialize().shape == (6, 3, 16, 16)
    # EDM's dataset_tool layout (Min-SNR's 'imagenet-64x64'): dataset.json {"labels": [[file, label], ...]}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    (root / "dataset.json").write_text(json.dumps({"labels": [[f, 5 - i] for i, f in enumerate(files)]}))
    assert load_image_folder(str(root), 16, center_crop=True, labels="dataset_json").labels.tolist() == [5, 4, 3, 2, 1, 0]
    (root / "dataset.json").write_text(json.dumps({"labels": [[files[0], 1]]}))
    with pytest.raises(DataError, match="has no label for"):
        load_image_folder(str(root), 16, center_crop=True, labels="dataset_json")


def test_centre_crop_is_adms(tmp_path):
    """ADM's center_crop_arr: the shorter side scaled to the size (BOX halvings, then bicubic), the centre kept."""
    from PIL import Image

    from diffrun.data.transforms import center_crop_arr

    wide = np.zeros((40, 100, 3), np.uint8)
    wide[:, 40:60] = 255                       # a bright centre band 20 wide → 10 wide at 20 px
    out = center_crop_arr(Image.fromarray(wide), 20)
    assert out.shape == (20, 20, 3) and out[:, 5:15].min() > 200 and out[:, 0].max() < 60


def write_imagenet64_npz(root, sizes=(5, 4), image_size=8):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes, start=1):
        data = rng.integers(0, 256, (n, 3 * image_size * image_size), dtype=np.uint8)
        np.savez(root / f"train_data_batch_{i}.npz", data=data, labels=list(rng.integers(1, 1001, n)),
                 mean=data.mean(0))
    return root


def test_imagenet64_npz_release(tmp_path):
    root = write_imagenet64_npz(tmp_path / "Imagenet64_train_part1_npz")
    source = load_imagenet64(str(tmp_path), image_size=8)
    assert len(source) == 9 and source.nbytes() == 9 * (3 * 64 + 8)
    with np.load(root / "train_data_batch_2.npz") as second:
        expected_image = torch.from_numpy(second["data"][0].reshape(3, 8, 8))   # R, G, B planes
        expected_label = second["labels"][0] - 1                               # the release counts from 1
    assert torch.equal(source.images[5], expected_image) and source.labels[5] == expected_label
    assert source.labels.min() >= 0 and source.labels.max() < 1000
    with pytest.raises(DataError, match="holds 192-value rows, 12288 expected"):
        load_imagenet64(str(tmp_path), image_size=64)


def test_imagenet64_npz_release_warns_it_is_not_centre_cropped(tmp_path, caplog):
    """Issue 24, item 3, refused with a reason: the npz images are already 64 px, resized whole by their publishers,
    so no crop can be applied here; the user is told, and which source matches EDM's / ADM's statistics."""
    write_imagenet64_npz(tmp_path / "Imagenet64_train_part1_npz")
    with caplog.at_level("WARNING", logger="diffrun.data.loaders"):
        load_imagenet64(str(tmp_path), image_size=8)
    assert "resized each whole image (no crop)" in caplog.text and "dataset.root" in caplog.text


def test_imagenet64_image_folder(tmp_path):
    root = write_class_folders(tmp_path / "in64", classes=2, per_class=2, size=16, odd_size=True)
    source = load_imagenet64(str(root), image_size=16)
    assert source.labels.tolist() == [0, 0, 1, 1] and source.materialize().shape == (4, 3, 16, 16)


def write_celeba(root, count=5):
    from PIL import Image

    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
        lines.append(f"{name} {0 if i < 3 else 1 if i == 3 else 2}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celeba_scoresde_crop(tmp_path):
    from PIL import Image

    root = write_celeba(tmp_path / "celeba")
    source = load_celeba(str(root), image_size=64)
    assert len(source) == 3 and len(load_celeba(str(root), split="test")) == 1
    image = Image.open(root / "img_align_celeba" / "000001.jpg").convert("RGB")
    expected = np.asarray(image.crop((19, 39, 159, 179)).resize((64, 64), Image.BILINEAR))   # (178−140)/2, (218−140)/2
    assert torch.equal(source.item(0, False), torch.tensor(expected).permute(2, 0, 1))
    (root / "list_eval_partition.txt").write_text("000009.jpg 0\n")
    with pytest.raises(DataError, match="lists 000009.jpg"):
        load_celeba(str(root))


# --- order and placements --------------------------------------------------------------------------
def test_epoch_order_is_a_sharded_permutation_and_resumes():
    orders = [EpochOrder(10, seed=3, rank=r, world_size=3, flips=True) for r in range(3)]
    first = [o.keys(0, o.shard_size)[0] for o in orders]          # 4 each: 10 padded to 12
    assert sorted(np.concatenate(first).tolist()) == sorted(list(range(10)) + first[0][:1].tolist() + first[1][:1].tolist())
    single = EpochOrder(10, seed=3)
    epoch0, epoch1 = single.keys(0, 10)[0], single.keys(10, 10)[0]
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(10)) and not np.array_equal(epoch0, epoch1)
    a = EpochOrder(10, seed=3, flips=True)
    whole = a.take(17)
    b = EpochOrder(10, seed=3, flips=True)
    b.take(6)
    c = EpochOrder(10, seed=3, flips=True)
    c.load_state_dict(b.state_dict())
    rest = c.take(11)
    assert np.array_equal(whole[0], np.concatenate([a.keys(0, 6)[0], rest[0]]))
    assert np.array_equal(whole[1], np.concatenate([a.keys(0, 6)[1], rest[1]]))
    c.set_epoch(2)
    assert c.position == 20 and c.epoch == 2


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    return write_latents(tmp_path_factory.mktemp("lat"))["latents"]


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_device_and_stream_give_identical_batches_in_epoch_order(kind, latent_folder):
    """order=epoch: the same items, flips and labels from the device and from DataLoader workers, bit for bit."""
    def make_source():
        if kind == "pixels":
            return load_digits(16, random_flip=True)
        return load_latents(str(latent_folder), random_flip=True)

    classes = 10 if kind == "pixels" else 3
    device = InMemoryImages(make_source(), num_classes=classes, order=EpochOrder(len(make_source()), 7, flips=True))
    stream = StreamingData(make_source(), EpochOrder(len(make_source()), 7, flips=True), torch.device("cpu"),
                           num_classes=classes, workers=2)
    try:
        for _ in range(5):   # crosses an epoch boundary for the 18 latents
            (xd, ld), (xs, ls) = device.batch(8), stream.batch(8)
            assert torch.equal(xd, xs) and torch.equal(ld, ls)
    finally:
        stream.close()
    assert device.state_dict() == stream.state_dict() == {"order": "epoch", "position": 40, "size": len(device),
                                                          "world_size": 1}


def test_stream_resumes_at_its_position():
    order = EpochOrder(1797, 0, flips=True)
    stream = StreamingData(load_digits(16, random_flip=True), order, torch.device("cpu"), workers=1)
    straight = [stream.batch(16)[0] for _ in range(5)]
    stream.close()
    first = StreamingData(load_digits(16, random_flip=True), EpochOrder(1797, 0, flips=True), torch.device("cpu"), workers=1)
    [first.batch(16) for _ in range(3)]
    second = StreamingData(load_digits(16, random_flip=True), EpochOrder(1797, 0, flips=True), torch.device("cpu"), workers=0)
    second.load_state_dict(first.state_dict())
    first.close()
    assert all(torch.equal(a, second.batch(16)[0]) for a in straight[3:])


def test_placement_rule(monkeypatch):
    source = load_digits(16)                         # 1797 × 256 bytes ≈ 0.46 MB
    cfg = OmegaConf.create({"placement": "auto", "order": "auto", "workers": 0})
    monkeypatch.setattr(placement_module, "free_memory", lambda device: 2 * source.nbytes())
    assert isinstance(place(source, cfg, torch.device("cpu"), 0), InMemoryImages)       # exactly half: device
    monkeypatch.setattr(placement_module, "free_memory", lambda device: 2 * source.nbytes() - 1)
    data = place(source, cfg, torch.device("cpu"), 0)
    assert isinstance(data, StreamingData) and data.state_dict()["order"] == "epoch"
    with pytest.raises(DataError, match="dataset.placement=device: dataset digits takes 0.00 GiB and cpu has 0.00 GiB free"):
        monkeypatch.setattr(placement_module, "free_memory", lambda device: source.nbytes() - 1)
        place(source, OmegaConf.create({"placement": "device"}), torch.device("cpu"), 0)
    with pytest.raises(ConfigError, match="dataset.order=iid .* use dataset.order=epoch"):
        place(source, OmegaConf.create({"placement": "auto", "order": "iid"}), torch.device("cpu"), 0)


def test_too_large_for_the_device_stops_before_training(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(placement_module, "free_memory", lambda device: 1000)
    with pytest.raises(DataError, match="dataset.placement=device: dataset digits takes"):
        Trainer(make_cfg(["dataset.placement=device"]), tmp_path / "big")
    assert not (tmp_path / "big" / "metrics.jsonl").exists()


def test_resume_keeps_the_order_of_the_checkpoint(make_cfg, tmp_path, monkeypatch):
    """order=auto: a streamed run resumed where the data fits on the device continues its epoch order there;
    an explicit other order, or an iid run resumed where the data must be streamed, is refused."""
    from diffrun.cli import train
    from diffrun.errors import CheckpointError
    from diffrun.training.checkpoint import CheckpointManager

    common = ["dataset.workers=0", "checkpoint.every_steps=0", "sample.num_images=0"]
    monkeypatch.setattr(placement_module, "free_memory", lambda device: 1000)           # does not fit: streamed
    train(make_cfg([*common, "train.steps=3"]), tmp_path / "r")
    monkeypatch.undo()                                                                 # fits: auto is the device
    train(make_cfg([*common, "train.steps=5"]), tmp_path / "r")
    state, _ = CheckpointManager(tmp_path / "r" / "checkpoints").load_latest()
    assert state["data"]["order"] == "epoch" and state["data"]["position"] == 5 * 8
    with pytest.raises(CheckpointError, match="dataset.order=epoch, this run with dataset.order=iid"):
        train(make_cfg([*common, "train.steps=6", "dataset.order=iid", "resume=force"]), tmp_path / "r")
    train(make_cfg([*common, "train.steps=3"]), tmp_path / "iid")
    with pytest.raises(CheckpointError, match="drew its batches with dataset.order=iid.*dataset.placement=device"):
        train(make_cfg([*common, "train.steps=6", "dataset.placement=stream", "resume=force"]), tmp_path / "iid")


PLACEMENTS = {
    "device-iid": [],
    "device-epoch": ["dataset.order=epoch"],
    "stream": ["dataset.placement=stream", "dataset.workers=1"],
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_resume_continues_the_data_stream_exactly(make_cfg, tmp_path, name):
    """4 steps, stop, 2 more = 6 steps straight: the same weights, bit for bit, for each placement."""
    from diffrun.cli import train
    from diffrun.training.checkpoint import CheckpointManager

    common = ["deterministic=true", "train.steps=6", "checkpoint.every_steps=0", "sample.num_images=0",
              "dataset.loader.random_flip=true", "dataset.num_classes=10", *PLACEMENTS[name]]
    train(make_cfg(common), tmp_path / "straight")
    train(make_cfg([*common, "train.steps=4"]), tmp_path / "split")
    train(make_cfg(common), tmp_path / "split")
    a = CheckpointManager(tmp_path / "straight" / "checkpoints").load_latest()[0]
    b = CheckpointManager(tmp_path / "split" / "checkpoints").load_latest()[0]
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_latent_resume(make_cfg, tmp_path, latent_folder, placement):
    from diffrun.cli import train
    from diffrun.training.checkpoint import CheckpointManager

    images = latent_folder.parent / "images"
    common = ["deterministic=true", "train.steps=6", "checkpoint.every_steps=0", "sample.num_images=0",
              "dataset=imagenet256_latents", f"dataset.root={latent_folder}", "dataset.image_size=8",
              "dataset.num_classes=3", f"dataset.loader.reference_root={images}", f"dataset.placement={placement}",
              "dataset.order=epoch", "dataset.workers=1", "dataset.loader.random_flip=true", "model=minsnr_vit_b_2_latent32", "model.net.hidden_size=32", "model.net.depth=1",
              "model.net.num_heads=2", "train.batch_size=5"]
    train(make_cfg(common), tmp_path / "straight")
    train(make_cfg([*common, "train.steps=4"]), tmp_path / "split")
    train(make_cfg(common), tmp_path / "split")
    a = CheckpointManager(tmp_path / "straight" / "checkpoints").load_latest()[0]
    b = CheckpointManager(tmp_path / "split" / "checkpoints").load_latest()[0]
    assert a["data"] == b["data"] == {"order": "epoch", "position": 30, "size": 18, "world_size": 1}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# --- conditioning errors, before any work ----------------------------------------------------------
def test_conditional_pixel_run_passes_labels(make_cfg, tmp_path, monkeypatch):
    import diffrun.training.step as step_module
    from diffrun.cli import train

    seen = []
    original = step_module.drop_labels
    monkeypatch.setattr(step_module, "drop_labels", lambda l, p, n: seen.append(l.clone()) or original(l, p, n))
    train(make_cfg(["dataset.num_classes=10", "sample.cfg_scale=2", "train.label_dropout=0.1"]), tmp_path / "cond")
    assert len(seen) == 6 and all(l.dtype == torch.long and 0 <= l.min() and l.max() < 10 for l in seen)


@pytest.mark.parametrize("overrides, message", [
    (["dataset.num_classes=5"], "dataset digits has labels in \\[0, 9\\], outside \\[0, 5\\)"),
])
def test_labels_out_of_range_stop_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(DataError, match=message):
        Trainer(make_cfg(overrides), tmp_path / "x")


@pytest.mark.parametrize("overrides, message", [
    (["sample.cfg_scale=1.5"], "sample.cfg_scale=1.5: classifier-free guidance needs a class-conditional model"),
    (["eval.cfg_scale=2.0"], "eval.cfg_scale=2.0: classifier-free guidance needs a class-conditional model"),
    (["dataset.num_classes=10", "eval.cfg_scale=1.5", "train.label_dropout=0"],
     "eval.cfg_scale=1.5 contrasts with the null label, which train.label_dropout=0 never trains"),
    (["dataset=image_folder", "dataset.root={images}", "dataset.image_size=32", "dataset.num_classes=3"],
     "dataset.num_classes=3, but dataset=image_folder has no class labels.*dataset.loader.labels=subfolder"),
    (["dataset=celeba64", "dataset.root={tmp}", "dataset.num_classes=2"],
     "dataset.num_classes=2, but dataset=celeba64 has no class labels"),
    (["dataset.num_classes=10", "model.net.num_classes=7"],
     "dataset.num_classes=10, but model.net.num_classes=7; allowed model.net.num_classes=10"),
    (["model.net.num_classes=10"], "model.net.num_classes=10 is a class-conditional model, but dataset.num_classes=0"),
    (["dataset.num_classes=-1"], "dataset.num_classes=-1 is out of range"),
    (["train.label_dropout=1.5"], "train.label_dropout=1.5 is out of range"),
    (["dataset.placement=disk"], "dataset.placement='disk': allowed auto, device, stream"),
    (["dataset.order=shuffled"], "dataset.order='shuffled': allowed auto, iid, epoch"),
    (["dataset.placement=stream", "dataset.order=iid"], "dataset.order='iid' .* cannot be streamed"),
    (["dataset.workers=-2"], "dataset.workers=-2 is out of range"),
    (["dataset=image_folder", "dataset.root={images}", "dataset.loader.labels=folders"],
     "dataset.loader.labels='folders': allowed none, subfolder, dataset_json"),
    (["dataset=imagenet64", "dataset.root={tmp}/none"], "dataset.root='.*none' is not a directory"),
])
def test_refused_before_any_work(make_cfg, tmp_path, overrides, message):
    images = write_image_folder(tmp_path / "imgs", count=3, size=32)
    overrides = [o.format(images=images, tmp=tmp_path) for o in overrides]
    with pytest.raises((ConfigError, DataError), match=message):
        validate(make_cfg(overrides))


def test_new_dataset_options_compose(make_cfg, tmp_path):
    assert make_cfg(["dataset=cifar10_cond"]).dataset.num_classes == 10
    for option, classes in (("imagenet64", 1000), ("celeba64", 0), ("imagenet256_latents", 1000)):
        cfg = make_cfg([f"dataset={option}", f"dataset.root={tmp_path}"])
        assert cfg.dataset.num_classes == classes and cfg.model.net.num_classes == classes


@pytest.mark.slow
def test_ddp_ranks_stream_their_own_shards(tmp_path):
    """Two gloo ranks streaming: one model, and the checkpoint's stream position counts each rank's items."""
    import torch.multiprocessing as mp

    from diffrun.training.checkpoint import CheckpointManager
    from test_distributed import BATCH, STEPS, _rank_main

    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    overrides = ("dataset.placement=stream", "dataset.workers=1", "dataset.num_classes=10")
    mp.spawn(_rank_main, args=(2, local_ranks.free_port(), str(run_dir), str(out_dir), overrides), nprocs=2, join=True)
    r0, r1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    state, _ = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert state["data"] == {"order": "epoch", "position": STEPS * BATCH // 2, "size": 1797, "world_size": 2}
    shards = [EpochOrder(1797, 0, rank, 2).keys(0, STEPS * BATCH // 2)[0] for rank in (0, 1)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())     # the ranks saw different images
