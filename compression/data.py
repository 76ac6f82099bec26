"""Datasets as train/reward/test splits of standardised image tensors.

A spec names the source: ``digits`` (scikit-learn's bundled 8x8 digits), ``digits_distorted`` (the same
digits rotated, shifted and noised, a task they do not saturate; made from them, below), ``mnist:PATH``
(a folder of IDX files, plain or gzipped), ``cifar10:PATH`` (the python-pickle batches) or ``npz:PATH``
(arrays ``x`` and ``y``, optionally ``x_test`` and ``y_test``). Nothing is ever downloaded.

The reward split is separate from the test split so that the RL agent is never optimised on the
images whose accuracy is reported to users.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .unpickling import restricted_loads

__all__ = ["DATASETS", "Split", "Splits", "dataset_key", "load_dataset"]

DATASETS = ("digits", "digits_distorted", "mnist", "cifar10", "npz")
_BUNDLED = ("digits", "digits_distorted")  # made from scikit-learn's digits: no path

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_EXPECTED = "expected a folder with " + ", ".join(f"{name}[.gz]" for name in _MNIST_FILES)
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_EXPECTED = (
    f"expected a folder with data_batch_1..5 and test_batch, or its parent holding {_CIFAR_DIR}/"
)
_NPZ_EXPECTED = (
    "expected a .npz file with arrays x (N, H, W) or (N, C, H, W), y (N,), optionally x_test, y_test"
)
_TEST_FRACTION, _REWARD_FRACTION, _REWARD_CAP = 0.2, 0.15, 1000

# What a loader returns: x (N, C, H, W) of any numeric dtype, y (N,), then the source's own test set or None.
_Raw = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare fields with
class Split:
    """Standardised images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class Splits:
    """The three disjoint splits of one dataset, and what a model needs to know about its inputs."""

    train: Split  # base-model training, fine-tuning, BN recalibration, per-input env samples
    reward: Split  # the RL environment's reward only
    test: Split  # the numbers reported to users, nothing else
    in_channels: int
    num_classes: int
    image_size: int
    name: str

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the train and reward splits' images and labels: what a model trained on them saw."""
        digest = hashlib.sha1()
        for split in (self.train, self.reward):
            for tensor in (split.x, split.y):
                digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def _parse(spec: str) -> tuple[str, Path | None]:
    kind, sep, rest = spec.strip().partition(":")
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset spec {spec!r}: the kind must be one of {', '.join(DATASETS)}")
    if kind in _BUNDLED:
        if sep:
            raise ValueError(f"dataset spec {spec!r}: {kind!r} is made from scikit-learn's bundled digits, no path")
        return kind, None
    if not rest.strip():
        raise ValueError(f"dataset spec {spec!r} needs a path: write '{kind}:PATH'")
    return kind, Path(rest.strip()).expanduser().resolve()


def dataset_key(spec: str) -> str:
    """A stable, filesystem-safe cache key: ``digits``, or the kind and a short hash of the absolute path."""
    kind, path = _parse(spec)
    if path is None:
        return kind
    return f"{kind}_{hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:12]}"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: not readable gzip data ({e})") from e
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()}, expected 0x{magic:08x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected, found = math.prod(dims), len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes"
        raise ValueError(
            f"{path}: {what}: IDX header declares shape {dims} ({expected} bytes), found {found}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder / name}[.gz] not found: {_MNIST_EXPECTED}")


def _load_mnist(folder: Path) -> _Raw:
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {folder} not found: {_MNIST_EXPECTED}")
    parts = []
    for images_name, labels_name in (_MNIST_FILES[:2], _MNIST_FILES[2:]):
        images_path, labels_path = _idx_file(folder, images_name), _idx_file(folder, labels_name)
        x, y = _read_idx(images_path, _IDX_IMAGES), _read_idx(labels_path, _IDX_LABELS)
        if len(x) != len(y):
            raise ValueError(f"{images_path} holds {len(x)} images but {labels_path} holds {len(y)} labels")
        parts += [x[:, None], y]
    return parts[0], parts[1], parts[2], parts[3]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = restricted_loads(path.read_bytes(), what="a CIFAR-10 batch", encoding="bytes")
    except Exception as e:  # a corrupt pickle can fail in almost any way
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a pickled dict with keys b'data' and b'labels'")
    x, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' has shape {x.shape}, expected (N, 3072)")
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.reshape(-1, 3, 32, 32), y


def _load_cifar10(path: Path) -> _Raw:
    folder = path / _CIFAR_DIR if (path / _CIFAR_DIR).is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {path} not found: {_CIFAR_EXPECTED}")
    for name in _CIFAR_BATCHES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: {_CIFAR_EXPECTED}")
    batches = [_read_cifar_batch(folder / name) for name in _CIFAR_BATCHES]
    x_test, y_test = batches.pop()
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), x_test, y_test


