"""Tests of experiments/datasets.py on bundled digits and tiny synthetic files."""

import io
import os
import pickle
import tarfile

import numpy as np
import paths
import pytest

from experiments import datasets

try:
    from PIL import Image
except ImportError:  # only the image-folder CIFAR tests need it
    Image = None

needs_pil = pytest.mark.skipif(
    Image is None, reason="Pillow is not installed (pip install pillow)"
)


# ---------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------


def test_digits_shapes_dtype_range():
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    assert x_train.shape == (1347, 8, 8, 1)
    assert x_test.shape == (450, 8, 8, 1)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.shape == (1347,) and y_test.shape == (450,)
    assert np.issubdtype(y_train.dtype, np.integer)
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert set(np.unique(y_train)) == set(range(10))


def test_digits_deterministic_and_seeded():
    a = datasets.load_digits(seed=0)
    b = datasets.load_digits(seed=0)
    c = datasets.load_digits(seed=1)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[1][1], b[1][1])
    assert not np.array_equal(a[0][1], c[0][1])


def test_digits_split_is_stratified_and_disjoint():
    (x_train, y_train), (x_test, y_test) = datasets.load_digits(
        test_fraction=0.2
    )
    assert len(x_test) == pytest.approx(0.2 * 1797, abs=1)
    train_frac = np.bincount(y_train) / len(y_train)
    test_frac = np.bincount(y_test) / len(y_test)
    # Stratified: class proportions agree to within one sample per class.
    assert np.abs(train_frac - test_frac).max() < 1.5 / (len(y_test) / 10)
    # The two splits partition the data set: same multiset of samples.
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    original = sorted(
        (img.astype(np.float32) / 16).tobytes() + bytes([label])
        for img, label in zip(digits.images, digits.target)
    )
    split = sorted(
        x[..., 0].tobytes() + bytes([int(label)])
        for x, label in zip(
            np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
        )
    )
    assert split == original


def test_digits_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.load_digits(test_fraction=1.5)


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def _write_mnist(path, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.uint8),
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.uint8),
    )
    arrays["x_train"][0, 0, 0] = 255  # so the max is known
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("as_dir", [False, True])
def test_mnist_from_npz(tmp_path, as_dir):
    raw = _write_mnist(tmp_path / "mnist.npz")
    arg = tmp_path if as_dir else tmp_path / "mnist.npz"
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(arg)
    assert x_train.shape == (12, 28, 28, 1) and x_test.shape == (5, 28, 28, 1)
    assert x_train.dtype == np.float32
    assert x_train.max() == 1.0 and x_train.min() >= 0.0
    np.testing.assert_allclose(x_test[..., 0] * 255.0, raw["x_test"], atol=1e-4)
    np.testing.assert_array_equal(y_train, raw["y_train"])
    assert np.issubdtype(y_test.dtype, np.integer)


def test_mnist_limit(tmp_path):
    _write_mnist(tmp_path / "mnist.npz")
    (x_train, y_train), (x_test, _) = datasets.load_mnist(tmp_path, limit=4)
    assert x_train.shape[0] == 4 and y_train.shape == (4,)
    assert x_test.shape[0] == 4
    again = datasets.load_mnist(tmp_path, limit=4)
    np.testing.assert_array_equal(x_train, again[0][0])


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        datasets.load_mnist(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="mnist.npz"):
        datasets.load_mnist(tmp_path)  # directory without mnist.npz
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="y_train"):
        datasets.load_mnist(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="data_dir"):
        datasets.load_mnist(tmp_path / "junk.npz")


SHARED_MNIST = os.path.join(paths.SHARED, "data", "mnist.npz"
)


@pytest.mark.skipif(
    not os.path.isfile(SHARED_MNIST), reason="../shared/data/mnist.npz absent"
)
def test_mnist_shared_copy():
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(SHARED_MNIST)
    assert x_train.shape == (60000, 28, 28, 1)
    assert x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(y_test).tolist()[:2] == [980, 1135]


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

# A few images per class, in classes whose alphabetical and CIFAR orders are
# irrelevant to the check: labels must come from CIFAR10_CLASSES.
_CLASSES = ("truck", "airplane", "frog")
_PER_CLASS = {"train": 3, "test": 2}


def _pixel(split, cls, i):
    """A distinctive flat colour per image, so order can be checked."""
    c = datasets.CIFAR10_CLASSES.index(cls)
    return (20 * c + 5, 40 * i + 3, 200 if split == "train" else 100)


def _make_image_tree(root, fmt="png"):
    for split, n in _PER_CLASS.items():
        for cls in _CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            # Written in reverse so file-system order != sorted order.
            for i in reversed(range(n)):
                img = Image.new("RGB", (32, 32), _pixel(split, cls, i))
                img.save(d / f"{i:04d}.{fmt}")


def _expected(split):
    items = sorted(
        (datasets.CIFAR10_CLASSES.index(cls), i, cls)
        for cls in _CLASSES
        for i in range(_PER_CLASS[split])
    )
    labels = np.array([label for label, _, _ in items])
    pixels = np.array([_pixel(split, cls, i) for _, i, cls in items]) / 255.0
    return labels, pixels


