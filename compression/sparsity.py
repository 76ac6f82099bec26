"""Static sparsity baselines: what the agent must beat.

Structured (whole channels, physically removed through the channel core, ``prune_channels``):

- ``uniform_keep_counts``: one keep ratio for every group, filters ranked by L1 norm (Li et al. 2017).
- ``global_keep_counts``: one threshold across all layers on per-layer-normalised scores (L1, L2),
  or on raw BN scales after ``slimming_penalty`` training (network slimming, Liu et al. 2017).
- ``random_kept``: random channels at given per-group counts, the sanity floor.
- ``random_keep_counts``: random per-group counts at a FLOPs budget (EagleEye's candidate sampler).
- ``torch_pruning_magnitude``: torch-pruning's own magnitude pruner, as an outside check.

Unstructured (single weights, ``MagnitudePruner``): global magnitude pruning on the gradual
schedule of Zhu & Gupta 2017 (``agp_sparsity``). It keeps the dense shapes, so dense kernels run
exactly as many FLOPs as before: it saves bytes (``sparse_bytes``), not time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .channels import ChannelGraph
from .importance import Importance
from .metrics import count_flops, saved_bytes

__all__ = [
    "uniform_keep_counts",
    "global_keep_counts",
    "random_kept",
    "random_keep_counts",
    "slimming_penalty",
    "agp_sparsity",
    "MagnitudePruner",
    "weight_sparsity",
    "sparse_bytes",
    "torch_pruning_magnitude",
]

_WEIGHTED = (nn.Conv2d, nn.Linear)


def _check_ratio(name: str, value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def uniform_keep_counts(graph: ChannelGraph, flops_ratio: float, multiple: int = 1) -> np.ndarray:
    """Keep counts of one keep ratio for every group: the largest ratio whose FLOPs stay within
    ``flops_ratio`` of the dense model's (one channel per group at the least)."""
    _check_ratio("flops_ratio", flops_ratio)
    ratios = np.linspace(0.0, 1.0, 2001)
    counts = np.stack([graph.keep_counts(np.full(len(graph.groups), r), multiple=multiple) for r in ratios])
    fits = np.flatnonzero(graph.flops(counts) <= flops_ratio * graph.dense_flops * (1 + 1e-9))
    return counts[fits[-1] if len(fits) else 0].astype(np.int64)


