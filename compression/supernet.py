"""A weight-sharing supernet over channel widths (slimmable networks, AutoSlim, once-for-all).

Pruned hard, a network's accuracy before fine-tuning says little about its accuracy after it: every
candidate is near chance, whatever its widths. A supernet fixes that by training the widths
themselves. The base model's channels are put in importance order (``reorder_channels``), so that a
candidate keeping k channels of a group keeps its first k, and every candidate is a prefix
sub-network sharing the supernet's weights. Each batch trains by the sandwich rule (Yu & Huang
2019): the full width on the labels, then the narrowest width and ``candidates`` random widths on
the full width's soft targets (in-place distillation); ``extremes`` puts a random width's groups at
their floor or their full width more often, so that mixed shapes are trained too. With a FLOPs
``budget`` the supernet is trained for one search: its random widths are the candidates a search at
that budget chooses from (EagleEye's sampler, ``random_keep_counts``), and the narrowest width,
which no such search keeps, is not trained. Afterwards any
candidate, evaluated with its batch-norm statistics re-estimated (``recalibrate_bn``), scores close
to what it is worth, and the pruned model is the candidate's prefix of the supernet's weights,
fine-tuned.

Each sampled width runs as its sliced sub-network (``ChannelSlicer.forward``), at its own cost, with
gradients reaching the shared weights; a model with layers the slicer cannot slice runs its widths
soft-masked, at the full width's cost, with the same gradients.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .channels import ChannelGraph, SoftMask, recalibrate_bn, reorder_channels
from .checkpoint import describe_architecture, load_checkpoint, save_checkpoint
from .data import Split, Splits
from .distillation import kd_loss
from .importance import Importance
from .proxy import RECALIBRATION_BATCH
from .slicing import ChannelSlicer, unsliceable
from .sparsity import random_keep_counts
from .training import cache_dir, cache_key, train_classifier

__all__ = ["SUPERNET_LR", "SUPERNET_CANDIDATES", "SUPERNET_SAMPLING", "prefix_kept", "width_choices",
           "sample_keep_counts", "train_supernet", "make_supernet", "supernet_model"]

SUPERNET_LR = 1e-3
SUPERNET_CANDIDATES = 2  # random widths per batch, besides the full and the narrowest (AutoSlim's n = 4 in all)
SUPERNET_SAMPLING = ("uniform", "budget")  # a supernet's random widths: every width alike, or a search budget's
_RECALIBRATION_BATCHES = 20


def prefix_kept(keep_counts: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
    """The first ``keep_counts[g]`` channels of each group g: the candidate's channels in a supernet."""
    return [torch.arange(int(k)) for k in keep_counts]


def width_choices(graph: ChannelGraph, min_keep: float, multiple: int = 1) -> list[np.ndarray]:
    """Each group's channel counts from ``min_keep`` of its channels (at least one) up to all of them,
    at multiples of ``multiple`` (``ChannelGraph.allowed_counts``): what a supernet trains (every
    count) and what a search chooses from."""
    if not isinstance(min_keep, int | float) or not 0 < min_keep <= 1:
        raise ValueError(f"min_keep must be in (0, 1], got {min_keep!r}")
    floors = np.maximum(1, np.ceil(min_keep * graph.num_channels - 1e-9)).astype(np.int64)
    return [graph.allowed_counts(g, multiple, int(floors[g])) for g in range(len(graph.groups))]


def _check_extremes(extremes: float) -> None:
    if not isinstance(extremes, int | float) or not 0 <= extremes <= 1:
        raise ValueError(f"extremes must be in [0, 1], got {extremes!r}")


def sample_keep_counts(choices: Sequence[np.ndarray], rng: np.random.Generator, extremes: float = 0.0) -> np.ndarray:
    """One random candidate: each group's count drawn uniformly from its choices; with ``extremes``
    > 0, a group is instead at its smallest or its largest choice (half each) with that probability."""
    _check_extremes(extremes)
    counts = []
    for c in choices:
        if extremes and rng.random() < extremes:
            counts.append(c[0] if rng.random() < 0.5 else c[-1])
        else:
            counts.append(c[rng.integers(len(c))])
    return np.array(counts, dtype=np.int64)


def _check_budget(budget: float | None, extremes: float) -> None:
    if budget is None:
        return
    if not isinstance(budget, int | float) or not 0 < budget < 1:
        raise ValueError(f"budget must be a FLOPs ratio in (0, 1) or None, got {budget!r}")
    if extremes:
        raise ValueError(f"budget={budget} and extremes={extremes} are two ways to sample widths; give one")