def _check_tree_result(result, lossy=False):
    (x_train, y_train), (x_test, y_test) = result
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        labels, pixels = _expected(split)
        assert x.shape == (len(labels), 32, 32, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(y, labels)  # sorted by label then file
        atol = 8 / 255 if lossy else 1e-6
        np.testing.assert_allclose(x[:, 16, 16, :], pixels, atol=atol)


def test_cifar10_class_order_is_explicit():
    assert datasets.CIFAR10_CLASSES[0] == "airplane"
    assert datasets.CIFAR10_CLASSES[9] == "truck"
    assert len(datasets.CIFAR10_CLASSES) == 10


@needs_pil
def test_cifar10_image_dir(tmp_path):
    _make_image_tree(tmp_path)
    _check_tree_result(datasets.load_cifar10(tmp_path))


@needs_pil
def test_cifar10_image_dir_jpeg_limit(tmp_path):
    _make_image_tree(tmp_path, fmt="jpg")
    _check_tree_result(datasets.load_cifar10(tmp_path), lossy=True)
    (x_train, y_train), (x_test, _) = datasets.load_cifar10(tmp_path, limit=4)
    assert x_train.shape == (4, 32, 32, 3) and x_test.shape == (4, 32, 32, 3)
    # Limited samples are a deterministic subset of the full split.
    (x_full, y_full), _ = datasets.load_cifar10(tmp_path)
    again = datasets.load_cifar10(tmp_path, limit=4)
    np.testing.assert_array_equal(again[0][0], x_train)
    for img, label in zip(x_train, y_train):
        matches = np.all(x_full == img, axis=(1, 2, 3))
        assert matches.any() and y_full[matches][0] == label


@needs_pil
@pytest.mark.parametrize("prefix", ["", "cifar10/"])
def test_cifar10_tgz_with_cache(tmp_path, monkeypatch, prefix):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LUTQ_TF_CACHE_DIR", str(cache))
    tree = tmp_path / "tree"
    _make_image_tree(tree)
    archive = tmp_path / "cifar.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "train", arcname=prefix + "train")
        tar.add(tree / "test", arcname=prefix + "test")

    first = datasets.load_cifar10(archive)
    _check_tree_result(first)
    cached = list(cache.glob("*.npz"))
    assert len(cached) == 1
    # A second call reads the cache: tamper with it and see the change.
    with np.load(cached[0]) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y_test"] = np.full_like(arrays["y_test"], 7)
    np.savez(cached[0], **arrays)
    (_, _), (_, y_test) = datasets.load_cifar10(archive)
    assert (y_test == 7).all()
    # And cache=False reads the archive again.
    _check_tree_result(datasets.load_cifar10(archive, cache=False))
    # limit gives the same subset with and without the cache.
    a = datasets.load_cifar10(archive, limit=3, cache=False)
    b = datasets.load_cifar10(archive, limit=3)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[0][1], b[0][1])


def _write_pickle_batches(root, n=4):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        # The python version stores rows as planar R, G, B (CHW) bytes.
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches[name] = (images, labels)
    return batches


@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_pickle_batches(tmp_path, parent):
    batch_dir = tmp_path / "cifar-10-batches-py"
    batches = _write_pickle_batches(batch_dir)
    result = datasets.load_cifar10(tmp_path if parent else batch_dir)
    (x_train, y_train), (x_test, y_test) = result
    assert x_train.shape == (20, 32, 32, 3) and x_test.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(
        x_train[4:8] * 255.0, batches["data_batch_2"][0], atol=1e-4
    )
    np.testing.assert_array_equal(y_test, batches["test_batch"][1])


def test_cifar10_pickle_tar(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTQ_TF_CACHE_DIR", str(tmp_path / "cache"))
    batches = _write_pickle_batches(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (x_train, _), (_, y_test) = datasets.load_cifar10(archive)
    np.testing.assert_allclose(
        x_train[:4] * 255.0, batches["data_batch_1"][0], atol=1e-4
    )
    np.testing.assert_array_equal(y_test, batches["test_batch"][1])


@needs_pil
def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        datasets.load_cifar10(tmp_path / "missing")
    with pytest.raises(ValueError, match="layout"):
        datasets.load_cifar10(tmp_path)  # empty directory
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a tar"):
        datasets.load_cifar10(tmp_path / "x.txt")

    tree = tmp_path / "tree"
    _make_image_tree(tree)
    (tree / "train" / "kitten").mkdir()
    Image.new("RGB", (32, 32)).save(tree / "train" / "kitten" / "a.png")
    with pytest.raises(ValueError, match="kitten"):
        datasets.load_cifar10(tree)

    big = tmp_path / "big"
    for split in ("train", "test"):
        (big / split / "cat").mkdir(parents=True)
        Image.new("RGB", (40, 32)).save(big / split / "cat" / "a.png")
    with pytest.raises(ValueError, match="32x32"):
        datasets.load_cifar10(big)

    with pytest.raises(ValueError, match="limit"):
        datasets.load_cifar10(big, limit=0)
    with pytest.raises(TypeError, match="limit"):
        datasets.load_mnist(tmp_path, limit=2.5)


@needs_pil
def test_cifar10_archive_without_images(tmp_path):
    archive = tmp_path / "empty.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        data = b"nothing here"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="train/<class>"):
        datasets.load_cifar10(archive, cache=False)
