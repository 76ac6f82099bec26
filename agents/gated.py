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
from torch import nn

from prunegym.compression.deciders import FEATURE_CLIP, FoldedDecider, Observation, PooledMLP, standardise
from prunegym.compression.gated_layers import DynamicSpec

__all__ = ["PolicyDecider", "actor_layers", "check_spec"]

_ACTIVATIONS = {cls.__name__: cls for cls in (nn.Tanh, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid)}
_IN_PLACE = {nn.Tanh: torch.Tensor.tanh_, nn.ReLU: torch.Tensor.relu_, nn.Sigmoid: torch.Tensor.sigmoid_}


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


class PolicyDecider(FoldedDecider):
    """A ``DynamicNetwork`` decider from a trained per-input policy's actor.

    ``mean`` and ``std`` (``[layers, F]``) are the env's observation statistics. The observation
    is built exactly as ``InputPruningEnv`` builds it: pooled features padded to ``F`` and
    standardised (clipped to ±10), the position one-hot, the FLOPs density spent.
    """

    def __init__(self, layers: list[nn.Module], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        if not layers or not isinstance(layers[0], nn.Linear):
            first = type(layers[0]).__name__ if layers else "no layer"
            raise ValueError(f"the actor must begin with a Linear layer, got {first}")
        self.actor = nn.Sequential(*layers)
        self.observation = Observation(mean, std)
        self.num_layers, self.width = mean.shape
        self.refresh()

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

    def _fold(self, gate: int, channels: int) -> tuple[Any, ...]:
        """The actor's weights arranged for a decision in few operators (at batch 1 each costs a few
        microseconds of dispatch, more than its arithmetic), for a gated layer with ``channels``
        features: the observation's mean and std for them; the first Linear's columns for them
        (transposed, for ``addmm``), its bias with the constant rest of the observation (padding,
        one-hot) folded in, and its column for the density spent; then the later layers, each
        Linear's weight transposed."""
        first = self.actor[0]
        with torch.no_grad():
            mean, std, rest = self.observation.part(gate, channels)
            weight = first.weight.detach()
            bias = _bias(first)
            steps = []
            for layer in self.actor[1:]:
                if isinstance(layer, nn.Linear):
                    steps.append((layer.weight.detach().t().contiguous(), _bias(layer), None))
                else:
                    steps.append((None, None, layer))
            return (mean, std, weight[:, :channels].t().contiguous(), bias + weight[:, channels:-1] @ rest[0],
                    weight[:, -1].contiguous(), steps)

    def _pooled_mlp(self, gate: int, shape: torch.Size) -> PooledMLP | None:
        """The actor as a ``PooledMLP`` for one input's features of ``shape``, the density spent its
        one extra: the first matrix carries the pooling, the standardisation, the constant rest of
        the observation, the density's column and the bias, and the clip of the standardised
        features becomes bounds on their sums. None (the torch path decides) unless ``PooledMLP``
        runs every activation of the actor."""
        mean, std, weight, bias, spent_column, steps = self._fold(gate, shape[1])
        later = [layer if w is None else torch.cat([w, b[None]]) for w, b, layer in steps]
        if not PooledMLP.supports(later):
            return None
        with torch.no_grad():
            mean, std, weight = mean.double(), std.double(), weight.double()
            scale = 1.0 / (std * (shape[2] * shape[3]))  # standardised = sums * scale - mean / std
            infinite = torch.full((2,), torch.inf, dtype=torch.float64)
            high = torch.cat([(mean / std + FEATURE_CLIP) / scale, infinite])
            low = torch.cat([(mean / std - FEATURE_CLIP) / scale, -infinite])
            first = torch.cat([weight * scale[:, None], spent_column.double()[None],
                               (bias.double() - (mean / std) @ weight)[None]])
        return PooledMLP(shape[1], first, later, low, high)

    def forward(self, gate: int, features: torch.Tensor, spent: Any = 0.0) -> Any:
        """The action at gated layer ``gate``: the actor's argmax on the observation the env would
        give. The observation is not built: its constant part lives in the first layer's bias
        (the same sums in another order, so equal up to float rounding)."""
        mlp = None if isinstance(spent, torch.Tensor) else self.pooled(gate, features)
        if mlp is not None:
            return self.action(mlp(features, float(spent)))
        mean, std, weight, bias, spent_column, steps = self.folded((gate, features.shape[1]),
                                                                   lambda: self._fold(gate, features.shape[1]))
        if isinstance(spent, torch.Tensor):
            bias = torch.addcmul(bias, spent.to(bias.dtype).reshape(-1, 1), spent_column)
        else:
            bias = torch.add(bias, spent_column, alpha=float(spent))
        x = torch.addmm(bias, standardise(features, mean, std), weight)
        for weight, bias, layer in steps:
            x = torch.addmm(bias, x, weight) if weight is not None else _IN_PLACE.get(type(layer), layer)(x)
        if x.shape[0] == 1:
            return int(x.argmax())  # the flat index of a [1, G] row is the action
        return x.argmax(dim=1)


def _bias(layer: nn.Linear) -> torch.Tensor:
    return layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.out_features)


def check_spec(decider: PolicyDecider, spec: DynamicSpec) -> None:
    """Raise if the decider was not trained for a network of this spec."""
    widest = max(layer.in_channels for layer in spec.layers)
    if decider.num_layers != len(spec.layers) or decider.width != widest:
        raise ValueError(f"the policy was trained on {decider.num_layers} gated layers of width {decider.width}; "
                         f"the network has {len(spec.layers)} of width {widest}")
    outputs = [m.out_features for m in decider.actor if isinstance(m, nn.Linear)][-1]
    if outputs != spec.groups:
        raise ValueError(f"the policy chooses among {outputs} actions; the network has {spec.groups} groups")