def _npz_images(x: np.ndarray, path: Path, name: str) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{path}: {name} has dtype {x.dtype}, expected real numbers")
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
        raise ValueError(f"{path}: {name} holds NaN or infinite values")  # they would poison the statistics
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{path}: {name} has shape {x.shape}, expected (N, H, W) or (N, C, H, W)")
    return x


def _load_npz(path: Path) -> _Raw:
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} not found: {_NPZ_EXPECTED}")
    # np.load guesses the format from the content; checking for a zip first gives a clearer error.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a .npz (zip) archive; {_NPZ_EXPECTED}")
    try:
        archive = np.load(path, allow_pickle=False)  # no pickle: object arrays could run code
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
    with archive:
        names = set(archive.files)
        missing = [k for k in ("x", "y") if k not in names]
        if missing:
            raise ValueError(
                f"{path}: no array {' or '.join(missing)} (has {sorted(names)}); {_NPZ_EXPECTED}"
            )
        if ("x_test" in names) != ("y_test" in names):
            raise ValueError(f"{path}: x_test and y_test must come together (found {sorted(names)})")
        try:
            arrays = {k: archive[k] for k in ("x", "y", "x_test", "y_test") if k in names}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: an array could not be read ({e})") from e
    x = _npz_images(arrays["x"], path, "x")
    x_test = _npz_images(arrays["x_test"], path, "x_test") if "x_test" in arrays else None
    return x, arrays["y"], x_test, arrays.get("y_test")


def _load_digits(_: Path | None) -> _Raw:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    return digits.images[:, None], digits.target, None, None


def _load_digits_distorted(_: Path | None) -> _Raw:
    """scikit-learn's digits, each rotated by up to ±20°, shifted by up to a pixel and noised (σ 2 on
    their 0-16 scale): 1,437 train images, each distorted once, and 3,600 test images, ten distortions
    of each of 360 other digits, the same for every seed. On this task a dense digits CNN scores about
    91% and pruned allocations differ by points (docs/results.md gives the figures)."""
    from scipy import ndimage  # imported here, as scikit-learn (which depends on SciPy) is
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float64), digits.target
    perm = np.random.default_rng(12345).permutation(len(images))
    test_src, train_src = perm[:360], perm[360:]
    rng = np.random.default_rng(0)
    centre = np.array([3.5, 3.5])

    def distort(img: np.ndarray) -> np.ndarray:
        a = np.deg2rad(rng.uniform(-20, 20))
        rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        offset = centre - rotation @ centre + rng.uniform(-1, 1, 2)
        y = ndimage.affine_transform(img, rotation, offset=offset, order=1, mode="constant", cval=0.0)
        return np.clip(y + rng.normal(0, 2.0, y.shape), 0, 16)

    x = np.stack([distort(images[i]) for i in train_src]).astype(np.float32)
    test_src = np.repeat(test_src, 10)
    x_test = np.stack([distort(images[i]) for i in test_src]).astype(np.float32)
    return x[:, None], labels[train_src], x_test[:, None], labels[test_src]


_LOADERS = {"digits": _load_digits, "digits_distorted": _load_digits_distorted, "mnist": _load_mnist,
            "cifar10": _load_cifar10, "npz": _load_npz}


