"""A per-input network as a TorchScript program, to run where prunegym is not installed.

``script_dynamic(net)`` turns an eval-mode ``DynamicNetwork`` whose decider is a trained policy or
the gate baseline into a ``torch.jit.ScriptModule`` that ``torch.jit.load`` runs alone (C++ and
mobile load the same file). For each input it runs the network's layers in order; at each gated
layer the decider's MLP reads the features entering it (the same folded matrices the Python model
decides with at batch 1, ``PooledMLP``) and its action picks the weight slice of every conv that
produces or reads that layer's channels: slices cut ahead of time, as in the Python model.

``forward(x)`` returns ``(logits [B, classes], actions [B, gated layers] (int64), density [B]
(float64))``. A batch runs one input at a time, each with its own decisions, so the outputs are
those of running each input alone.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .deciders import FoldedDecider, PooledMLP
from .dynamic import DynamicNetwork
from .dynamic_layer import DynamicLayer

__all__ = ["script_dynamic"]

_STEP_CODES = {"matrix": 0, "tanh": 1, "relu": 2}  # the later steps of a decision MLP, as the program runs them


class _SlicedLayer(nn.Module):
    """A conv or linear layer with one weight slice per (output action, input action)."""

    def __init__(self, layer: DynamicLayer):
        super().__init__()
        keys = sorted(layer.keys())  # every (output action, input action) pair: ``DynamicLayer.refresh``
        self.inputs = layer.in_actions
        # the slices as cut: those that keep every input are views of one weight, saved once
        self.weights = [layer._slices[k][0].detach() for k in keys]
        self.biases = [torch.zeros(w.shape[0]) if layer._slices[k][1] is None else layer._slices[k][1].detach()
                       for k, w in zip(keys, self.weights, strict=True)]
        self.conv = layer.conv
        inner = layer.layer
        self.stride = list(inner.stride) if self.conv else [1]
        self.padding = list(inner.padding) if self.conv else [0]
        self.dilation = list(inner.dilation) if self.conv else [1]
        self.groups = inner.groups if self.conv else 1

    def forward(self, x: torch.Tensor, a_out: int, a_in: int) -> torch.Tensor:
        i = a_out * self.inputs + a_in
        if self.conv:
            return F.conv2d(x, self.weights[i], self.biases[i], self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, self.weights[i], self.biases[i])


class _Decider(nn.Module):
    """Every gated layer's decision MLP for each width of the features entering it (a gated layer
    fed by another sees as many channels as that one kept): ``PooledMLP``'s matrices, run with its
    arithmetic (clipped per-channel sums, the density spent if it reads it, and a 1; then each
    matrix with its bias as the last row). ``argmax``: a policy's action; otherwise the gate
    baseline's, the number of leading outputs above 0."""

    def __init__(self, mlps: list[list[PooledMLP]], argmax: bool):
        super().__init__()
        first = mlps[0][0]
        if first.extras > 1 or any(kind not in _STEP_CODES for kind in first.kinds):
            raise ValueError(f"cannot script a decision MLP of steps {first.kinds} with {first.extras} extras")
        self.variants = max(len(row) for row in mlps)
        self.reads_spent = first.extras == 1
        self.argmax = argmax
        self.kinds = [_STEP_CODES[kind] for kind in first.kinds[1:]]
        self.firsts = []
        self.lows = []
        self.highs = []
        self.later = []
        for row in mlps:
            for v in range(self.variants):
                mlp = row[min(v, len(row) - 1)]
                if mlp.kinds != first.kinds or mlp.extras != first.extras:
                    raise ValueError("the gated layers' decision MLPs differ in their steps")
                steps = [torch.empty(0) if matrix is None else torch.from_numpy(matrix.copy())
                         for matrix, _ in mlp.steps]
                self.firsts.append(steps[0])
                self.later.extend(steps[1:])
                c = mlp.channels
                low, high = mlp.bounds if mlp.bounds is not None else (None, None)
                self.lows.append(torch.full((c,), -torch.inf) if low is None else torch.from_numpy(low[:c].copy()))
                self.highs.append(torch.full((c,), torch.inf) if high is None else torch.from_numpy(high[:c].copy()))
        self.one = torch.ones(1)

    def forward(self, gate: int, a_in: int, features: torch.Tensor, spent: float) -> int:
        i = gate * self.variants + a_in
        x = torch.clamp(torch.sum(features, [0, 2, 3]), self.lows[i], self.highs[i])
        if self.reads_spent:
            x = torch.cat([x, torch.full([1], spent, dtype=x.dtype), self.one])
        else:
            x = torch.cat([x, self.one])
        x = torch.matmul(x, self.firsts[i])
        steps = len(self.kinds)
        for j in range(steps):
            kind = self.kinds[j]
            if kind == 0:
                x = torch.matmul(torch.cat([x, self.one]), self.later[i * steps + j])
            elif kind == 1:
                x = torch.tanh(x)
            else:
                x = torch.relu(x)
        if self.argmax:
            return int(torch.argmax(x))
        return int(torch.cumprod((x > 0).to(torch.int64), 0).sum())


class _PerInput(nn.Module):
    """Runs a batch one input at a time through the single-input program."""

    def __init__(self, single: torch.jit.ScriptModule):
        super().__init__()
        self.single = single

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits: list[torch.Tensor] = []
        actions: list[list[int]] = []
        density: list[float] = []
        for i in range(x.shape[0]):
            out, kept, spent = self.single(x[i:i + 1])
            logits.append(out)
            actions.append(kept)
            density.append(spent)
        if len(logits) == 0:
            raise ValueError("an empty batch")
        return torch.cat(logits), torch.tensor(actions, dtype=torch.long), torch.tensor(density, dtype=torch.float64)


