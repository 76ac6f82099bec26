"""The proxy a pruning search ranks candidates by: what a candidate scores before the real fine-tune.

A candidate is one keep count per channel group; its channels are the group's ``ranking`` prefix.
``ProxyEvaluator`` scores it on a split (the reward split, in a search) in one of two ways:

- BN-recalibrated (``finetune_steps=0``): the candidate's sub-network with its batch-norm statistics
  re-estimated on ``recalibration_batches`` train batches; with many batches this is EagleEye's
  "adaptive BN".
- short-term fine-tuned (NetAdapt): the candidate's sub-network trained ``finetune_steps`` batches
  of 64 on the train split, the same batches for every candidate.

The sub-network is sliced from the model (``ChannelSlicer``), so a candidate costs what its width
costs; a model with layers the slicer cannot slice is soft-masked instead (``SoftMask``), which
computes the same outputs at the full width's cost (``sliced=False`` asks for that too:
``scripts/bench.py --what scoring`` times both ways).

With ``refit_head``, a BN-recalibrated candidate's classifier (the model's last ``nn.Linear``) is also
re-fitted, before it is scored, to the pooled features of the recalibration images: a multinomial
logistic regression on them (L-BFGS from the classifier's own weights, an L2 penalty of
``HEAD_REFIT_L2``). Batch-norm recalibration puts right the statistics a sub-network no longer shares
with the full model; the classifier a weight-sharing supernet shares between all its widths stays as
the widths' average left it, and penalises the candidates whose last features it fits least well,
which the fine-tune after the search puts right (docs/search.md measures how it ranks,
docs/results.md what the search gains).

Either way it reports the cross-entropy (``loss``), the ``accuracy``, and the ``distillation`` loss:
the KL divergence from the full model's predictions on the same images (T = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .channels import ChannelGraph, SoftMask, bn_state, load_bn_state, prune_channels, recalibrate_bn
from .data import Split
from .slicing import ChannelSlicer, unsliceable
from .training import train_classifier

__all__ = ["HEAD_REFIT_ITERATIONS", "HEAD_REFIT_L2", "ProxyEvaluator", "RECALIBRATION_BATCH", "check_refit_head",
           "classifier_of"]

RECALIBRATION_BATCH = 128
HEAD_REFIT_L2 = 1e-3
"""the L2 penalty on the re-fitted classifier's weights (``refit_head``), beside the mean cross-entropy"""
HEAD_REFIT_ITERATIONS = 100
"""the most L-BFGS iterations of a head re-fit"""


