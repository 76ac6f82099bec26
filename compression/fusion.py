"""Folding batch norm into the convolution before it: the inference form of a trained network.

In eval mode a BN after a conv is an affine map per channel, so it folds into the conv's weights
and bias exactly. That removes one memory-bound pass over every activation, which matters most
for pruned networks: their convs shrink with the square of the keep ratio, BN only linearly.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["conv_bn_pairs", "fold_batchnorm", "inference_form"]


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN reads only that conv's output and nothing else reads it."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types on code it cannot trace
        raise ValueError(f"cannot trace {type(model).__name__} to find conv-BN pairs ({err})") from err
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BN that directly follows a conv folded into it
    and replaced by ``nn.Identity``. Outputs equal the original's in eval mode."""
    pairs = conv_bn_pairs(model) if pairs is None else pairs
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else folded, attr, nn.Identity())
    return folded


def inference_form(model: nn.Module) -> tuple[nn.Module, str]:
    """The model as it is deployed (on the CPU, eval mode, BN folded) and a note saying whether BN
    was folded: a model that torch.fx cannot trace keeps its BNs, and the note says why."""
    model = model.cpu().eval()
    try:
        return fold_batchnorm(model), "BN folded into convs"
    except ValueError as err:
        return model, f"BN not folded: {err}"
