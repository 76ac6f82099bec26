"""The gate baseline: input-dependent channel gates trained jointly with the network, and the
training loop every dynamic network is fine-tuned with.

Each gated layer gets a squeeze-and-excitation style gate that reads the features entering that
layer: global average pool -> FC -> ReLU -> FC -> sigmoid, one output per channel group after
the first (the first group is always kept, as the agent always keeps at least one). A group is
kept when its gate and every earlier group's gate exceed 0.5 (their logits exceed 0), so the
kept channels are a prefix and run through the same dynamic execution as the agent's decisions.
The hard threshold passes no gradient, so training uses a straight-through estimator: forward the
0/1 decision, backward the sigmoid's gradient. A target-density penalty
``weight · (mean FLOPs density - target)²`` sets how much is kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Split, Splits
from .deciders import FoldedDecider, PooledMLP
from .distillation import Distillation, kd_loss
from .dynamic import DynamicNetwork, build_dynamic, evaluate_dynamic
from .fusion import fold_batchnorm
from .gated_layers import DynamicSpec

__all__ = ["ChannelGate", "GateDecider", "train_dynamic", "train_gates", "dynamic_inference"]


class ChannelGate(nn.Module):
    """GAP -> FC -> ReLU -> FC -> sigmoid over the features entering one gated layer."""

    def __init__(self, in_channels: int, groups: int, hidden: int = 16, open_bias: float = 1.0):
        super().__init__()
        self.in_channels = in_channels
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, groups - 1)
        nn.init.constant_(self.fc2.bias, open_bias)  # start from the dense network: every gate open

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid outputs: a gate is open (sigmoid > 0.5) where its logit is > 0."""
        pooled = features.mean(dim=(2, 3))
        if pooled.shape[1] < self.in_channels:  # channels an earlier gate dropped enter as zeros
            pooled = F.pad(pooled, (0, self.in_channels - pooled.shape[1]))
        return self.fc2(torch.relu(self.fc1(pooled)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))


