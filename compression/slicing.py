"""A candidate's sub-network by slicing: the physically smaller model for a set of kept channels,
built by indexing the full model's parameters.

``prune_channels`` rebuilds a network through torch-pruning's dependency graph, which traces the
model on every call (tens of milliseconds for a ResNet-20): the way to ship one pruned model. A
search scores hundreds of candidates, and scoring one soft-masked (``SoftMask``) runs the network at
full width whatever the candidate keeps. ``ChannelSlicer`` reads from the channel graph, once, which
dimension of which parameter each group's channels sit in, and then builds any candidate's
sub-network with ``index_select`` alone: the network ``prune_channels`` builds, with the same
outputs, that runs at the candidate's width.

It slices the layers the model zoo is made of: convolutions with ``groups=1``, linear layers and
batch norms. ``unsliceable`` names the layers of another model that it cannot slice (a depthwise
convolution, a PReLU), for which ``prune_channels`` or the soft mask is the way.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .channels import ChannelGraph, _remove_soft_mask_hooks, in_channels

__all__ = ["ChannelSlicer", "unsliceable"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _own_tensors(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]


def unsliceable(model: nn.Module) -> list[str]:
    """The layers of ``model`` that hold parameters or buffers ``ChannelSlicer`` cannot slice: anything
    but a convolution with ``groups=1``, a linear layer or a batch norm. Empty when it can slice the model."""
    def sliceable(m: nn.Module) -> bool:
        return isinstance(m, (nn.Linear, *_NORMS)) or (isinstance(m, _CONVS) and m.groups == 1)

    return [f"{name} ({type(m).__name__}" + (f", groups={m.groups})" if isinstance(m, _CONVS) else ")")
            for name, m in model.named_modules() if _own_tensors(m) and not sliceable(m)]


class ChannelSlicer:
    """Builds the sub-network of ``model`` (whose channel graph is ``graph``) that keeps ``kept[g]``
    channels of each group g, from the model's parameters as they are at the call.

    The sub-network owns its tensors (training it leaves ``model`` as it was), is in ``model``'s
    training mode, and carries none of the soft-mask hooks ``model`` may have.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph):
        bad = unsliceable(model)
        if bad:
            raise ValueError(f"cannot slice the channels of {type(model).__name__}: {', '.join(bad)}; "
                             "prune_channels prunes any model the channel graph understands")
        self.model, self.graph = model, graph
        self._template = copy.deepcopy(model)  # the structure; every tensor is replaced at each call
        _remove_soft_mask_hooks(self._template)
        self._sources = dict(model.named_modules())
        self._layers = [name for name, m in self._template.named_modules() if _own_tensors(m)]
        self._producers = {name: g for g in graph.groups for name in (*g.producers, *g.norms)}
        self._consumers = {}  # layer name -> [(group, its input positions, the group channel at each)]
        for g in graph.groups:
            for c in g.consumers:
                self._consumers.setdefault(c.name, []).append((g.index, c.input_index, c.channel))

    def _input_positions(self, name: str, kept: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The input positions of consumer ``name`` that read kept channels (or no group's)."""
        if name not in self._consumers:
            return None
        keep = torch.ones(in_channels(self._sources[name]), dtype=torch.bool)
        for group, positions, channels in self._consumers[name]:
            dropped = torch.ones(self.graph.groups[group].num_channels, dtype=torch.bool)
            dropped[kept[group]] = False
            keep[positions[dropped[channels]]] = False
        return keep.nonzero().flatten()

    def _check(self, kept: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(kept) != len(self.graph.groups):
            raise ValueError(f"need kept channels for {len(self.graph.groups)} groups, got {len(kept)}")
        kept = [torch.as_tensor(k, dtype=torch.long).sort().values for k in kept]
        for group, k in zip(self.graph.groups, kept, strict=True):
            if len(k) == 0:
                raise ValueError(f"cannot prune every channel of group {group.name!r}")
        return kept

    def _slices(self, kept: list[torch.Tensor]) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
        """(layer, attribute, the model's tensor, its slice) for every tensor of every layer; a slice
        of a parameter keeps its autograd history (gradients reach the model), an unsliced tensor
        is the model's own."""
        for name in self._layers:
            source = self._sources[name]
            group = self._producers.get(name)
            device = _device(source)
            out_idx = None if group is None else kept[group.index].to(device)
            in_idx = self._input_positions(name, kept)
            in_idx = None if in_idx is None else in_idx.to(device)
            for attr, tensor in (*source._parameters.items(), *source._buffers.items()):
                if tensor is None:
                    continue
                value = tensor
                if out_idx is not None and value.dim() > 0:
                    value = value.index_select(0, out_idx)
                if in_idx is not None and value.dim() > 1:
                    value = value.index_select(1, in_idx)
                yield name, attr, tensor, value

    @torch.no_grad()
    def __call__(self, kept: Sequence[torch.Tensor]) -> nn.Module:
        sub = _shell(self._template)
        targets = dict(sub.named_modules())
        for name, attr, tensor, value in self._slices(self._check(kept)):
            target = targets[name]
            value = value.clone() if value is tensor else value  # a slice is a new tensor already
            if attr in target._parameters:
                target._parameters[attr] = nn.Parameter(value, tensor.requires_grad)
            else:
                target._buffers[attr] = value
        for name in self._layers:
            _set_widths(targets[name])
        sub.train(self.model.training)
        return sub

    def forward(self, kept: Sequence[torch.Tensor], *args: Any) -> Any:
        """The candidate's sub-network applied to ``args``, differentiable with respect to the model's
        parameters: how a supernet trains its widths at each width's cost. In training mode its
        batch norms use the batch's statistics and leave the model's running statistics as they are."""
        tensors = {}
        for name, attr, _, value in self._slices(self._check(kept)):
            if attr not in self._sources[name]._parameters:
                value = value.detach().clone()  # running statistics: the call's own
            tensors[f"{name}.{attr}" if name else attr] = value
        self._template.train(self.model.training)
        return functional_call(self._template, tensors, args)


def _device(module: nn.Module) -> torch.device:
    return next(t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None).device


def _shell(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its tensors, with dictionaries of its own (the
    parameters, buffers, submodules and hooks), so that replacing a tensor of the copy leaves
    ``module`` as it was; much cheaper than a deep copy, whose tensors the caller replaces anyway."""
    new = module.__class__.__new__(module.__class__)
    state = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    state["_modules"] = type(module._modules)((k, None if m is None else _shell(m)) for k, m in module._modules.items())
    new.__dict__.update(state)
    return new


def _set_widths(module: nn.Module) -> None:
    """A sliced layer's width attributes, read from its new weight."""
    if isinstance(module, _CONVS):
        module.out_channels, module.in_channels = int(module.weight.shape[0]), int(module.weight.shape[1])
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(module.weight.shape[0]), int(module.weight.shape[1])
    elif isinstance(module, _NORMS):
        module.num_features = int(module.running_mean.shape[0]) if module.running_mean is not None \
            else int(module.weight.shape[0])
