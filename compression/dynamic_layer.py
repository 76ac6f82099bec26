"""One conv or linear layer of a per-input network (``prunegym.compression.dynamic``), computed at
the widths its gated layers keep: contiguous weight slices cut once per (kept outputs, kept inputs)
pair, the batch-1 kernel chosen per slice (ATen, NNPACK, oneDNN). A mixed batch (inputs that chose
differently) is computed in groups of inputs that chose alike, each group at its own widths; the
channels an input did not keep are zeros in the layer's output. In mask mode (training) every
channel is computed and those an input did not keep are zeroed where they are read."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DENSE_KEY", "DynamicLayer", "compute_layer"]

DENSE_KEY = (0, 0)  # the slice key of a layer no gate touches


class DynamicLayer(nn.Module):
    """A conv or linear layer of a ``DynamicNetwork``: produces a gated layer's channels
    (``gate_out``), reads one's (``gate_in``), both, or neither (it then only takes part in kernel
    tuning, so a dense reference runs the same kernels)."""

    def __init__(self, layer: nn.Module, gate_out: int, gate_in: int, in_channel_of: torch.Tensor | None,
                 net: Any):
        super().__init__()
        self.layer = layer
        self.gate_out, self.gate_in = gate_out, gate_in
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ValueError(f"dynamic execution needs numeric zero padding; a conv has padding={layer.padding!r}, "
                             f"padding_mode={layer.padding_mode!r}")
        if in_channel_of is not None:
            self.register_buffer("in_channel_of", in_channel_of, persistent=False)
        self._net = [net]  # a list, so the network is not registered as a submodule of itself
        self._slices: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.in_actions = 1  # how many input actions the slices are cut for (``refresh``)
        self.kernel: dict[tuple[int, int], str] = {}  # batch-1 kernel per slice when not ATen's (``tune``)
        self._channels_last: dict[tuple[int, int], torch.Tensor] = {}  # weights for the oneDNN kernel
        self.input_shape: tuple[int, ...] | None = None  # of a dense forward, recorded by ``tune``
        self._op = F.conv2d if self.conv else F.linear
        self._args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.conv else ()

    def keys(self) -> list[tuple[int, int]]:
        return list(self._slices)

    def refresh(self) -> None:
        """Cut the contiguous weight slices for every (kept outputs, kept inputs) pair."""
        spec = self._net[0].spec
        outs = spec.layers[self.gate_out].counts if self.gate_out >= 0 else (self.layer.weight.shape[0],)
        if self.gate_in >= 0:
            channel_of = self.in_channel_of
            ins = tuple(int((channel_of < k).sum()) for k in spec.layers[self.gate_in].counts)
        else:
            ins = (self.layer.weight.shape[1],)
        weight, bias = self.layer.weight.detach(), self.layer.bias
        self.in_actions = len(ins)
        self._slices = {
            (a_out, a_in): (weight[:k_out, :k_in].contiguous(),
                            None if bias is None else bias.detach()[:k_out].contiguous())
            for a_out, k_out in enumerate(outs) for a_in, k_in in enumerate(ins)
        }
        self._channels_last = {key: w.contiguous(memory_format=torch.channels_last)
                               for key, w in ((k, v[0]) for k, v in self._slices.items()) if w.dim() == 4}

    def kernels(self) -> tuple[str, ...]:
        """The batch-1 kernels this layer can run: ATen's default, and for plain 2-D convs NNPACK
        (where this torch has it) and oneDNN on channels-last tensors."""
        layer = self.layer
        if not self.conv or layer.groups != 1:
            return ("aten",)
        extra = ("nnpack",) if tuple(layer.dilation) == (1, 1) and torch._nnpack_available() else ()
        return ("aten", *extra, "onednn")

    def compute(self, x: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        weight, bias = self._slices[key]
        kernel = self.kernel.get(key) if self.kernel and x.shape[0] == 1 else None
        if kernel == "onednn":
            layer = self.layer
            return torch.mkldnn_convolution(x.contiguous(memory_format=torch.channels_last), self._channels_last[key],
                                            bias, layer.padding, layer.stride, layer.dilation, 1)
        if kernel == "nnpack":
            return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, self.layer.padding,
                                                     self.layer.stride)
        return self._op(x, weight, bias, *self._args)

    def _input_mask(self, keep: torch.Tensor, width: int) -> torch.Tensor:
        """Per-input 0/1 (or soft) factors for the first ``width`` input positions."""
        mask = keep[:, self.in_channel_of[:width]]
        return mask.view(mask.shape + (1, 1)) if self.conv else mask

    def masked_input(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The input with the channels each input did not keep zeroed (where they were computed for
        the batch's sake), and the action to slice the weight's inputs at."""
        if self.gate_in < 0:
            return x, 0
        net = self._net[0]
        a_in, keep = net._resolve(net._plan, self.gate_in, net._mode)
        if keep is not None:
            x = x * self._input_mask(keep, x.shape[1])
        return x, a_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._net[0]
        plan = net._plan
        mode = net._mode
        if plan is None:  # a tuning pass
            self.input_shape = tuple(x.shape)
            return self.layer(x)
        if self.gate_in < 0 and self.gate_out < 0:
            return self.layer(x) if mode == "mask" else self.compute(x, DENSE_KEY)
        if mode == "mask":
            x, _ = self.masked_input(x)
            if self.gate_out >= 0:
                net._resolve(plan, self.gate_out, mode, decide_from=x)
            return self.layer(x)
        a_in = _slice_action(plan.actions[self.gate_in]) if self.gate_in >= 0 else 0
        a_out = _slice_action(plan.decide(self.gate_out, x)) if self.gate_out >= 0 else 0
        if isinstance(a_out, int) and isinstance(a_in, int):
            return self.compute(x, (a_out, a_in))
        return self.compute_groups(x, a_out, a_in)

    def compute_groups(self, x: torch.Tensor, a_out: Any, a_in: Any) -> torch.Tensor:
        """A mixed batch: each group of inputs with the same (output, input) actions computed at its
        own weight slice, reading the first inputs its slice has; the outputs as wide as the widest
        group's, with zeros where an input's group kept fewer."""
        batch = x.shape[0]
        inputs = self.in_actions
        key = torch.as_tensor(a_out) * inputs + torch.as_tensor(a_in)
        key = key.expand(batch) if key.dim() == 0 else key
        groups = [(divmod(int(k), inputs), (key == k).nonzero().squeeze(1)) for k in torch.unique(key)]
        widths = [self._slices[actions][0].shape[0] for actions, _ in groups]
        out = None
        for (actions, rows), width in zip(groups, widths, strict=True):
            part = self.compute(x[:, : self._slices[actions][0].shape[1]].index_select(0, rows), actions)
            if out is None:
                shape = (batch, max(widths), *part.shape[2:])
                out = part.new_zeros(shape) if min(widths) < max(widths) else part.new_empty(shape)
            (out if width == out.shape[1] else out[:, :width]).index_copy_(0, rows, part)
        return out


def _slice_action(action: Any) -> Any:
    """An action to compute slices at: an int (the whole batch) or a ``[B]`` long tensor of
    different actions (one that is the same for every input becomes that int)."""
    if not isinstance(action, torch.Tensor):
        return action
    if action.dtype.is_floating_point:
        raise ValueError("a keep mask over channel groups needs mask mode (train mode)")
    if action.numel() > 0 and int(action.min()) == int(action.max()):
        return int(action.reshape(-1)[0])
    return action


def compute_layer(layer: nn.Module, x: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """A layer of the batch-1 program: its weight slices for ``key``, or, where a submodule was
    replaced after the network was built, the module that replaced it."""
    return layer.compute(x, key) if type(layer) is DynamicLayer else layer(x)
