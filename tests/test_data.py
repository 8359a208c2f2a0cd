"""Datasets in their real on-disk formats, and the errors for missing or broken ones."""
import numpy as np
import pytest
import torch

from diffrun.data import load_cifar, load_digits, load_image_folder
from diffrun.errors import DataError

from conftest import write_cifar, write_image_folder


def test_digits_embedded():
    data = load_digits(image_size=16)
    assert len(data) == 1797 and data.images.shape[1:] == (1, 16, 16) and data.images.dtype == torch.uint8
    assert data.images.max() > 200  # scaled 0..16 → 0..255
    x = data.batch(32)
    assert x.shape == (32, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    write_cifar(tmp_path, name, per_file=7)
    data = load_cifar(name, str(tmp_path), download=False)
    expected = 35 if name == "cifar10" else 7
    assert data.images.shape == (expected, 3, 32, 32)
    test = load_cifar(name, str(tmp_path), split="test", download=False)
    assert len(test) == 7


def test_cifar_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", str(tmp_path), download=True)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "data_batch_1" in msg and str(tmp_path) in msg


def test_cifar_truncated_file(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=5)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3.*truncated"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_image_folder(tmp_path):
    write_image_folder(tmp_path, count=9, size=16)
    data = load_image_folder(str(tmp_path), image_size=16)
    assert data.images.shape == (9, 3, 16, 16)


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
        load_image_folder(str(tmp_path / "mixed"), 16)
    assert len(load_image_folder(str(tmp_path / "mixed"), 16, resize=True)) == 4
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(str(tmp_path / "bad"), 16)


def test_flip_happens_on_device_and_is_random():
    imgs = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    imgs[..., 0] = 255  # bright left column
    from diffrun.data import InMemoryImages
    torch.manual_seed(0)
    x = InMemoryImages(imgs, "t", random_flip=True).batch(64)
    left_bright = (x[..., 0] > 0).all(dim=(1, 2))
    assert 10 < int(left_bright.sum()) < 54
