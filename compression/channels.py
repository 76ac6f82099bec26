"""Channel machinery: prunable channel groups, soft masks, hard pruning.

Channel groups come from torch-pruning's dependency graph, which traces the network and couples
every layer that must lose the same channels (the convs and BNs feeding one residual add, the
consumers reading them). A group is pruned as a unit; which of its channels go is the importance
criterion's choice (``prunegym.compression.importance``).

Soft masks multiply the *inputs of a group's consumers* by a 0/1 vector. A zeroed input channel
contributes nothing to any consumer, and the group's channels reach nothing else, so the soft-masked
network computes exactly what the physically pruned one computes (``prune_channels``): the soft mask
is the fast way to evaluate a pruning decision, the hard prune the way to ship it.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .importance import Importance
from .metrics import count_layer_flops

__all__ = [
    "ChannelGroup",
    "ChannelGraph",
    "nearest_count",
    "in_channels",
    "out_channels",
    "SoftMask",
    "prune_channels",
    "reorder_channels",
    "recalibrate_bn",
    "bn_state",
    "load_bn_state",
]

_PARAM_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a group's channels: ``input_index[j]`` of its input is channel ``channel[j]``."""

    name: str
    input_index: torch.Tensor
    channel: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together, e.g. every output feeding one residual add."""

    index: int
    name: str  # the first producer in module order; the group's "layer" for the environment
    num_channels: int
    producers: tuple[str, ...]  # conv/linear layers whose output channels are this group
    norms: tuple[str, ...]  # batch norms over this group's channels
    consumers: tuple[Consumer, ...]
    in_channels: int  # of the first producer
    kernel_size: int
    stride: int


@dataclass(frozen=True)
class LayerCost:
    """A conv/linear/BN layer's share of FLOPs and parameters and the groups that scale it."""

    name: str
    flops: int
    weight: int  # parameters that scale with in x out channels
    per_out: int  # parameters that scale with out channels only (bias, BN affine)
    in_group: int | None
    out_group: int | None


def _dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    # torch-pruning traces with autograd and leaves the model in eval mode: allow the first,
    # undo the second.
    was_training = model.training
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    model.train(was_training)
    return graph


