"""The reward both environments pay, ``-task_loss - λ·density``, and the check of its price λ."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_lam"]


def check_lam(lam: Any, name: str = "lam") -> float:
    """``lam`` (or another price in the reward, ``name``) as a float, or a ValueError naming it unless
    it is a finite number >= 0."""
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {lam!r}")
    return float(lam)