def global_keep_counts(graph: ChannelGraph, importance: Importance, flops_ratio: float, *,
                       normalize: bool = True, model: nn.Module | None = None) -> np.ndarray:
    """Keep counts from one threshold across all groups: every channel scoring above it stays, the
    lowest threshold whose FLOPs fit within ``flops_ratio`` (each group keeps one channel at least).

    ``normalize`` divides each group's scores by the group's largest, so that layers of different
    scale compete fairly (L1/L2 norms); network slimming ranks raw BN scales (``normalize=False``),
    which its L1 penalty has made comparable. Within a group the kept channels are the criterion's
    top ones, as ``graph.kept_channels(importance, counts)`` gives them.
    """
    _check_ratio("flops_ratio", flops_ratio)
    model = graph.model if model is None else model
    scores = []
    for group in graph.groups:
        s = importance(model, group).double()
        if normalize:
            s = s / s.max().clamp_min(1e-12)
        scores.append(torch.sort(s, descending=True).values.numpy())
    thresholds = np.unique(np.concatenate(scores))  # ascending: keeping fewer channels as it grows

    def counts_at(t: float) -> np.ndarray:
        return np.array([max(1, int((s >= t).sum())) for s in scores], dtype=np.int64)

    budget = flops_ratio * graph.dense_flops * (1 + 1e-9)
    lo, hi = 0, len(thresholds) - 1  # find the smallest index whose counts fit
    if graph.flops(counts_at(thresholds[hi])) > budget:
        return counts_at(thresholds[hi])  # even one channel a group does not fit: as small as it goes
    while lo < hi:
        mid = (lo + hi) // 2
        if graph.flops(counts_at(thresholds[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return counts_at(thresholds[lo])


def random_kept(graph: ChannelGraph, keep_counts: Sequence[int] | np.ndarray, seed: int = 0) -> list[torch.Tensor]:
    """Random channels of each group, ``keep_counts[g]`` of them, ascending: the floor any criterion must beat."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for group, k in zip(graph.groups, keep_counts, strict=True):
        if not 1 <= int(k) <= group.num_channels:
            raise ValueError(f"group {group.name!r} has {group.num_channels} channels, cannot keep {k}")
        kept.append(torch.sort(torch.randperm(group.num_channels, generator=generator)[: int(k)]).values)
    return kept


def random_keep_counts(graph: ChannelGraph, flops_ratio: float, choices: Sequence[np.ndarray],
                       rng: np.random.Generator, tolerance: float = 0.03, max_tries: int = 1000) -> np.ndarray:
    """Random keep counts whose FLOPs lie within ``tolerance`` below ``flops_ratio`` of the dense
    model's, as EagleEye samples candidates: random per-group proportions, scaled to the budget.

    ``choices[g]`` are the counts group g may keep, ascending. A draw takes a random weight per group
    and keeps, at a common scale t, each group's ``min(1, t·weight)`` point between its fewest and
    most counts, t as large as the budget allows; a draw that cannot come within ``tolerance`` of the
    budget (its counts are too coarse there) is drawn again.
    """
    _check_ratio("flops_ratio", flops_ratio)
    if len(choices) != len(graph.groups):
        raise ValueError(f"need count choices for {len(graph.groups)} groups, got {len(choices)}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    budget = flops_ratio * graph.dense_flops
    last = np.array([len(c) - 1 for c in choices])
    fewest = np.array([c[0] for c in choices])
    if graph.flops(fewest) > budget * (1 + 1e-9):
        raise ValueError(f"flops_ratio={flops_ratio} is below the FLOPs ratio of the fewest counts allowed, "
                         f"{graph.flops(fewest) / graph.dense_flops:.4f}")

    def counts_at(t: float, weight: np.ndarray) -> np.ndarray:
        index = np.rint(np.minimum(1.0, t * weight) * last).astype(np.int64)
        return np.array([c[i] for c, i in zip(choices, index, strict=True)], dtype=np.int64)

    for _ in range(max_tries):
        weight = rng.uniform(0.0, 1.0, len(choices))
        lo, hi = 0.0, 1.0 / max(weight.min(), 1e-6)  # every group at its fewest counts, and at its most
        for _ in range(50):
            mid = (lo + hi) / 2
            if graph.flops(counts_at(mid, weight)) <= budget * (1 + 1e-9):
                lo = mid
            else:
                hi = mid
        counts = counts_at(lo, weight)
        if graph.flops(counts) >= budget * (1 - tolerance):
            return counts
    raise ValueError(f"no random keep counts came within {tolerance} of flops_ratio={flops_ratio} in "
                     f"{max_tries} draws; the counts allowed are too coarse for it")


def slimming_penalty(strength: float) -> Callable[[nn.Module], torch.Tensor]:
    """Network slimming's sparsity term: ``strength · Σ|γ|`` over every BatchNorm's scale, added to
    the training loss (``train_classifier(penalty=...)``) so unimportant channels' scales go to zero."""
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")

    def penalty(model: nn.Module) -> torch.Tensor:
        scales = [m.weight.abs().sum() for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        if not scales:
            raise ValueError(f"{type(model).__name__} has no batch norm with a scale; network slimming needs one")
        return strength * torch.stack(scales).sum()

    return penalty


def agp_sparsity(step: int, total: int, final: float, initial: float = 0.0, ramp: float = 0.75) -> float:
    """Zhu & Gupta's gradual schedule: ``s_t = s_f + (s_i - s_f)(1 - t/n)^3`` over the first ``ramp``
    of the ``total`` steps (n = ramp·total), then ``final`` (the rest of training recovers)."""
    if not 0 <= initial <= final < 1:
        raise ValueError(f"need 0 <= initial <= final < 1, got initial={initial}, final={final}")
    if not 0 < ramp <= 1:
        raise ValueError(f"ramp must be in (0, 1], got {ramp}")
    n = max(1, int(round(ramp * total)))
    progress = min(1.0, max(0, step) / n)
    return final + (initial - final) * (1 - progress) ** 3


class MagnitudePruner:
    """Global unstructured magnitude pruning of every conv and linear weight.

    ``update(sparsity)`` zeroes the smallest-magnitude weights across all layers (at least
    ``sparsity`` of them) and remembers the masks; ``apply()`` re-zeroes them (after an optimiser
    step). ``hook(final)`` is a ``train_classifier(after_step=...)`` callback that follows
    ``agp_sparsity`` to ``final``, updating the masks ``updates`` times along the ramp.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.weights = [m.weight for m in model.modules() if isinstance(m, _WEIGHTED)]
        if not self.weights:
            raise ValueError(f"{type(model).__name__} has no conv or linear weight to prune")
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        self.sparsity = 0.0

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        magnitudes = torch.cat([w.detach().abs().flatten() for w in self.weights])
        k = math.ceil(sparsity * magnitudes.numel() - 1e-9)  # at least the fraction asked for
        if k > 0:
            threshold = torch.kthvalue(magnitudes.cpu(), k).values.item()
            self.masks = [w.detach().abs() > threshold for w in self.weights]
        else:
            self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        self.sparsity = float(sparsity)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in zip(self.weights, self.masks, strict=True):
            weight.mul_(mask)

    def hook(self, final: float, updates: int = 20, ramp: float = 0.75) -> Callable[[int, int], None]:
        if not 0 <= final < 1:
            raise ValueError(f"final sparsity must be in [0, 1), got {final}")

        def after_step(step: int, total: int) -> None:
            # Prune again once the schedule has moved a step of final/updates beyond the masks (or has
            # reached its end): steps that never come (a skipped batch) cannot stall it.
            target = agp_sparsity(step, total, final, ramp=ramp)
            if target >= min(final, self.sparsity + final / updates) and target > self.sparsity:
                self.update(target)
            else:
                self.apply()

        return after_step


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of zero weights over every conv and linear weight."""
    weights = [m.weight for m in model.modules() if isinstance(m, _WEIGHTED)]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / max(1, total))


def sparse_bytes(model: nn.Module) -> int:
    """Bytes of the state dict as ``torch.save`` writes it once every conv and linear weight is
    stored sparsely: its nonzero values (fp32) and a bitmask of where they sit (1 bit per weight)."""
    weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key in weights:
            mask = value != 0
            state[key + ".values"] = value[mask].clone()
            state[key + ".bits"] = torch.from_numpy(np.packbits(mask.flatten().numpy()))
        else:
            state[key] = value
    return saved_bytes(state)


def torch_pruning_magnitude(model: nn.Module, example_input: torch.Tensor, flops_ratio: float,
                            p: int = 1, tolerance: float = 0.005) -> nn.Module:
    """torch-pruning's ``MagnitudePruner``: one channel ratio for every layer, found by bisection as the
    largest whose FLOPs fit within ``flops_ratio``, as uniform L1's. Its channels are ranked by
    torch-pruning's group magnitude, the L``p`` norm of every weight a channel owns across its group
    (filters, batch-norm scales, the next layers' input slices; ``GroupL1Importance`` for p = 1 on a
    network without grouped convs), not by the filter alone as uniform L1 ranks them."""
    _check_ratio("flops_ratio", flops_ratio)
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.cpu()
    dense = count_flops(model, example_input)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ignored = linears[-1:]  # the classifier's outputs are the classes

    def pruned(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(model)
        ignored_here = [dict(candidate.named_modules())[n] for n, m in model.named_modules() if m in ignored]
        pruner = tp.pruner.MagnitudePruner(candidate, example_input, importance=tp.importance.MagnitudeImportance(p=p),
                                           pruning_ratio=ratio, ignored_layers=ignored_here)
        pruner.step()
        return candidate

    if flops_ratio >= 1:
        return model.train()
    lo, hi = 0.0, 0.99  # channel pruning ratios; FLOPs fall as the ratio grows
    best = pruned(hi)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        candidate = pruned(mid)
        if count_flops(candidate, example_input) <= flops_ratio * dense * (1 + 1e-9):
            hi, best = mid, candidate
        else:
            lo = mid
    return best.train()
