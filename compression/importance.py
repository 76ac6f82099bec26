"""Importance criteria: which channels of a prunable group (``prunegym.compression.channels``)
matter most, scored from the trained weights. Higher scores are kept first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .channels import ChannelGroup

__all__ = ["Importance", "L1Importance", "L2Importance", "BNScaleImportance", "IMPORTANCES", "make_importance"]


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


class BNScaleImportance(Importance):
    """Network slimming: |gamma| of the batch norms over the group's channels, summed."""

    name = "bn_scale"

    @torch.no_grad()
    def __call__(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        if not group.norms:
            raise ValueError(f"group {group.name!r} has no batch norm; use the l1 or l2 criterion")
        modules = dict(model.named_modules())
        return sum(modules[n].weight.detach().abs().float().cpu() for n in group.norms)


IMPORTANCES: dict[str, type[Importance]] = {"l1": L1Importance, "l2": L2Importance, "bn_scale": BNScaleImportance}


def make_importance(name: str) -> Importance:
    if name not in IMPORTANCES:
        raise ValueError(f"unknown importance {name!r}; expected one of {sorted(IMPORTANCES)}")
    return IMPORTANCES[name]()
