"""The policy-gated inference model: a trained per-input policy's actor inside a ``DynamicNetwork``.

``PolicyDecider`` carries only the actor network (plain torch layers copied out of the SB3 policy).
At each gated layer it computes the observation ``prunegym/InputPruning-v0`` would give from the
live features, takes the deterministic action (the argmax of the actor's logits, which is what
``predict(obs, deterministic=True)`` returns for a discrete action) and the network computes only
the kept channels. Running it needs neither gymnasium nor stable-baselines3: this module imports
neither.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunegym.compression.dynamic import DynamicSpec, Observation

__all__ = ["PolicyDecider", "actor_layers", "check_spec"]

_ACTIVATIONS = {cls.__name__: cls for cls in (nn.Tanh, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid)}


def actor_layers(agent: Any) -> list[nn.Module]:
    """The layers from observation to action logits (or Q-values) of an SB3 agent with a discrete
    action: ``features -> policy_net -> action_net`` of an actor-critic policy (PPO, A2C), or
    ``features -> q_net`` of a DQN. Copies; the agent is left as it is."""
    policy = agent.policy
    extractor = getattr(policy, "pi_features_extractor", None) or getattr(policy, "features_extractor", None)
    if hasattr(policy, "mlp_extractor") and hasattr(policy, "action_net"):
        layers = [*policy.mlp_extractor.policy_net, policy.action_net]
    elif hasattr(policy, "q_net") and hasattr(policy.q_net, "q_net"):
        extractor = policy.q_net.features_extractor
        layers = list(policy.q_net.q_net)
    else:
        raise ValueError(f"cannot find the actor of a {type(policy).__name__}; expected an actor-critic "
                         "policy (PPO, A2C) or a DQN policy")
    if extractor is not None and type(extractor).__name__ != "FlattenExtractor":
        raise ValueError(f"the policy's features extractor is {type(extractor).__name__}; only the flat "
                         "observation of InputPruning-v0 (FlattenExtractor) is supported")
    for layer in layers:
        if not isinstance(layer, nn.Linear) and type(layer).__name__ not in _ACTIVATIONS:
            raise ValueError(f"the actor has a {type(layer).__name__} layer; supported: Linear and "
                             f"{sorted(_ACTIVATIONS)}")
    return [copy.deepcopy(layer).cpu() for layer in layers]


class PolicyDecider(nn.Module):
    """A ``DynamicNetwork`` decider from a trained per-input policy's actor.

    ``mean`` and ``std`` (``[layers, F]``) are the env's observation statistics. The observation
    is built exactly as ``InputPruningEnv`` builds it: pooled features padded to ``F`` and
    standardised (clipped to ±10), the position one-hot, the FLOPs density spent.
    """

    def __init__(self, layers: list[nn.Module], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.actor = nn.Sequential(*layers)
        self.observation = Observation(mean, std)
        self.num_layers, self.width = mean.shape

    def config(self) -> dict[str, Any]:
        layers = []
        for layer in self.actor:
            if isinstance(layer, nn.Linear):
                layers.append(["Linear", layer.in_features, layer.out_features])
            else:
                layers.append([type(layer).__name__])
        return {"kind": "policy", "layers": layers, "num_layers": self.num_layers, "width": self.width}

    @classmethod
    def from_config(cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> PolicyDecider:
        layers: list[nn.Module] = []
        for entry in config["layers"]:
            if entry[0] == "Linear":
                layers.append(nn.Linear(int(entry[1]), int(entry[2])))
            elif entry[0] in _ACTIVATIONS:
                layers.append(_ACTIVATIONS[entry[0]]())
            else:
                raise ValueError(f"unknown actor layer {entry!r} in the saved policy")
        decider = cls(layers, torch.zeros(config["num_layers"], config["width"]),
                      torch.ones(config["num_layers"], config["width"]))
        decider.load_state_dict(state_dict)
        return decider.eval()

    @classmethod
    def from_agent(cls, agent: Any, stats: tuple[torch.Tensor, torch.Tensor]) -> PolicyDecider:
        return cls(actor_layers(agent), *stats).eval()

    def _apply(self, fn, recurse=True):
        self.__dict__["_fast"] = None  # parameters moved or cast: look them up again
        return super()._apply(fn, recurse)

    def _layers(self) -> list[tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]]:
        """The actor's layers with their weights looked up once (a batch-1 decision is a few
        microseconds of arithmetic; module call overhead would double it)."""
        fast = self.__dict__.get("_fast")
        if fast is None:
            fast = [(layer, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else (layer, None, None)
                    for layer in self.actor]
            self.__dict__["_fast"] = fast
        return fast

    def forward(self, gate: int, features: torch.Tensor, spent: Any = 0.0) -> Any:
        x = self.observation(gate, features, spent)
        for layer, weight, bias in self._layers():
            x = F.linear(x, weight, bias) if weight is not None else layer(x)
        if x.shape[0] == 1:
            return int(x[0].argmax())
        return x.argmax(dim=1)


def check_spec(decider: PolicyDecider, spec: DynamicSpec) -> None:
    """Raise if the decider was not trained for a network of this spec."""
    widest = max(layer.in_channels for layer in spec.layers)
    if decider.num_layers != len(spec.layers) or decider.width != widest:
        raise ValueError(f"the policy was trained on {decider.num_layers} gated layers of width {decider.width}; "
                         f"the network has {len(spec.layers)} of width {widest}")
    outputs = [m.out_features for m in decider.actor if isinstance(m, nn.Linear)][-1]
    if outputs != spec.groups:
        raise ValueError(f"the policy chooses among {outputs} actions; the network has {spec.groups} groups")
