"""Tests for prunegym.compression.data: every format written small under tmp_path, every error path."""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from prunegym.compression.data import DATASETS, Split, Splits, dataset_key, load_dataset

IMAGES, LABELS = 0x00000803, 0x00000801


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _mnist(folder: Path, gz: bool = False, n_train: int = 40, n_test: int = 10) -> Path:
    """Image i (train, then test) is filled with the value i, so splits can be told apart after scaling."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(n_train + n_test)
    images = np.broadcast_to(ids[:, None, None], (len(ids), 28, 28))
    for prefix, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images[sl], IMAGES, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", ids[sl] % 10, LABELS, gz)
    return folder


def _cifar(folder: Path, per_batch: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rng = np.random.default_rng(1)
    for b, name in enumerate(names):
        ids = np.arange(b * per_batch, (b + 1) * per_batch)
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, 0] = ids  # red channel's first pixel tags the image
        batch = {b"batch_label": b"x", b"data": data, b"labels": [int(i % 10) for i in ids]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _npz(path: Path, n: int = 50, shape: tuple[int, ...] = (6, 6), **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, (n, *shape)).astype(np.float32)
    x.reshape(n, -1)[:, 0] = np.arange(n) * 10.0  # a tag pixel, unique per image
    np.savez(path, **{"x": x, "y": np.arange(n) % 7, **arrays})
    return path


def _tags(split: Split) -> np.ndarray:
    return split.x.reshape(len(split), -1)[:, 0].numpy()


def _check_splits(s: Splits, channels: int, size: int, total: int) -> None:
    for split in (s.train, s.reward, s.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape == (len(split), channels, size, size) and split.y.shape == (len(split),)
    assert s.in_channels == channels and s.image_size == size
    assert len(s.train) + len(s.reward) + len(s.test) == total
    # Standardisation is an increasing affine map shared by all splits, so distinct tags stay distinct:
    # no overlap and full coverage means exactly `total` distinct tags.
    tags = np.concatenate([_tags(s.train), _tags(s.reward), _tags(s.test)])
    assert len(np.unique(tags)) == total
    x = s.train.x.transpose(0, 1).reshape(channels, -1)
    assert torch.allclose(x.mean(1), torch.zeros(channels), atol=1e-4)
    assert torch.allclose(x.std(1, correction=0), torch.ones(channels), atol=1e-4)


def _ids(s: Splits) -> list[np.ndarray]:
    """Recover each image's id from its tag: ranks over all splits give the ids back."""
    tags = [_tags(split) for split in (s.train, s.reward, s.test)]
    ranks = np.argsort(np.argsort(np.concatenate(tags)))
    return np.split(ranks, np.cumsum([len(t) for t in tags])[:-1])


def test_digits() -> None:
    s = load_dataset("digits")
    assert (len(s.test), len(s.reward), len(s.train)) == (359, 215, 1223)
    assert (s.in_channels, s.num_classes, s.image_size, s.name) == (1, 10, 8, "digits")
    assert s.train.x.shape == (1223, 1, 8, 8) and s.train.x.dtype == torch.float32
    assert torch.allclose(s.train.x.mean(), torch.tensor(0.0), atol=1e-5)
    assert len(load_dataset("digits", reward_size=10).reward) == 10


def test_digits_deterministic_per_seed() -> None:
    a, b, c = load_dataset("digits", 0), load_dataset("digits", 0), load_dataset("digits", 1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.reward.y, b.reward.y)
    assert torch.equal(a.test.x, b.test.x)
    assert a.test.x.shape == c.test.x.shape and not torch.equal(a.test.x, c.test.x)


def test_digits_distorted() -> None:
    """The built-in harder digits: the same 1,797 digits, 360 held out and distorted ten times each
    as the test set (the same for every seed), the rest distorted once and split by the seed."""
    a, b, c = (load_dataset("digits_distorted", seed) for seed in (0, 0, 1))
    assert (len(a.test), len(a.reward), len(a.train)) == (3600, 215, 1222)
    assert (a.in_channels, a.num_classes, a.image_size, a.name) == (1, 10, 8, "digits_distorted")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, c.test.y)
    assert not torch.equal(a.train.y, c.train.y)  # the seed splits train and reward
    assert torch.bincount(a.test.y).tolist() == [10 * n for n in torch.bincount(a.test.y[::10]).tolist()]
    plain = load_dataset("digits", 0)
    assert not any(torch.equal(plain.test.x[0], x) for x in a.test.x)  # distorted: no image as it ships
    assert dataset_key("digits_distorted") == "digits_distorted"