def _check(x: np.ndarray, y: np.ndarray, source: str, what: str) -> np.ndarray:
    """Validate one (x, y) pair and return the labels as int64."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: {what} labels must be 1-D integers, got shape {y.shape} dtype {y.dtype}")
    if len(x) != len(y):
        raise ValueError(f"{source}: {what} has {len(x)} images but {len(y)} labels")
    if y.size and y.min() < 0:
        raise ValueError(f"{source}: {what} labels must be non-negative, found {y.min()}")
    if x.shape[2] != x.shape[3]:
        raise ValueError(
            f"{source}: {what} has shape {tuple(x.shape)} (N, C, H, W) with H != W; only square images "
            "are supported (channels-last arrays need transposing to (N, C, H, W))"
        )
    return y.astype(np.int64)


def _check_classes(y: np.ndarray, y_test: np.ndarray | None, source: str) -> None:
    """Labels are the classes 0..K-1, each present in x; a test set has no class that x lacks (a model
    would score 0% on it without being able to learn it)."""
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"{source}: x has {len(present)} class(es) ({present.tolist()}); "
                         "a classifier needs two or more")
    missing = np.setdiff1d(np.arange(present[-1] + 1), present)
    if len(missing):
        shown = ", ".join(map(str, missing[:10].tolist())) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{source}: labels must be the classes 0..K-1, each with examples in x; labels go up to "
                         f"{present[-1]} but {len(missing)} of them never occur ({shown})")
    if y_test is not None:
        unseen = np.setdiff1d(np.unique(y_test), present)
        if len(unseen):
            raise ValueError(f"{source}: x_test has labels that x never has ({unseen[:10].tolist()}); "
                             "no model can learn them")


def _split_indices(
    n: int, own_test: bool, seed: int, reward_size: int | None, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = 0 if own_test else max(1, round(_TEST_FRACTION * n))
    n_rest = n - n_test
    if n_rest < 2:
        raise ValueError(f"{source}: only {n} samples, too few for train, reward and test splits")
    if reward_size is None:
        reward_size = min(_REWARD_CAP, max(1, int(_REWARD_FRACTION * n_rest)))
    elif isinstance(reward_size, bool) or not isinstance(reward_size, int | np.integer):
        raise ValueError(f"reward_size must be an integer, got {reward_size!r}")
    if not 1 <= reward_size < n_rest:
        raise ValueError(
            f"reward_size={reward_size} is out of range: {source} has {n_rest} samples besides test, "
            f"so it must be between 1 and {n_rest - 1} to leave at least one training sample"
        )
    test, reward, train = np.split(perm, [n_test, n_test + reward_size])
    return np.sort(test), np.sort(reward), np.sort(train)


def _channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std, two-pass in float64 and chunked so CIFAR-sized data is never copied whole."""
    count = x.shape[0] * x.shape[2] * x.shape[3]
    total = sum(x[i : i + chunk].sum(axis=(0, 2, 3), dtype=np.float64) for i in range(0, len(x), chunk))
    mean = total / count
    squares = sum(
        ((x[i : i + chunk] - mean[:, None, None]) ** 2).sum(axis=(0, 2, 3)) for i in range(0, len(x), chunk)
    )
    std = np.sqrt(squares / count)
    # A constant channel carries no information; dividing by its ~0 std would only amplify rounding noise.
    return mean, np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)


def _split(x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Split:
    out = x.astype(np.float32)  # always a fresh, writable copy
    out -= mean.astype(np.float32)[:, None, None]
    out /= std.astype(np.float32)[:, None, None]
    return Split(torch.from_numpy(out), torch.from_numpy(np.array(y, dtype=np.int64)))


def load_dataset(spec: str = "digits", seed: int = 0, *, reward_size: int | None = None) -> Splits:
    """Load ``spec`` and split it deterministically from ``seed``; see the module docstring for specs.

    The test split is the source's own test set where it has one, else 20% of the data. Of the rest,
    ``reward_size`` samples (default 15%, capped at 1000, at least 1) form the reward split and the
    remainder trains. All three are standardised with per-channel statistics of the train split.
    """
    kind, path = _parse(spec)
    source = str(path) if path is not None else kind
    x, y, x_test, y_test = _LOADERS[kind](path)
    y = _check(x, y, source, "x")
    if x_test is not None and y_test is not None:
        y_test = _check(x_test, y_test, source, "x_test")
        if len(y_test) == 0:
            raise ValueError(f"{source}: the test set x_test is empty")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"{source}: x_test images have shape {x_test.shape[1:]}, x images {x.shape[1:]}")
    test_idx, reward_idx, train_idx = _split_indices(len(x), x_test is not None, seed, reward_size, source)
    _check_classes(y, y_test, source)
    if x_test is None or y_test is None:
        x_test, y_test = x[test_idx], y[test_idx]
    x_train = x[train_idx]
    mean, std = _channel_stats(x_train)
    return Splits(
        train=_split(x_train, y[train_idx], mean, std),
        reward=_split(x[reward_idx], y[reward_idx], mean, std),
        test=_split(x_test, y_test, mean, std),
        in_channels=int(x.shape[1]),
        num_classes=int(max(y.max(), y_test.max())) + 1,
        image_size=int(x.shape[2]),
        name=spec,
    )