def classifier_of(model: nn.Module) -> nn.Linear:
    """The model's classifier, its last ``nn.Linear`` (what ``refit_head`` re-fits); a model with none is
    refused by its type."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"refit_head re-fits the model's classifier, its last nn.Linear; {type(model).__name__} "
                         "has no nn.Linear")
    return linears[-1]


def check_refit_head(refit_head: Any, recalibration_batches: int, finetune_steps: int) -> None:
    """Refuse, by name, a ``refit_head`` that is not a bool, or one without recalibration batches to fit
    on or beside a short-term fine-tune (which scores a trained copy instead)."""
    if not isinstance(refit_head, bool):
        raise ValueError(f"refit_head must be a bool, got {refit_head!r}")
    if refit_head and (finetune_steps or not recalibration_batches):
        raise ValueError("refit_head re-fits the classifier on the BN-recalibration batches; it needs "
                         f"recalibration_batches >= 1 (got {recalibration_batches!r}) and no finetune_steps "
                         f"(got {finetune_steps!r})")


def _refit(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> nn.Linear:
    """``head`` re-fitted to ``features`` and ``labels``: L-BFGS on the mean cross-entropy plus
    ``HEAD_REFIT_L2`` times the squared weights, from ``head``'s weights (a new layer: ``head``, and any
    hook on it, are left as they are)."""
    fitted = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                       device=head.weight.device, dtype=head.weight.dtype)
    fitted.load_state_dict(head.state_dict())
    optimiser = torch.optim.LBFGS(fitted.parameters(), max_iter=HEAD_REFIT_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(fitted(features), labels) + HEAD_REFIT_L2 * fitted.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return fitted.requires_grad_(False)


class ProxyEvaluator:
    """Scores keep counts of ``model`` (whose channel graph is ``graph``) on a split.

    ``ranking[g]`` lists group g's channels, most important first; a candidate keeps its prefix.
    ``model`` is left as it was after every call (masks off, batch-norm statistics restored), and
    must not change while the evaluator is in use: its full-width predictions and every candidate's
    scores are remembered, so a candidate a search visits again costs nothing (``evaluations``
    counts the candidates computed).
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, ranking: Sequence[torch.Tensor], train: Split, *,
                 recalibration_batches: int = 2, finetune_steps: int = 0, finetune_lr: float = 1e-3, seed: int = 0,
                 device: torch.device | None = None, sliced: bool = True, refit_head: bool = False):
        if not isinstance(recalibration_batches, int | np.integer) or recalibration_batches < 0:
            raise ValueError(f"recalibration_batches must be an int >= 0, got {recalibration_batches!r}")
        if not isinstance(finetune_steps, int | np.integer) or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be an int >= 0, got {finetune_steps!r}")
        if not finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {finetune_lr!r}")
        check_refit_head(refit_head, recalibration_batches, finetune_steps)
        if refit_head:
            classifier_of(model)
        self.model, self.graph, self.ranking, self.train = model, graph, list(ranking), train
        self.recalibration_batches = int(recalibration_batches)
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.seed = int(seed)
        self.refit_head = refit_head
        self.device = device or next(model.parameters()).device
        self._slicer = ChannelSlicer(model, graph) if sliced and not unsliceable(model) else None
        self._mask = SoftMask(model, graph) if self._slicer is None else None
        self._bn_state = None if self._mask is None else bn_state(model)  # what the soft mask's recalibration restores
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
        b = RECALIBRATION_BATCH
        self._recalibration = [train.x[order[i * b:(i + 1) * b]].to(self.device)
                               for i in range(self.recalibration_batches) if i * b < len(train)]
        self._recalibration_labels = train.y[order[:sum(len(x) for x in self._recalibration)]].to(self.device)
        self._teacher: dict[Split, torch.Tensor] = {}  # the full model's log-probabilities, per split
        self._scored: dict[tuple[Split, tuple[int, ...]], dict[str, float]] = {}
        self.evaluations = 0
        self.closed = False

    def kept_channels(self, keep_counts: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
        """The channels each group keeps: its ``keep_counts[g]`` first in the ranking, ascending."""
        return self.graph.kept_channels(self.ranking, keep_counts)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module, split: Split) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = torch.cat([F.log_softmax(model(split.x[i:i + 1024].to(self.device)), dim=1)
                         for i in range(0, len(split), 1024)])
        model.train(was_training)
        return out

    def _teacher_log_probs(self, split: Split) -> torch.Tensor:
        if split not in self._teacher:  # first asked for while no mask is set (``__call__``)
            self._teacher[split] = self._log_probs(self.model, split)
        return self._teacher[split]

    def _scores(self, model: nn.Module, split: Split) -> dict[str, float]:
        log_probs = self._log_probs(model, split)
        teacher = self._teacher_log_probs(split)
        y = split.y.to(self.device)
        return {"loss": F.nll_loss(log_probs, y).item(),
                "accuracy": (log_probs.argmax(1) == y).float().mean().item(),
                "distillation": F.kl_div(log_probs, teacher, reduction="batchmean", log_target=True).item()}

    @torch.no_grad()
    def __call__(self, keep_counts: Sequence[int] | np.ndarray, split: Split) -> dict[str, Any]:
        """``loss``, ``accuracy`` and ``distillation`` of the candidate on ``split``."""
        if self.closed:
            raise RuntimeError("this ProxyEvaluator was closed: its masks are off the model")
        key = (split, tuple(int(k) for k in keep_counts))
        if key not in self._scored:
            self._scored[key] = self._compute(keep_counts, split)
            self.evaluations += 1
        return dict(self._scored[key])

    def _compute(self, keep_counts: Sequence[int] | np.ndarray, split: Split) -> dict[str, float]:
        kept = self.kept_channels(keep_counts)
        self._teacher_log_probs(split)  # computed with no mask, before any candidate's
        if self.finetune_steps:
            pruned = self._slicer(kept) if self._slicer else prune_channels(self.model, self.graph, kept)
            with torch.enable_grad():
                train_classifier(pruned, self.train, epochs=0, lr=self.finetune_lr, seed=self.seed,
                                 device=self.device, max_steps=self.finetune_steps)
            return self._scores(pruned, split)
        if self._slicer:
            sub = self._slicer(kept)
            recalibrate_bn(sub, self._recalibration)
            return self._recalibrated_scores(sub, split)
        self._mask.set(kept)
        try:
            recalibrate_bn(self.model, self._recalibration)
            return self._recalibrated_scores(self.model, split)
        finally:
            self._mask.set(None)
            load_bn_state(self.model, self._bn_state)

    def _recalibrated_scores(self, model: nn.Module, split: Split) -> dict[str, float]:
        """``_scores`` of a BN-recalibrated candidate; with ``refit_head``, through its classifier re-fitted
        to its pooled features of the recalibration images."""
        if not self.refit_head:
            return self._scores(model, split)
        head = classifier_of(model)
        features: list[torch.Tensor] = []
        was_training = model.training
        model.eval()
        hook = head.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
        try:
            for x in self._recalibration:
                model(x)
        finally:
            hook.remove()
            model.train(was_training)
        fitted = _refit(head, torch.cat(features), self._recalibration_labels)
        hook = head.register_forward_hook(lambda module, args, output: fitted(args[0]))
        try:
            return self._scores(model, split)
        finally:
            hook.remove()

    def close(self) -> None:
        """Detach the soft-mask hooks from the model, if any; the evaluator scores nothing after."""
        if self._mask is not None:
            self._mask.remove()
        self.closed = True
