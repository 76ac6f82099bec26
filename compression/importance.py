"""Importance criteria: which channels of a prunable group (``prunegym.compression.channels``)
matter most, scored from the trained weights. Higher scores are kept first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .channels import ChannelGroup

__all__ = ["Importance", "L1Importance", "L2Importance", "GroupL1Importance", "BNScaleImportance", "IMPORTANCES",
           "make_importance"]


class Importance:
    """Scores a group's channels; higher means more important. Subclasses implement ``__call__``."""

    name = "base"

    def __call__(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        raise NotImplementedError


class _NormImportance(Importance):
    p: int = 1

    @torch.no_grad()
    def __call__(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        modules = dict(model.named_modules())
        score = torch.zeros(group.num_channels)
        for name in group.producers:
            weight = modules[name].weight.detach().float().flatten(1)
            # Normalise per producer so that coupled layers of different fan-in weigh alike.
            norms = weight.norm(p=self.p, dim=1) / weight.shape[1]
            score += norms.cpu()
        return score


class L1Importance(_NormImportance):
    """Li et al. 2017: the L1 norm of each output filter, summed over the group's producers."""

    name = "l1"
    p = 1


class L2Importance(_NormImportance):
    """The L2 norm of each output filter, summed over the group's producers."""

    name = "l2"
    p = 2


class GroupL1Importance(Importance):
    """DepGraph's group magnitude (Fang et al. 2023): a channel's score is the mean, over every layer
    of its group, of the L1 norm of the weights that the channel owns there: the producers' output
    filters, the affine batch norms' scales and the consumers' input slices. A channel whose outputs
    nothing downstream reads ranks low even when its own filter is large. Without grouped convs this
    is torch-pruning's ``MagnitudeImportance(p=1)``; a grouped consumer is read through the filters
    of the channel's own group (torch-pruning sums the column over every group), and a depthwise
    consumer counts as a layer (torch-pruning leaves it out)."""

    name = "group_l1"

    @torch.no_grad()
    def __call__(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        modules = dict(model.named_modules())
        score = torch.zeros(group.num_channels)
        for name in group.producers:
            score += modules[name].weight.detach().float().flatten(1).abs().sum(1).cpu()
        parts = len(group.producers)
        for name in group.norms:
            if modules[name].weight is not None:
                score += modules[name].weight.detach().float().abs().cpu()
                parts += 1
        for consumer in group.consumers:
            score.index_add_(0, consumer.channel, _input_slice_l1(modules[consumer.name], consumer.input_index))
            parts += 1
        return score / parts


def _input_slice_l1(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The L1 norm of the weights of ``module`` that read each of the input channels ``inputs``."""
    weight = module.weight.detach().float().cpu()
    groups = int(getattr(module, "groups", 1))
    per_group_in = weight.shape[1]
    per_group_out = weight.shape[0] // groups
    rows = (inputs // per_group_in)[:, None] * per_group_out + torch.arange(per_group_out)  # (n, out per group)
    columns = weight.abs().flatten(2).sum(2) if weight.dim() > 2 else weight.abs()  # (out, in per group)
    return columns[rows, (inputs % per_group_in)[:, None]].sum(1)


class BNScaleImportance(Importance):
    """Network slimming: |gamma| of the batch norms over the group's channels, summed."""

    name = "bn_scale"

    @torch.no_grad()
    def __call__(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        if not group.norms:
            raise ValueError(f"group {group.name!r} has no batch norm; use the l1 or l2 criterion")
        modules = dict(model.named_modules())
        return sum(modules[n].weight.detach().abs().float().cpu() for n in group.norms)


IMPORTANCES: dict[str, type[Importance]] = {"l1": L1Importance, "l2": L2Importance, "group_l1": GroupL1Importance,
                                            "bn_scale": BNScaleImportance}


def make_importance(name: str) -> Importance:
    if name not in IMPORTANCES:
        raise ValueError(f"unknown importance {name!r}; expected one of {sorted(IMPORTANCES)}")
    return IMPORTANCES[name]()