def _decision_mlps(net: DynamicNetwork, example: torch.Tensor) -> list[list[PooledMLP]]:
    """Per gated layer, the decider's ``PooledMLP`` for each width of the features entering it."""
    decider = net.decider
    spatial: dict[int, tuple[int, ...]] = {}
    walk = net.steps(example[:1])
    try:
        gate, features, _ = next(walk)
        while True:
            spatial[gate] = tuple(features.shape[2:])
            gate, features, _ = walk.send(len(net.spec.layers[gate].counts) - 1)
    except StopIteration:
        pass
    layers = {layer.gate_out: layer for layer in net._dynamic_layers().values() if layer.gate_out >= 0}
    mlps = []
    for g in range(len(net.spec.layers)):
        layer = layers[g]
        if layer.gate_in >= 0:
            widths = [int((layer.in_channel_of < k).sum()) for k in net.spec.layers[layer.gate_in].counts]
        else:
            widths = [layer.layer.weight.shape[1]]
        row = [decider._pooled_mlp(g, torch.Size((1, c, *spatial[g]))) for c in widths]
        if any(mlp is None for mlp in row):
            raise ValueError(f"the decider {type(decider).__name__} cannot be scripted: its actor has an activation "
                             f"other than {sorted(k for k in _STEP_CODES if k != 'matrix')}")
        mlps.append(row)
    return mlps


def _program(net: DynamicNetwork, decider: _Decider) -> torch.fx.GraphModule:
    """The single-input program: the network's graph with each conv or linear a ``_SlicedLayer`` call
    at the actions of its gated layers, each decision a ``_Decider`` call fed the FLOPs density
    spent before it (computed as ``DynamicNetwork`` computes it), returning (logits, actions, density)."""
    root = nn.Module()
    root.decider = decider
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    actions: dict[int, torch.fx.Node] = {}
    fractions: dict[int, torch.fx.Node] = {}
    terms = net._terms
    state = {"next": 0, "spent": 0.0}

    def spend_until(gate: int) -> None:
        while state["next"] < len(terms) and terms[state["next"]][0] < gate:
            _, value, g_in, g_out = terms[state["next"]]
            for g in (g_in, g_out):  # the Python model's products in its order (times 1.0 is exact: skipped)
                if g >= 0:
                    value = graph.call_function(operator.mul, (value, fractions[g]))
            state["spent"] = graph.call_function(operator.add, (state["spent"], value))
            state["next"] += 1

    def attach(target: str, module: nn.Module) -> str:
        name = target.replace(".", "_")
        if not hasattr(root, name):
            root.add_module(name, module)
        return name

    output = None
    for node in net.net.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "output":
            output = env[node.args[0]]
        elif node.op == "call_module" and isinstance(net._called.get(node.target), DynamicLayer):
            layer = net._called[node.target]
            x = env[node.args[0]]
            a_in = actions[layer.gate_in] if layer.gate_in >= 0 else 0
            if layer.gate_out >= 0:
                g = layer.gate_out
                spend_until(g)
                actions[g] = graph.call_module("decider", (g, a_in, x, state["spent"]))
                spec_layer = net.spec.layers[g]
                fractions[g] = graph.call_function(
                    operator.getitem, ([count / spec_layer.channels for count in spec_layer.counts], actions[g]))
            a_out = actions[layer.gate_out] if layer.gate_out >= 0 else 0
            env[node] = graph.call_module(attach(node.target, _SlicedLayer(layer)), (x, a_out, a_in))
        elif node.op == "call_module":
            name = attach(node.target, copy.deepcopy(net._called[node.target]))
            env[node] = graph.call_module(name, torch.fx.node.map_arg(node.args, env.__getitem__),
                                          torch.fx.node.map_arg(node.kwargs, env.__getitem__))
        elif node.op == "get_attr":
            name = attach(node.target, copy.deepcopy(operator.attrgetter(node.target)(net.net)))
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    spend_until(len(net.spec.layers) + 1)
    graph.output((output, [actions[g] for g in range(len(net.spec.layers))], state["spent"]))
    return torch.fx.GraphModule(root, graph)


def script_dynamic(net: DynamicNetwork, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``net`` (eval mode, BN folded, a policy or gate decider) as a TorchScript program; see the
    module's docstring. ``example`` is an input of the network's shape (its batch size does not
    matter); it fixes the spatial size the decision MLPs' pooling is folded for. The program holds
    ``net``'s weight slices, sharing memory with those that are views of a weight: script again
    after changing ``net``'s weights."""
    if not isinstance(net, DynamicNetwork):
        raise ValueError(f"script_dynamic needs a DynamicNetwork, got {type(net).__name__}")
    if net.training:
        raise ValueError("script_dynamic needs the network in eval mode (its weights as sliced for inference)")
    if not isinstance(net.decider, FoldedDecider):
        raise ValueError(f"only a policy or gate decider can be scripted; this network's decider is "
                         f"{type(net.decider).__name__}")
    with torch.no_grad():
        decider = _Decider(_decision_mlps(net, example), argmax=net.decider.decision == "argmax")
        program = _program(net, decider)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is marked deprecated; C++ still loads it
        # raised on torch.fx.GraphModule's own __init__, which scripting reads: nothing of ours
        warnings.filterwarnings("ignore", "The TorchScript type system doesn't support instance-level annotations")
        return torch.jit.script(_PerInput(torch.jit.script(program)))