class GateDecider(FoldedDecider):
    """One ``ChannelGate`` per gated layer of ``spec``, as a ``DynamicNetwork`` decider.

    In train mode it returns a ``[B, G]`` 0/1 keep mask over channel groups whose gradient is the
    sigmoid's (straight-through); in eval mode the action, ``(number of groups kept) - 1``: an int
    for a batch of one, a ``[B]`` tensor otherwise.
    """

    decision = "leading_positive"

    def __init__(self, spec: DynamicSpec, hidden: int = 16):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.ModuleList(ChannelGate(layer.in_channels, len(layer.counts), hidden) for layer in spec.layers)
        self.refresh()

    def config(self) -> dict[str, Any]:
        return {"kind": "gate", "hidden": self.hidden}

    def _pooled_mlp(self, gate: int, shape: torch.Size) -> PooledMLP:
        """Gate ``gate`` as a ``PooledMLP`` for one input's features of ``shape``: channels an earlier
        gate dropped are zeros, so only the first ``C`` columns of the first FC are read."""
        g = self.gates[gate]
        with torch.no_grad():
            first = torch.cat([g.fc1.weight[:, : shape[1]].t() / (shape[2] * shape[3]), g.fc1.bias[None]])
            second = torch.cat([g.fc2.weight.t(), g.fc2.bias[None]])
        return PooledMLP(shape[1], first, [nn.ReLU(), second])

    def forward(self, gate: int, features: torch.Tensor, spent: Any = None) -> Any:
        if not self.training:  # the number of leading open gates (logit > 0); no sigmoid
            mlp = self.pooled(gate, features)
            if mlp is not None:
                return self.action(mlp(features))
            kept = (self.gates[gate].logits(features) > 0).cumprod(dim=1).sum(dim=1)
            return int(kept) if kept.shape[0] == 1 else kept
        logits = self.gates[gate].logits(features)
        probs = torch.sigmoid(logits)
        hard = (logits > 0).to(probs.dtype)
        straight = probs + (hard - probs).detach()  # exactly 0/1 forward, the sigmoid's gradient back
        ones = torch.ones(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
        return torch.cat([ones, torch.cumprod(straight, dim=1)], dim=1)


def train_dynamic(net: DynamicNetwork, split: Split, *, epochs: int, lr: float = 5e-4, batch_size: int = 64,
                  seed: int = 0, device: torch.device | None = None, target_density: float | None = None,
                  density_weight: float = 5.0, decider_lr: float = 1e-3, distill: Distillation | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Train a ``DynamicNetwork`` in mask mode on ``split`` with cross-entropy, plus
    ``density_weight · (mean density - target_density)²`` when a target is given: the network's
    parameters at ``lr``, those of a decider that is an ``nn.Module`` (and require grad) at
    ``decider_lr`` (gates start from scratch and must move further; at 1e-2 the straight-through
    gates of the digits CNN kept flipping and one seed in three ended 5-7 points lower).
    ``distill`` replaces the cross-entropy by the distillation loss from a (dense) teacher. Returns
    the per-epoch mean loss, task loss and density."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if target_density is not None and not 0 < target_density <= 1:
        raise ValueError(f"target_density must be in (0, 1], got {target_density}")
    device = device or torch.device("cpu")
    net.to(device).train()
    decider = net.decider if isinstance(net.decider, nn.Module) else None
    decider_params = {id(p) for p in decider.parameters()} if decider is not None else set()
    groups = [{"params": [p for p in net.parameters() if p.requires_grad and id(p) not in decider_params], "lr": lr},
              {"params": [p for p in net.parameters() if p.requires_grad and id(p) in decider_params],
               "lr": decider_lr}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    generator = torch.Generator().manual_seed(seed)
    if distill is not None:
        teacher_was_training = distill.teacher.training
        distill.teacher.to(device).eval()
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(split), generator=generator)
        sums = np.zeros(3)
        for start in range(0, len(split), batch_size):
            index = order[start:start + batch_size]
            x, y = split.x[index].to(device), split.y[index].to(device)
            logits = net(x)
            if distill is not None:
                with torch.no_grad():
                    teacher_logits = distill.teacher(x)
                ce = kd_loss(logits, teacher_logits, y, distill.temperature, distill.alpha)
            else:
                ce = F.cross_entropy(logits, y)
            density = torch.as_tensor(net.last_density, dtype=logits.dtype, device=device).mean()
            loss = ce if target_density is None else ce + density_weight * (density - target_density) ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += np.array([loss.item(), ce.item(), density.item()]) * len(index)
        history.append(dict(zip(("loss", "cross_entropy", "density"), (sums / len(split)).tolist(), strict=True)))
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
    net.eval()
    if distill is not None:
        distill.teacher.train(teacher_was_training)
    return history


def dynamic_inference(model: nn.Module, spec: DynamicSpec, decider: nn.Module | None) -> DynamicNetwork:
    """The inference form of a trained dynamic network: BN folded, weights sliced, eval mode, CPU."""
    decider = None if decider is None else copy.deepcopy(decider).cpu().eval()
    net = DynamicNetwork(fold_batchnorm(copy.deepcopy(model).cpu().eval()), spec, decider)
    return net.eval()


def train_gates(model: nn.Module, splits: Splits, *, target_density: float, groups: int = 4, epochs: int = 10,
                lr: float = 5e-4, density_weight: float = 5.0, hidden: int = 16, seed: int = 0,
                device: torch.device | None = None, importance=None, distill: Distillation | None = None,
                log: Callable[[str], None] | None = None) -> tuple[DynamicNetwork, nn.Module, DynamicSpec, dict]:
    """The gate baseline: gates and network trained jointly from the trained ``model`` towards
    ``target_density`` (mean FLOPs density on the train split).

    Returns the inference network (BN folded, gates deciding), the trained unfolded network it was
    built from, the spec, and a summary (history, reward-split accuracy and mean density)."""
    if not isinstance(target_density, int | float | np.floating) or not math.isfinite(target_density) \
            or not 0 < target_density <= 1:
        raise ValueError(f"target_density must be in (0, 1], got {target_density!r}")
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    trained = copy.deepcopy(model).to(device).eval()
    net, reordered, spec = build_dynamic(trained, splits.train.x[:1].to(device), groups, importance, fold_bn=False)
    decider = GateDecider(spec, hidden).to(device)
    net.decider = decider
    history = train_dynamic(net, splits.train, epochs=epochs, lr=lr, seed=seed, device=device,
                            target_density=target_density, density_weight=density_weight, distill=distill,
                            log=log)
    inference = dynamic_inference(reordered, spec, decider)
    result = evaluate_dynamic(inference, splits.reward.x, splits.reward.y)
    summary = {"history": history, "reward_loss": result["loss"], "reward_accuracy": result["accuracy"],
               "reward_density_mean": result["density_mean"]}
    return inference, reordered.cpu(), spec, summary
