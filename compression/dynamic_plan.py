"""The decisions of one forward pass of a per-input network (``prunegym.compression.dynamic``):
each gated layer's action, from the caller or from the decider, checked, and the FLOPs density
spent before each decision (what a decider reads). A single input's decision takes the decider's
own fast path (``FoldedDecider.decide_one``) where calling it does what calling the module does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .deciders import FoldedDecider

__all__ = ["Decider", "Plan", "as_action", "decide_one", "without_hooks"]

Decider = Callable[[int, torch.Tensor, Any], Any]


def as_action(action: Any) -> Any:
    """An int, a tensor, or None, from whatever a caller passed (numpy scalars and arrays too)."""
    if isinstance(action, np.integer):
        return int(action)
    if isinstance(action, np.ndarray):
        return torch.from_numpy(action)
    return action


class Plan:
    """The decisions of one forward pass: per gated layer the action (an int for the whole batch,
    a ``[B]`` tensor, or a ``[B, G]`` keep mask over channel groups), and the FLOPs spent so far."""

    def __init__(self, net: Any, actions: Sequence[Any] | None, decider: Decider | None):
        self.net = net
        self.actions: list[Any] = list(actions) if actions is not None else [None] * len(net.spec.layers)
        self.decider = decider
        # a single input's int decision, without the module call, where that decides the same
        self.decide_one = decider.decide_one if isinstance(decider, FoldedDecider) and not decider.training \
            and without_hooks(decider) else None
        self.fractions: list[Any] = [None] * len(net.spec.layers)
        self.spent: Any = 0.0
        self._next_term = 0

    def _spend_until(self, gate: int) -> None:
        terms = self.net._terms
        while self._next_term < len(terms) and terms[self._next_term][0] < gate:
            _, weight, g_in, g_out = terms[self._next_term]
            f_in = 1.0 if g_in < 0 else self.fractions[g_in]
            f_out = 1.0 if g_out < 0 else self.fractions[g_out]
            self.spent = self.spent + weight * f_in * f_out
            self._next_term += 1

    def decide(self, gate: int, x: torch.Tensor) -> Any:
        self._spend_until(gate)
        action = as_action(self.actions[gate])
        if action is None:
            if self.decider is None:
                raise ValueError(f"no action for gated layer {gate} and no decider")
            action = as_action(self.decider(gate, x, self.spent))
        self.net._check_action(gate, action)
        self.actions[gate] = action
        self.fractions[gate] = self.net._fraction(gate, action)
        return action

    def density(self) -> Any:
        self._spend_until(len(self.net.spec.layers) + 1)
        return self.spent


def without_hooks(module: nn.Module) -> bool:
    """Whether calling ``module.forward`` does what calling ``module`` does: no hook of its own or global."""
    from torch.nn.modules import module as torch_module

    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                    "_global_backward_pre_hooks")
    return not any(getattr(module, name, None) for name in hooks) \
        and not any(getattr(torch_module, name, None) for name in global_hooks)


def decide_one(plan: Plan, gate: int, x: torch.Tensor) -> int:
    """The decision at gated layer ``gate`` for a single input, as the int to slice at."""
    if plan.decide_one is not None and plan.actions[gate] is None:  # the decider's own fast path
        plan._spend_until(gate)
        action = plan.decide_one(gate, x, plan.spent)
        fractions = plan.net._fractions[gate]
        if not 0 <= action < len(fractions):
            plan.net._check_action(gate, action)  # raises, naming the layer
        plan.actions[gate] = action
        plan.fractions[gate] = fractions[action]
        return action
    action = plan.decide(gate, x)
    if isinstance(action, int):
        return action
    if action.dtype.is_floating_point:
        raise ValueError("a keep mask over channel groups needs mask mode (train mode)")
    if action.numel() != 1:
        raise ValueError(f"one input needs one action per gated layer; gated layer {gate} got {action.numel()}")
    return int(action.reshape(-1)[0])