def _kernel_stride(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
        return int(module.kernel_size[0]), int(module.stride[0])
    return 1, 1


def in_channels(module: nn.Module) -> int:
    """The input channels of a conv, or the input features of a linear layer."""
    return int(module.in_channels if hasattr(module, "in_channels") else module.in_features)


def out_channels(module: nn.Module) -> int:
    """The output channels of a conv, or the output features of a linear layer."""
    return int(module.out_channels if hasattr(module, "out_channels") else module.out_features)


def nearest_count(allowed: np.ndarray, target: float) -> int:
    """The allowed channel count nearest ``target``; a tie goes to the larger, as rounding half up would."""
    return int(allowed[np.argmin(np.abs(allowed - target) - 1e-9 * allowed)])


class ChannelGraph:
    """The prunable channel groups of a model, with an exact cost model for any keep counts.

    ``ignored`` names layers whose output channels must not be pruned; the classifier (the last
    linear layer) is always ignored, since its outputs are the classes.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored: Iterable[str] = ()):
        self.model = model
        self.example_input = example_input
        names = {m: n for n, m in model.named_modules()}
        order = {n: i for i, n in enumerate(names.values())}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        ignored_modules = [dict(model.named_modules())[n] for n in ignored]
        if linears:
            ignored_modules.append(linears[-1])
        graph = _dependency_graph(model, example_input)

        groups = []
        for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=_PARAM_LAYERS):
            producers, norms, consumers = [], [], []
            for item in group:
                module, handler = item.dep.target.module, item.dep.handler
                if module not in names:
                    continue  # functional nodes (add, relu, flatten) own no parameters
                is_out = graph.is_out_channel_pruning_fn(handler)
                is_in = graph.is_in_channel_pruning_fn(handler)
                if isinstance(module, _NORM_LAYERS):
                    norms.append(names[module])
                elif isinstance(module, _PARAM_LAYERS) and is_out and not is_in:
                    producers.append(names[module])
                elif isinstance(module, _PARAM_LAYERS) and is_in:
                    consumers.append(
                        Consumer(
                            names[module],
                            torch.as_tensor(item.idxs, dtype=torch.long),
                            torch.as_tensor(item.root_idxs, dtype=torch.long),
                        )
                    )
            if not producers:
                continue
            producers.sort(key=order.__getitem__)
            groups.append((producers, norms, consumers, len(group[0].idxs)))
        groups.sort(key=lambda g: order[g[0][0]])

        modules = dict(model.named_modules())
        self.groups: list[ChannelGroup] = []
        for index, (producers, norms, consumers, num_channels) in enumerate(groups):
            root = modules[producers[0]]
            kernel, stride = _kernel_stride(root)
            self.groups.append(
                ChannelGroup(
                    index=index,
                    name=producers[0],
                    num_channels=num_channels,
                    producers=tuple(producers),
                    norms=tuple(sorted(set(norms), key=order.__getitem__)),
                    consumers=tuple(sorted(consumers, key=lambda c: order[c.name])),
                    in_channels=in_channels(root),
                    kernel_size=kernel,
                    stride=stride,
                )
            )
        if not self.groups:
            raise ValueError(f"{type(model).__name__} has no prunable channel groups")
        self.num_channels = np.array([g.num_channels for g in self.groups], dtype=np.int64)
        self.layers = self._layer_costs(modules, example_input)
        self.dense_flops = int(sum(layer.flops for layer in self.layers))
        self.dense_params = int(sum(p.numel() for p in model.parameters()))
        self._cost_tables()

    def _layer_costs(self, modules: dict[str, nn.Module], example_input: torch.Tensor) -> list[LayerCost]:
        out_group: dict[str, int] = {}
        in_group: dict[str, int] = {}
        for g in self.groups:
            for name in g.producers + g.norms:
                out_group[name] = g.index
            for c in g.consumers:
                in_group[c.name] = g.index
        flops = count_layer_flops(self.model, example_input)
        layers = []
        for name, m in modules.items():
            if isinstance(m, _NORM_LAYERS):
                per_out = sum(p.numel() for p in m.parameters(recurse=False))
                layers.append(LayerCost(name, 0, 0, per_out, None, out_group.get(name)))
            elif isinstance(m, _PARAM_LAYERS):
                bias = m.bias.numel() if m.bias is not None else 0
                layers.append(
                    LayerCost(name, flops.get(name, 0), m.weight.numel(), bias, in_group.get(name), out_group.get(name))
                )
        return layers

    # ---- cost model ------------------------------------------------------------------------------
    def _cost_tables(self) -> None:
        # Column G of the padded fraction matrix is all ones: "scaled by no group".
        n = len(self.groups)
        none = lambda g: n if g is None else g  # noqa: E731
        self._flops = np.array([layer.flops for layer in self.layers], dtype=np.float64)
        self._weight = np.array([layer.weight for layer in self.layers], dtype=np.float64)
        self._per_out = np.array([layer.per_out for layer in self.layers], dtype=np.float64)
        self._out = np.array([none(layer.out_group) for layer in self.layers], dtype=np.int64)
        # A layer whose input and output are the same group (depthwise) scales once, not twice.
        self._in = np.array([n if layer.in_group == layer.out_group else none(layer.in_group)
                             for layer in self.layers], dtype=np.int64)
        self._fixed_params = float(self.dense_params - self._weight.sum() - self._per_out.sum())

    def _fractions(self, keep_counts: Sequence[int] | np.ndarray) -> np.ndarray:
        counts = np.asarray(keep_counts, dtype=np.float64)
        if counts.shape[-1:] != (len(self.groups),):
            raise ValueError(f"need one keep count per group ({len(self.groups)}), got shape {counts.shape}")
        frac = counts / self.num_channels
        return np.concatenate([frac, np.ones(frac.shape[:-1] + (1,))], axis=-1)

    def flops(self, keep_counts: Sequence[int] | np.ndarray) -> float | np.ndarray:
        """FLOPs of the model pruned to ``keep_counts`` channels per group, exactly as FlopCounterMode
        counts them. A 2-D array of keep counts (one row per candidate) gives one value per row."""
        frac = self._fractions(keep_counts)
        return (frac[..., self._in] * frac[..., self._out]) @ self._flops

    def params(self, keep_counts: Sequence[int] | np.ndarray) -> float | np.ndarray:
        """Parameters of the model pruned to ``keep_counts`` (conv, linear and BN layers scale)."""
        frac = self._fractions(keep_counts)
        f_out = frac[..., self._out]
        return self._fixed_params + (frac[..., self._in] * f_out) @ self._weight + f_out @ self._per_out

    def allowed_counts(self, group: int, multiple: int = 1, min_channels: int = 1) -> np.ndarray:
        """The channel counts group ``group`` may keep, ascending: multiples of ``multiple`` of at least
        ``min_channels``, and always all of its channels.

        Vector units compute channels in blocks (16 fp32 lanes with AVX-512, 8 with AVX2), and CPU
        convolution kernels pad a thin layer up to a whole block; counts at multiples of the block
        waste none of it.
        """
        if not isinstance(multiple, int | np.integer) or multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
        channels = int(self.num_channels[group])
        counts = np.arange(multiple, channels + 1, multiple)
        counts = counts[counts >= min_channels]
        return np.unique(np.append(counts, channels)).astype(np.int64)

    def keep_counts(self, keep_ratios: Sequence[float] | np.ndarray, min_channels: int = 1,
                    multiple: int = 1) -> np.ndarray:
        """Channels kept per group for the given keep ratios: the nearest allowed count
        (``allowed_counts``), at least ``min_channels``."""
        ratios = np.asarray(keep_ratios, dtype=np.float64)
        if ratios.shape != (len(self.groups),) or not np.all((ratios >= 0) & (ratios <= 1)):
            raise ValueError(f"need {len(self.groups)} keep ratios in [0, 1], got {ratios.tolist()}")
        return np.array([nearest_count(self.allowed_counts(g, multiple, min_channels), r * self.num_channels[g])
                         for g, r in enumerate(ratios)], dtype=np.int64)

    def rankings(self, importance: Importance, model: nn.Module | None = None) -> list[torch.Tensor]:
        """Each group's channel indices, most important first (scored on ``model``, default the graph's)."""
        model = self.model if model is None else model
        return [torch.argsort(importance(model, g), descending=True, stable=True) for g in self.groups]

    def kept_channels(self, importance: Importance | Sequence[torch.Tensor],
                      keep_counts: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
        """The indices of the ``keep_counts`` most important channels of each group, ascending.

        ``importance`` is a criterion, or the ``rankings`` it gave (to rank once and prune often).
        """
        rankings = self.rankings(importance) if isinstance(importance, Importance) else importance
        kept = []
        for group, ranking, k in zip(self.groups, rankings, keep_counts, strict=True):
            if not 1 <= int(k) <= group.num_channels:
                raise ValueError(f"group {group.name!r} has {group.num_channels} channels, cannot keep {k}")
            kept.append(torch.sort(ranking[: int(k)]).values)
        return kept


# ---- soft masks ---------------------------------------------------------------------------------
class _MaskHook:
    """The forward pre-hook ``SoftMask`` puts on each consumer: an object, not a closure, so that a
    model carrying it can be deep-copied (the copy gets its own mask) and pickled."""

    prunegym_soft_mask = True  # how ``_remove_soft_mask_hooks`` knows it

    def __init__(self, owner: SoftMask, name: str):
        self.owner, self.name = owner, name

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]):
        if not self.owner.active:
            return None
        x = args[0]
        mask = self.owner._masks[self.name].to(x.device, x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * mask.view(shape),) + args[1:]


class SoftMask:
    """Zeroes the inputs that a group's consumers read from its pruned channels (forward pre-hooks).

    Attach once, then call ``set`` with new keep indices as often as needed; ``remove`` detaches.
    A deep copy of the model (or of an object holding the model and its mask, such as an env)
    carries a copy of the mask that masks the copy alike.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph):
        self.graph = graph
        self._modules = dict(model.named_modules())
        self._masks: dict[str, torch.Tensor] = {}
        for group in graph.groups:
            for consumer in group.consumers:
                if consumer.name not in self._masks:
                    module = self._modules[consumer.name]
                    self._masks[consumer.name] = torch.ones(in_channels(module))
                    module.register_forward_pre_hook(_MaskHook(self, consumer.name))
        self.active = False

    def __deepcopy__(self, memo: dict[int, Any]) -> SoftMask:
        new = SoftMask.__new__(SoftMask)
        memo[id(self)] = new
        new.graph = self.graph  # only its names and channel indices are used: the copy's are the same
        new._modules = copy.deepcopy(self._modules, memo)  # the copied model's modules, via the memo
        new._masks = {name: mask.clone() for name, mask in self._masks.items()}
        new.active = self.active
        return new

    def set(self, kept: Sequence[torch.Tensor] | None) -> None:
        """Keep only ``kept[g]`` channels of each group g; ``None`` turns masking off."""
        if kept is None:
            self.active = False
            return
        if len(kept) != len(self.graph.groups):
            raise ValueError(f"need kept channels for {len(self.graph.groups)} groups, got {len(kept)}")
        # New tensors, not writes into the old: a training step may still hold the old ones for backward.
        self._masks = {name: torch.ones_like(mask) for name, mask in self._masks.items()}
        for group, idx in zip(self.graph.groups, kept, strict=True):
            channel_mask = torch.zeros(group.num_channels)
            channel_mask[idx] = 1.0
            for consumer in group.consumers:
                self._masks[consumer.name][consumer.input_index] = channel_mask[consumer.channel]
        self.active = True

    def remove(self) -> None:
        for module in self._modules.values():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, _MaskHook) and hook.owner is self:
                    del module._forward_pre_hooks[key]
        self.active = False