def train_supernet(model: nn.Module, graph: ChannelGraph, split: Split, *, epochs: int, min_keep: float,
                   candidates: int = SUPERNET_CANDIDATES, extremes: float = 0.0, budget: float | None = None,
                   lr: float = SUPERNET_LR, seed: int = 0, device: torch.device | None = None) -> nn.Module:
    """Train ``model`` in place as a supernet of its prefix widths (the sandwich rule, in-place
    distillation), then re-estimate its batch-norm statistics at full width; returns it in eval mode.

    ``model``'s channels must already be in importance order (``make_supernet`` puts them so), and
    ``graph`` must be its channel graph.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(candidates, int) or candidates < 0:
        raise ValueError(f"candidates must be an int >= 0, got {candidates!r}")
    _check_extremes(extremes)
    _check_budget(budget, extremes)
    choices = width_choices(graph, min_keep)
    narrowest = [] if budget is not None else [prefix_kept([c[0] for c in choices])]
    rng = np.random.default_rng(seed)

    def sample() -> np.ndarray:
        if budget is not None:
            return random_keep_counts(graph, budget, choices, rng)
        return sample_keep_counts(choices, rng, extremes)

    # A width trains on its sliced sub-network, at its own cost; a model the slicer cannot slice soft-masked.
    slicer = None if unsliceable(model) else ChannelSlicer(model, graph)
    mask = SoftMask(model, graph) if slicer is None else None

    def at_width(net: nn.Module, kept: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if slicer is not None:
            return slicer.forward(kept, x)
        mask.set(kept)
        try:
            return net(x)
        finally:
            mask.set(None)

    def sandwich(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = net(x)
        loss = nn.functional.cross_entropy(logits, y)
        target = logits.detach()
        for kept in narrowest + [prefix_kept(sample()) for _ in range(candidates)]:
            loss = loss + kd_loss(at_width(net, kept, x), target, y, temperature=1.0, alpha=1.0)
        return loss

    try:
        train_classifier(model, split, epochs=epochs, lr=lr, seed=seed, device=device, loss_fn=sandwich)
    finally:
        if mask is not None:
            mask.remove()
    if epochs == 0:
        return model.eval()
    # Training mixed every width into the running statistics; the full width gets its own back.
    device = next(model.parameters()).device
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    size = RECALIBRATION_BATCH
    batches = [split.x[order[i:i + size]].to(device) for i in range(0, min(len(split), size * _RECALIBRATION_BATCHES),
                                                                        size)]
    recalibrate_bn(model, batches)
    return model.eval()


def make_supernet(model: nn.Module, example_input: torch.Tensor, split: Split, importance: Importance, *,
                  epochs: int, min_keep: float, candidates: int = SUPERNET_CANDIDATES, extremes: float = 0.0,
                  budget: float | None = None, lr: float = SUPERNET_LR, seed: int = 0,
                  device: torch.device | None = None) -> nn.Module:
    """A supernet trained from ``model`` (left unchanged): its channels put in ``importance`` order,
    then ``train_supernet``."""
    graph = ChannelGraph(model, example_input)
    supernet = reorder_channels(model, graph, importance)
    graph = ChannelGraph(supernet, example_input)
    return train_supernet(supernet, graph, split, epochs=epochs, min_keep=min_keep, candidates=candidates,
                          extremes=extremes, budget=budget, lr=lr, seed=seed, device=device)


def supernet_model(model_name: str, base: nn.Module, splits: Splits, seed: int, *, base_epochs: int, epochs: int,
                   min_keep: float, importance: Importance, candidates: int = SUPERNET_CANDIDATES,
                   extremes: float = 0.0, budget: float | None = None, lr: float = SUPERNET_LR,
                   device: torch.device | None = None, use_cache: bool = True) -> tuple[nn.Module, float]:
    """The supernet of the base model ``base`` (zoo name or import path ``model_name``, trained
    ``base_epochs`` on ``splits`` with ``seed``), trained once per setting and then read from the
    cache; and the seconds its training took (when it was trained, on that machine)."""
    _check_budget(budget, extremes)  # before the cache: a bad setting is refused even when cached
    # an option at its default leaves the key as it was for supernets cached before the option existed
    settings = (f"sn{epochs}_k{min_keep:g}_{importance.name}_c{candidates}_lr{lr:g}"
                + (f"_x{extremes:g}" if extremes else "") + (f"_b{budget:g}" if budget is not None else ""))
    path = cache_dir() / "supernet" / f"{cache_key(model_name, splits, seed, base_epochs)}__{settings}.pt"
    if use_cache and path.is_file():
        model, _, metadata = load_checkpoint(path, trust_factory=model_name)  # only the factory asked for
        return model.to(device or "cpu").eval(), float(metadata.get("seconds", float("nan")))
    started = time.perf_counter()
    supernet = make_supernet(base, splits.train.x[:1].to(device or "cpu"), splits.train, importance,
                             epochs=epochs, min_keep=min_keep, candidates=candidates, extremes=extremes,
                             budget=budget, lr=lr, seed=seed, device=device)
    seconds = time.perf_counter() - started
    if use_cache:
        arch = describe_architecture(supernet, model_name, splits.in_channels, splits.num_classes, splits.image_size)
        save_checkpoint(path, supernet, arch, {"dataset": splits.name, "seed": seed, "base_epochs": base_epochs,
                                               "supernet": settings, "seconds": seconds})
    return supernet, seconds