@pytest.mark.parametrize("gz", [False, True])
def test_mnist(tmp_path: Path, gz: bool) -> None:
    s = load_dataset(f"mnist:{_mnist(tmp_path / 'm', gz)}")
    _check_splits(s, channels=1, size=28, total=50)
    assert (len(s.train), len(s.reward), len(s.test)) == (34, 6, 10)
    assert s.num_classes == 10
    train_ids, reward_ids, test_ids = _ids(s)
    assert sorted(test_ids) == list(range(40, 50))  # the source's own test set, never resampled
    for ids, split in zip(_ids(s), (s.train, s.reward, s.test), strict=True):
        assert np.array_equal(ids % 10, split.y.numpy())


def test_mnist_seeds(tmp_path: Path) -> None:
    spec = f"mnist:{_mnist(tmp_path / 'm')}"
    a, b, c = load_dataset(spec, 3), load_dataset(spec, 3), load_dataset(spec, 4)
    assert [i.tolist() for i in _ids(a)] == [i.tolist() for i in _ids(b)]
    assert sorted(_ids(a)[1]) != sorted(_ids(c)[1])
    assert len(load_dataset(spec, reward_size=39).train) == 1


@pytest.mark.parametrize("parent", [False, True])
def test_cifar10(tmp_path: Path, parent: bool) -> None:
    _cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path if parent else tmp_path / "cifar-10-batches-py"
    s = load_dataset(f"cifar10:{root}", seed=5)
    _check_splits(s, channels=3, size=32, total=120)
    assert (len(s.train), len(s.reward), len(s.test)) == (85, 15, 20)
    assert sorted(_ids(s)[2]) == list(range(100, 120))
    assert s.num_classes == 10


def test_npz_without_test(tmp_path: Path) -> None:
    spec = f"npz:{_npz(tmp_path / 'd.npz')}"
    s = load_dataset(spec)
    _check_splits(s, channels=1, size=6, total=50)
    assert (len(s.train), len(s.reward), len(s.test)) == (34, 6, 10)
    assert s.num_classes == 7 and s.name == spec
    for ids, split in zip(_ids(s), (s.train, s.reward, s.test), strict=True):
        assert np.array_equal(ids % 7, split.y.numpy())
    other = load_dataset(spec, seed=1)
    assert sorted(_ids(s)[2]) != sorted(_ids(other)[2])


def test_npz_with_test(tmp_path: Path) -> None:
    x_test = np.full((8, 3, 5, 5), -1.0)
    x_test.reshape(8, -1)[:, 0] = np.arange(8) + 1000.0
    path = _npz(tmp_path / "d.npz", 30, (3, 5, 5), x_test=x_test, y_test=np.arange(8) % 7)
    s = load_dataset(f"npz:{path}")
    _check_splits(s, channels=3, size=5, total=38)
    assert (len(s.train), len(s.reward), len(s.test)) == (26, 4, 8)
    assert s.num_classes == 7
    assert sorted(_ids(s)[2]) == list(range(30, 38))


@pytest.mark.parametrize(("labels", "test_labels", "message"), [
    (lambda y: np.where(y == 3, 1000, y), None, "labels go up to 1000 but 994 of them never occur"),
    (lambda y: y, np.arange(8) + 11, r"x_test has labels that x never has \(\[11, 12"),
    (lambda y: np.zeros_like(y), None, "1 class"),
])
def test_npz_labels_that_no_model_can_learn_are_refused(tmp_path: Path, labels, test_labels, message) -> None:
    x = np.random.default_rng(0).random((30, 1, 5, 5))
    y = labels(np.arange(30) % 7)
    extra = {} if test_labels is None else {"x_test": x[:8], "y_test": test_labels}
    np.savez(tmp_path / "d.npz", x=x, y=y, **extra)
    with pytest.raises(ValueError, match=message):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_npz_complex_images_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((30, 1, 5, 5), dtype=np.complex64), y=np.arange(30) % 3)
    with pytest.raises(ValueError, match="complex64, expected real numbers"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_dataset_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dataset_key("digits") == "digits"
    monkeypatch.chdir(tmp_path)
    key = dataset_key(f"mnist:{tmp_path / 'm'}")
    assert re.fullmatch(r"mnist_[0-9a-f]{12}", key)
    assert dataset_key("mnist:m") == dataset_key("mnist:./m/") == key
    assert dataset_key(f"npz:{tmp_path / 'm'}") != key and dataset_key(f"mnist:{tmp_path / 'n'}") != key


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["imagenet:/data", "Digits", "", "mnist_x:/a"])
def test_unknown_kind(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec)) + ".*digits, digits_distorted, mnist, cifar10, npz"):
        load_dataset(spec)
    assert DATASETS == ("digits", "digits_distorted", "mnist", "cifar10", "npz")