# ---- batch-norm recalibration ------------------------------------------------------------------
def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every batch norm's running statistics."""
    return {
        k: v.clone()
        for name, m in model.named_modules()
        if isinstance(m, _NORM_LAYERS)
        for k, v in ((f"{name}.{b}", buf) for b, buf in m.named_buffers(recurse=False))
    }


def load_bn_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    for key, value in state.items():
        buffers[key].copy_(value)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate batch-norm statistics from scratch on ``batches`` (a cumulative average).

    Pruning shifts the distributions each BN sees; a few train batches put its statistics right.
    With no batches the statistics stay as they are.
    """
    batches = list(batches)
    norms = [m for m in model.modules() if isinstance(m, _NORM_LAYERS)]
    if not norms or not batches:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def _remove_soft_mask_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "prunegym_soft_mask", False):
                del module._forward_pre_hooks[key]


# ---- hard pruning -------------------------------------------------------------------------------
def prune_channels(model: nn.Module, graph: ChannelGraph, kept: Sequence[torch.Tensor]) -> nn.Module:
    """A physically smaller copy of ``model`` that keeps only ``kept[g]`` channels of each group g.

    Its outputs equal those of ``model`` soft-masked with the same ``kept`` (``SoftMask``).
    """
    if len(kept) != len(graph.groups):
        raise ValueError(f"need kept channels for {len(graph.groups)} groups, got {len(kept)}")
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval()
    example = graph.example_input
    _remove_soft_mask_hooks(pruned)
    dg = _dependency_graph(pruned, example)
    modules = dict(pruned.named_modules())
    for group, idx in zip(graph.groups, kept, strict=True):
        drop = sorted(set(range(group.num_channels)) - set(int(i) for i in idx))
        if not drop:
            continue
        if len(drop) == group.num_channels:
            raise ValueError(f"cannot prune every channel of group {group.name!r}")
        root = modules[group.name]
        handler = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        dg.get_pruning_group(root, handler, drop).prune(record_history=False)
    pruned.train(was_training)
    return pruned


# ---- reordering -------------------------------------------------------------------------------
def _consumer_permutation(consumer: Consumer, order: torch.Tensor, width: int) -> torch.Tensor:
    """Input positions ``q`` such that ``new_input[p] == old_input[q[p]]`` once channel ``i`` of the
    group carries what channel ``order[i]`` carried before (flatten layouts included)."""
    source = torch.arange(width)
    by_channel: dict[int, list[int]] = {}
    for position, channel in sorted(zip(consumer.input_index.tolist(), consumer.channel.tolist(), strict=True)):
        by_channel.setdefault(channel, []).append(position)
    for new_channel, old_channel in enumerate(order.tolist()):
        for p, q in zip(by_channel.get(new_channel, []), by_channel.get(old_channel, []), strict=True):
            source[p] = q
    return source


@torch.no_grad()
def reorder_channels(model: nn.Module, graph: ChannelGraph, importance: Importance,
                     only: Collection[str] | None = None) -> nn.Module:
    """A copy of ``model`` whose every group (or each group named in ``only``) lists its channels in
    descending importance.

    The function is unchanged (producers, batch norms and consumers are permuted together), and
    keeping the k most important channels of a group becomes keeping its first k: a prefix slice.
    """
    reordered = copy.deepcopy(model)
    _remove_soft_mask_hooks(reordered)
    modules = dict(reordered.named_modules())
    chosen = [g for g in graph.groups if only is None or g.name in only]
    grouped = [(c.name, modules[c.name].groups) for g in chosen for c in g.consumers
               if getattr(modules[c.name], "groups", 1) != 1]
    if grouped:  # a grouped conv's input channels are tied to its output channels: one order for both
        raise ValueError(f"reordering channels does not support grouped or depthwise convs; {grouped[0][0]!r} "
                         f"has groups={grouped[0][1]}")
    for group, order in zip(graph.groups, graph.rankings(importance, model), strict=True):
        if group not in chosen:
            continue
        for name in group.producers:
            layer = modules[name]
            layer.weight.copy_(layer.weight[order])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[order])
        for name in group.norms:
            norm = modules[name]
            for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                if tensor is not None:
                    tensor.copy_(tensor[order])
        for consumer in group.consumers:
            layer = modules[consumer.name]
            source = _consumer_permutation(consumer, order, layer.weight.shape[1])
            layer.weight.copy_(layer.weight[:, source])
    return reordered
