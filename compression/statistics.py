"""Statistics for comparing measurements: paired differences over seeds, and rank correlation.

A claim that method A beats method B is a paired comparison: both ran on the same seeds (same
base model, same split), so each seed gives one difference, and the mean difference comes with a
95% confidence interval from Student's t distribution over those differences. A rank correlation
(Spearman's) says how well one measurement orders candidates as another does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairedDifference", "paired_difference", "spearman"]


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over paired samples: mean, 95% interval (None with fewer than two pairs), wins."""

    mean: float
    low: float | None
    high: float | None
    n: int
    won: int  # pairs where a > b
    lost: int  # pairs where a < b

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _finite_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers, got {array.tolist()}")
    return array


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      confidence: float = 0.95) -> PairedDifference:
    """The mean of ``a[i] - b[i]`` with its two-sided ``confidence`` interval (Student's t over the
    differences) and how many pairs ``a`` won and lost."""
    from scipy.stats import t as student_t

    a, b = _finite_vector(a, "a"), _finite_vector(b, "b")
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"a and b must pair up, one value each per sample; got {len(a)} and {len(b)} values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    diff = a - b
    mean = float(diff.mean())
    low = high = None
    if len(diff) > 1:
        half = float(student_t.ppf(0.5 + confidence / 2, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
        low, high = mean - half, mean + half
    return PairedDifference(mean, low, high, len(diff), int((diff > 0).sum()), int((diff < 0).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (ties take mean ranks); NaN when either is constant."""
    x, y = _finite_vector(x, "x"), _finite_vector(y, "y")
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"x and y need the same length, at least 2; got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float("nan") if denominator == 0 else float((rx * ry).sum() / denominator)
