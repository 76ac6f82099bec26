"""Knowledge distillation (Hinton et al. 2015) and the reduced-width student it trains.

The loss is ``α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 - α)·CE(s, y)``. The KL term takes the
student's *log*-probabilities and the teacher's probabilities (``F.kl_div`` with log targets); the
``T²`` factor keeps its gradients on the scale of the cross-entropy's as T grows. Feeding
probabilities to ``nll_loss`` instead, as is sometimes seen, computes ``-Σ p_t·p_s`` rather than a
divergence, and its gradient vanishes as the student grows confident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .channels import ChannelGraph, prune_channels
from .importance import L1Importance

__all__ = ["Distillation", "kd_loss", "student_model"]


@dataclass(frozen=True)
class Distillation:
    """A teacher and the mixing of its soft targets with the labels."""

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton's distillation loss, mixed with the cross-entropy on the labels by ``alpha``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, targets)
    return alpha * t * t * soft + (1 - alpha) * hard


def _reset_parameters(model: nn.Module) -> None:
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()


def student_model(model: nn.Module, graph: ChannelGraph, flops: float, seed: int = 0) -> nn.Module:
    """A freshly initialised copy of ``model`` whose every channel group has one width ratio, the
    largest whose FLOPs stay within ``flops`` (a fraction of the dense model's, like a pruned model's
    budget): the reduced-width student of the same architecture."""
    from .sparsity import uniform_keep_counts  # sparsity imports training, which imports this module

    counts = uniform_keep_counts(graph, flops)
    student = prune_channels(model, graph, graph.kept_channels(L1Importance(), counts))
    with torch.random.fork_rng(devices=[]):  # seeded here, without touching the caller's random state
        torch.manual_seed(seed)
        _reset_parameters(student)
    return student.train()