@pytest.mark.parametrize("spec", ["mnist", "mnist:", "cifar10: ", "npz"])
def test_spec_without_path(spec: str) -> None:
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset(spec)
    with pytest.raises(ValueError, match="needs a path"):
        dataset_key(spec)


@pytest.mark.parametrize("spec", ["digits:/tmp/x", "digits_distorted:/tmp/x"])
def test_digits_with_path(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec)) + ".*no path"):
        load_dataset(spec)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1"), ("npz", "arrays x")],
)
def test_missing_path(tmp_path: Path, kind: str, expected: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*" + re.escape(expected)):
        load_dataset(f"{kind}:{missing}")


def test_missing_file_in_folder(tmp_path: Path) -> None:
    folder = _mnist(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:{folder}")
    cifar = _cifar(tmp_path / "c")
    (cifar / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset(f"cifar10:{cifar}")


def test_bad_idx_magic(tmp_path: Path) -> None:
    folder = _mnist(tmp_path / "m")
    bad = _write_idx(folder / "train-images-idx3-ubyte", np.zeros((40, 28, 28)), LABELS)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*magic"):
        load_dataset(f"mnist:{folder}")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path: Path, gz: bool) -> None:
    folder = _mnist(tmp_path / "m", gz)
    path = folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*(truncated|gzip)"):
        load_dataset(f"mnist:{folder}")


def test_mnist_length_mismatch(tmp_path: Path) -> None:
    folder = _mnist(tmp_path / "m")
    _write_idx(folder / "train-labels-idx1-ubyte", np.zeros(39), LABELS)
    with pytest.raises(ValueError, match="40 images but .*39 labels"):
        load_dataset(f"mnist:{folder}")


@pytest.mark.parametrize(
    "content", [b"not a pickle at all", pickle.dumps([1, 2]), pickle.dumps({b"data": 1}), pickle.dumps(print)]
)
def test_unreadable_pickle(tmp_path: Path, content: bytes) -> None:
    folder = _cifar(tmp_path / "c")
    (folder / "data_batch_3").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(folder / "data_batch_3"))):
        load_dataset(f"cifar10:{folder}")


def test_npz_missing_x(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 2, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no array x"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("half", [False, True])
def test_npz_unreadable(tmp_path: Path, half: bool) -> None:
    path = _npz(tmp_path / "d.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if half else b"garbage" * 10)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a .npz"):
        load_dataset(f"npz:{path}")


def test_npz_x_test_without_y_test(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x_test=np.zeros((4, 6, 6)))
    with pytest.raises(ValueError, match="x_test and y_test"):
        load_dataset(f"npz:{path}")


def test_npz_length_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 4, 4)), y=np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        load_dataset(f"npz:{path}")


def test_non_square(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", shape=(8, 6))
    with pytest.raises(ValueError, match=re.escape("(50, 1, 8, 6)")):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize(
    ("y", "match"), [(np.arange(50) - 1, "non-negative, found -1"), (np.zeros(50), "integers.*float64")]
)
def test_bad_labels(tmp_path: Path, y: np.ndarray, match: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((50, 4, 4)), y=y)
    with pytest.raises(ValueError, match=match):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((50, 16)), re.escape("(50, 16)")),
        (np.full((50, 4, 4), np.nan), "NaN"),
        (np.full((50, 4, 4), "a"), "dtype <U1"),
    ],
)
def test_bad_x(tmp_path: Path, x: np.ndarray, match: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.zeros(50, dtype=int))
    with pytest.raises(ValueError, match=match):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("reward_size", [0, -3, 40, 41, 1.5, True])
def test_bad_reward_size(tmp_path: Path, reward_size: object) -> None:
    spec = f"npz:{_npz(tmp_path / 'd.npz')}"  # 50 samples: 10 test, 40 for reward and train
    with pytest.raises(ValueError, match=rf"reward_size.*{re.escape(str(reward_size))}"):
        load_dataset(spec, reward_size=reward_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 2])
def test_too_few_samples(tmp_path: Path, n: int) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((n, 4, 4)), y=np.zeros(n, dtype=int))
    with pytest.raises(ValueError, match=f"only {n} samples"):
        load_dataset(f"npz:{path}")


def test_empty_test_set(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x_test=np.zeros((0, 6, 6)), y_test=np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="x_test is empty"):
        load_dataset(f"npz:{path}")
