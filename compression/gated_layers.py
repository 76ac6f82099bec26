"""Which layers of a network may be pruned per input, and at which widths: the gated layers.

A *gated layer* is a conv whose output channels are free: no residual add ties them to another
layer, so an input may keep any number of them. The decision for it is an *action* ``a`` in
``0..G-1``: keep ``a + 1`` of its ``G`` equal channel groups, the first ones once its channels are
in importance order. ``DynamicSpec`` describes a network's gated layers and what each costs; the
dynamic network (``prunegym.compression.dynamic``) executes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .channels import ChannelGraph, in_channels

__all__ = ["GatedLayer", "DynamicSpec", "group_counts", "gated_layers", "dynamic_spec"]


def group_counts(channels: int, groups: int) -> list[int]:
    """Channels kept by actions ``0..groups-1``: ``ceil((a + 1) · channels / groups)``."""
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if groups > channels:
        raise ValueError(f"groups={groups} is more than the {channels} channels of a gated layer")
    return [math.ceil((a + 1) * channels / groups) for a in range(groups)]


@dataclass(frozen=True)
class GatedLayer:
    """A conv whose output channels an input may keep a prefix of."""

    name: str  # the conv
    channels: int
    in_channels: int  # channels of the features entering it: what a decider sees
    counts: tuple[int, ...]  # channels kept by each action
    consumers: tuple[tuple[str, tuple[int, ...]], ...]  # (layer, channel of each input position)


@dataclass(frozen=True)
class DynamicSpec:
    """Everything a ``DynamicNetwork`` needs besides the model: plain data, saved as JSON."""

    layers: tuple[GatedLayer, ...]
    costs: tuple[tuple[str, float, int, int], ...]  # (layer, FLOPs, input gate, output gate); -1: none
    dense_flops: float

    @property
    def groups(self) -> int:
        return len(self.layers[0].counts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicSpec:
        layers = tuple(
            GatedLayer(d["name"], int(d["channels"]), int(d["in_channels"]), tuple(d["counts"]),
                       tuple((name, tuple(chan)) for name, chan in d["consumers"]))
            for d in data["layers"]
        )
        costs = tuple((str(n), float(f), int(i), int(o)) for n, f, i, o in data["costs"])
        return cls(layers, costs, float(data["dense_flops"]))

    def density(self, actions: np.ndarray) -> np.ndarray:
        """FLOPs density (kept / dense FLOPs) for actions of shape ``[..., layers]``."""
        actions = np.asarray(actions, dtype=np.int64)
        frac = np.ones(actions.shape[:-1] + (len(self.layers) + 1,))
        for g, layer in enumerate(self.layers):
            frac[..., g] = np.asarray(layer.counts)[actions[..., g]] / layer.channels
        flops = np.array([c[1] for c in self.costs])
        ins = np.array([c[2] for c in self.costs])
        outs = np.array([c[3] for c in self.costs])
        return (frac[..., ins] * frac[..., outs]) @ flops / self.dense_flops


def gated_layers(graph: ChannelGraph, groups: int) -> list[GatedLayer]:
    """The gated layers of a model: each channel group with a single conv producer (no residual add
    ties it) whose consumers each read only this group, in channel-major order (so a prefix of
    channels is a prefix of every consumer's input), kept by ``groups`` equal channel groups."""
    modules = dict(graph.model.named_modules())
    layers = []
    for group in graph.groups:
        producer = modules[group.producers[0]]
        if len(group.producers) != 1 or not isinstance(producer, nn.Conv2d) or producer.groups != 1:
            continue
        consumers = []
        for c in group.consumers:
            layer = modules[c.name]
            if not isinstance(layer, nn.Conv2d | nn.Linear) or getattr(layer, "groups", 1) != 1:
                break
            order = torch.argsort(c.input_index)
            positions, channels = c.input_index[order], c.channel[order]
            width = in_channels(layer)
            if (len(positions) != width or not torch.equal(positions, torch.arange(width))
                    or bool((channels[1:] < channels[:-1]).any())):
                break
            consumers.append((c.name, tuple(int(ch) for ch in channels)))
        else:
            if consumers:
                layers.append(GatedLayer(group.name, group.num_channels, group.in_channels,
                                         tuple(group_counts(group.num_channels, groups)), tuple(consumers)))
    if not layers:
        raise ValueError(f"{type(graph.model).__name__} has no gateable conv layer (every channel group is tied "
                         "to a residual add, or read in an order a channel prefix cannot slice)")
    return layers


def dynamic_spec(graph: ChannelGraph, groups: int = 4) -> DynamicSpec:
    """The gated layers of ``graph``'s model and its FLOPs per layer, for ``DynamicNetwork``."""
    layers = gated_layers(graph, groups)
    gate_of = {graph.groups[i].name: i for i in range(len(graph.groups))}
    gate_index = {gate_of[layer.name]: g for g, layer in enumerate(layers)}
    costs = tuple(
        (c.name, float(c.flops), gate_index.get(c.in_group, -1), gate_index.get(c.out_group, -1))
        for c in graph.layers if c.flops > 0
    )
    return DynamicSpec(tuple(layers), costs, float(graph.dense_flops))
