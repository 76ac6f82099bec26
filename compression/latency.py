"""A latency lookup table: the CPU time of a model pruned to any channel counts, from its layers' timings.

FLOPs are a poor guide to CPU time once channel counts get uneven. CPU convolution kernels
(oneDNN) compute channels in blocks of the vector width, so on an AVX-512 machine a 3x3 conv at
batch 64 with 49 output channels can take twice as long as one with 48, and as long as one with
64. A search that prices FLOPs happily picks 49. NetAdapt's answer is a lookup table of measured
layer latencies; this is that table.

Each conv and linear layer is timed apart from the network (random weights, random input of the
layer's own input size, the batch size and thread count asked for) at the input and output channel
counts a keep decision gives it, once per (layer, in, out), on first use. A pruned entry is timed in
turn with the same layer at its dense widths, call by call, and kept as its ratio to it times the
dense entry: an entry timed minutes after the dense ones, on a machine whose speed has drifted
since, would otherwise be off by the drift (docs/latency.md), and the search picks the candidates
whose entries were timed in a fast moment. The predicted latency of keep counts
is the sum of their layers' entries plus the rest of the network (activations, adds, pooling):
the dense model's measured time minus its layers' dense entries, scaled by the fraction of the
layers' output activations the keep counts leave (those ops are memory-bound: their cost follows
the activations' size).
Batch norm is assumed folded into the conv before it, as in the inference form
(``prunegym.compression.fusion.inference_form``) the project times.

The table is state (``state_dict``/``load_state_dict``): timings differ between runs and machines,
so a resumed search reloads the entries it was rewarded with instead of measuring them again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .channels import ChannelGraph, in_channels, out_channels
from .fusion import inference_form
from .metrics import measure_latency, relative_latency

__all__ = ["LatencyTable", "narrowed_within", "widest_within"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# A dense entry is the median of at least 10 passes filling about 30 ms; a pruned one, of at least 3
# blocks of four calls (pruned, dense, dense, pruned) filling as much. A search picks the candidates
# the table calls fast, so an entry timed in a lucky moment is what it picks: with 3 passes in 4 ms,
# two tables of the same layers, timed minutes apart, differed by 10-50% on a noisy 2-core machine and
# every searched model measured over the budget the table had put it within (docs/latency.md).
_TARGET_SECONDS = 0.03
_MIN_REPEATS, _MAX_REPEATS = 10, 200
_MIN_BLOCKS, _MAX_BLOCKS = 3, 50


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module  # the dense layer, read for its type, kernel, stride, padding, dilation, groups
    in_size: tuple[int, ...]  # the input's shape after the channel dim (spatial dims; () for a linear)
    out_size: int  # elements per output channel
    in_channels: int
    out_channels: int
    in_group: int | None  # the group whose keep count sets the input channels (None: fixed)
    out_group: int | None
    depthwise: bool


class LatencyTable:
    """Measured per-layer latencies of ``model``'s conv and linear layers at any keep counts of ``graph``.

    ``batch_size`` and ``threads`` are those of the latency the table predicts (batch 64, one thread
    by default). ``density(keep_counts)`` is the predicted latency over the dense model's.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, example_input: torch.Tensor, *,
                 batch_size: int = 64, threads: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self.graph = graph
        self.batch_size = batch_size
        self.threads = threads
        self.layers = self._find_layers(model, graph, example_input)
        self.entries: dict[tuple[int, int, int], float] = {}  # (layer, in, out) -> seconds
        self._dense_layers: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # each pruned entry's reference
        self._dense_activations = sum(layer.out_size * layer.out_channels for layer in self.layers)
        self._dense_widths = [self._widths(i, graph.num_channels) for i in range(len(self.layers))]
        dense_layers = sum(self._layer_seconds(i, *widths) for i, widths in enumerate(self._dense_widths))
        deployed, _ = inference_form(copy.deepcopy(model).cpu())
        x = example_input[:1].cpu().expand(batch_size, *example_input.shape[1:]).contiguous()
        whole = _timed(deployed, x, threads, min_repeats=10)
        self.rest_seconds = max(0.0, whole - dense_layers)
        self.dense_seconds = dense_layers + self.rest_seconds

    # ---- set-up -------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _find_layers(model: nn.Module, graph: ChannelGraph, example_input: torch.Tensor) -> list[_Layer]:
        modules = dict(model.named_modules())
        costs = {c.name: c for c in graph.layers}
        timed = [n for n, m in modules.items() if isinstance(m, (*_CONVS, nn.Linear)) and n in costs]
        sizes: dict[str, tuple[int, ...]] = {}  # input size per channel (spatial dims)
        out_sizes: dict[str, int] = {}  # output elements per channel

        def record(name: str):
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                sizes.setdefault(name, tuple(args[0].shape[2:]))
                out_sizes.setdefault(name, int(output[0, 0].numel()))
            return hook

        hooks = [modules[n].register_forward_hook(record(n)) for n in timed]
        was_training = model.training
        try:
            model.eval()
            model(example_input[:1])
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        layers = []
        for name in timed:
            m, cost = modules[name], costs[name]
            if name not in sizes:
                continue  # not on the forward path: it costs nothing
            in_ch, out_ch = in_channels(m), out_channels(m)
            groups = int(getattr(m, "groups", 1))
            depthwise = groups > 1 and groups == in_ch == out_ch
            if groups > 1 and not depthwise:
                raise ValueError(f"layer {name!r} is a grouped conv (groups={groups}) that is not depthwise; "
                                 "the latency table times plain and depthwise convs only")
            layers.append(_Layer(name, m, sizes[name], out_sizes[name], in_ch, out_ch, cost.in_group, cost.out_group,
                                 depthwise))
        return layers

    def _widths(self, index: int, counts: np.ndarray) -> tuple[int, int]:
        layer = self.layers[index]
        out = layer.out_channels if layer.out_group is None else int(counts[layer.out_group])
        if layer.depthwise:
            return out, out
        return (layer.in_channels if layer.in_group is None else int(counts[layer.in_group])), out

    # ---- timing -------------------------------------------------------------------------------------
    def _layer_seconds(self, index: int, cin: int, cout: int) -> float:
        key = (index, cin, cout)
        if key not in self.entries:
            dense_key = (index, *self._dense_widths[index])
            if key == dense_key:
                self.entries[key] = _timed(*self._dense_layer(index), self.threads)
            else:  # relative to the dense entry, timed with it: the machine's drift cancels
                self.entries[key] = self.entries[dense_key] * _relative_seconds(
                    self._layer_and_input(index, cin, cout), self._dense_layer(index), self.threads)
        return self.entries[key]

    def _dense_layer(self, index: int) -> tuple[nn.Module, torch.Tensor]:
        """Layer ``index`` at its dense widths and an input for it, built once and kept: every pruned
        entry of the layer is timed against it."""
        if index not in self._dense_layers:
            self._dense_layers[index] = self._layer_and_input(index, *self._dense_widths[index])
        return self._dense_layers[index]

    def _layer_and_input(self, index: int, cin: int, cout: int) -> tuple[nn.Module, torch.Tensor]:
        """A layer like ``index`` at these widths and an input for it, random, drawn without touching
        torch's global random stream (the search's own randomness must not depend on what was timed)."""
        layer = self.layers[index]
        m = layer.module
        with torch.random.fork_rng(devices=[]):
            if isinstance(m, nn.Linear):
                return nn.Linear(cin, cout), torch.randn(self.batch_size, cin)
            module = type(m)(cin, cout, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                             groups=cin if layer.depthwise else 1, bias=True, padding_mode=m.padding_mode)
            return module, torch.randn(self.batch_size, cin, *layer.in_size)

    def seconds(self, keep_counts: Sequence[int] | np.ndarray) -> float:
        """Predicted latency (seconds) of the model pruned to ``keep_counts``; measures any entry it lacks."""
        counts = np.asarray(keep_counts, dtype=np.int64)
        if counts.shape != (len(self.graph.groups),):
            raise ValueError(f"need one keep count per group ({len(self.graph.groups)}), got shape {counts.shape}")
        if np.any(counts < 1) or np.any(counts > self.graph.num_channels):
            raise ValueError(f"keep counts must be in [1, channels of the group], got {counts.tolist()}")
        widths = [self._widths(i, counts) for i in range(len(self.layers))]
        activations = sum(layer.out_size * out for layer, (_, out) in zip(self.layers, widths, strict=True))
        return (self.rest_seconds * activations / self._dense_activations
                + sum(self._layer_seconds(i, cin, cout) for i, (cin, cout) in enumerate(widths)))

    def density(self, keep_counts: Sequence[int] | np.ndarray) -> float:
        """Predicted latency of ``keep_counts`` over the dense model's."""
        return self.seconds(keep_counts) / self.dense_seconds

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the settings, the rest term and every entry measured so far."""
        return {"batch_size": self.batch_size, "threads": self.threads, "rest_seconds": self.rest_seconds,
                "dense_seconds": self.dense_seconds, "layers": [layer.name for layer in self.layers],
                "entries": [[self.layers[i].name, cin, cout, s] for (i, cin, cout), s in sorted(self.entries.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the entries of a table saved by ``state_dict`` for the same layers, batch size and threads."""
        names = [layer.name for layer in self.layers]
        for key, mine in (("batch_size", self.batch_size), ("threads", self.threads), ("layers", names)):
            if state.get(key) != mine:
                raise ValueError(f"the saved latency table has {key}={state.get(key)!r}, this one {mine!r}")
        index = {name: i for i, name in enumerate(names)}
        entries = {}
        for name, cin, cout, s in state["entries"]:
            if not (isinstance(s, float) and math.isfinite(s) and s > 0):
                raise ValueError(f"the saved latency table has a bad entry for {name!r} ({cin}, {cout}): {s!r}")
            entries[(index[name], int(cin), int(cout))] = s
        missing = [self.layers[i].name for i, widths in enumerate(self._dense_widths) if (i, *widths) not in entries]
        if missing:  # the pruned entries are relative to them
            raise ValueError(f"the saved latency table lacks the dense entries of {missing}")
        self.entries = entries
        self.rest_seconds = float(state["rest_seconds"])
        self.dense_seconds = float(state["dense_seconds"])


def widest_within(table: LatencyTable, allowed: Sequence[np.ndarray], *, flops_target: float | None = None,
                  latency_target: float | None = None, lookahead: int = 4) -> np.ndarray:
    """The latency-greedy allocation: keep counts as wide as the budgets let the table's kernels run.

    Every group starts at its smallest allowed count (``allowed[g]``, ascending). Each step widens the
    one group, by up to ``lookahead`` allowed steps (latency rises in steps of a kernel block, so the
    next count alone can cost a whole block), that adds the most FLOPs per second of predicted
    latency while the FLOPs ratio stays within ``flops_target`` and the predicted latency ratio within
    ``latency_target``; it stops when no widening fits. This is HALP's latency-budgeted knapsack with
    FLOPs as each channel's worth, and a greedy baseline for the latency-aware search.
    """
    graph = table.graph
    _check_allowed(graph, allowed, lookahead)
    dense_flops = float(graph.dense_flops)
    counts = np.array([int(a[0]) for a in allowed], dtype=np.int64)

    def fits(c: np.ndarray) -> bool:
        return ((flops_target is None or float(graph.flops(c)) <= flops_target * dense_flops * (1 + 1e-9))
                and (latency_target is None or table.density(c) <= latency_target * (1 + 1e-9)))

    if not fits(counts):
        raise ValueError("no allocation fits the budgets: every group at its smallest count is already over them")
    return _widened(table, allowed, counts, fits, lookahead)


def narrowed_within(table: LatencyTable, allowed: Sequence[np.ndarray], counts: Sequence[int] | np.ndarray,
                    latency_target: float, *, lookahead: int = 4) -> np.ndarray:
    """``counts`` narrowed until the table predicts a latency ratio within ``latency_target``.

    Each step narrows the one group, by up to ``lookahead`` allowed steps, that saves the most
    predicted latency per FLOP it gives up (``widest_within`` run backwards; NetAdapt's step that
    shrinks a network until it meets its latency budget, the layer chosen from the table). A step
    can save more than the budget needed (latency falls a kernel block at a time), so the groups are
    then widened back as ``widest_within`` widens, none past its count in ``counts``, while the
    table keeps them within. Counts the table already puts within the budget come back unchanged;
    each of ``counts`` must be one of its group's ``allowed`` counts.
    """
    graph = table.graph
    _check_allowed(graph, allowed, lookahead)
    original = np.asarray(counts, dtype=np.int64).copy()
    if original.shape != (len(allowed),) or any(int(c) not in a for c, a in zip(original, allowed, strict=True)):
        raise ValueError(f"keep counts must be one allowed count per group, got {original.tolist()}")
    smallest = np.array([int(a[0]) for a in allowed], dtype=np.int64)
    if table.density(smallest) > latency_target * (1 + 1e-9):
        raise ValueError(f"no allocation fits the latency budget {latency_target}: every group at its smallest "
                         f"count is predicted at {table.density(smallest):.3f}")
    counts = original
    while (latency := table.density(counts)) > latency_target * (1 + 1e-9):
        flops = float(graph.flops(counts))
        best: tuple[float, np.ndarray] | None = None
        for candidate in _moves(counts, allowed, lookahead, wider=False):
            saved = latency - table.density(candidate)
            if saved > 0:  # latency need not fall with channels (a kernel block's edge)
                worth = saved / max(flops - float(graph.flops(candidate)), 1e-9)
                if best is None or worth > best[0]:
                    best = (worth, candidate)
        counts = smallest if best is None else best[1]  # nothing narrower is faster: the smallest counts are
    return _widened(table, allowed, counts, lambda c: bool(np.all(c <= original))
                    and table.density(c) <= latency_target * (1 + 1e-9), lookahead)


def _check_allowed(graph: ChannelGraph, allowed: Sequence[np.ndarray], lookahead: int) -> None:
    if len(allowed) != len(graph.groups):
        raise ValueError(f"need allowed counts for {len(graph.groups)} groups, got {len(allowed)}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")


def _moves(counts: np.ndarray, allowed: Sequence[np.ndarray], lookahead: int, *, wider: bool) -> list[np.ndarray]:
    """``counts`` with one group moved by 1 to ``lookahead`` of its allowed counts, wider or narrower."""
    moves = []
    for g, choices in enumerate(allowed):
        for count in (choices[choices > counts[g]][:lookahead] if wider else choices[choices < counts[g]][-lookahead:]):
            moved = counts.copy()
            moved[g] = count
            moves.append(moved)
    return moves


def _widened(table: LatencyTable, allowed: Sequence[np.ndarray], counts: np.ndarray,
             fits: Callable[[np.ndarray], bool], lookahead: int) -> np.ndarray:
    """From ``counts``, widen the one group (by up to ``lookahead`` allowed steps) that adds the most
    FLOPs per second of predicted latency among the widenings that ``fits``, until none does."""
    graph = table.graph
    while True:
        flops, latency = float(graph.flops(counts)), table.density(counts)
        best: tuple[float, np.ndarray] | None = None
        for candidate in _moves(counts, allowed, lookahead, wider=True):
            if fits(candidate):
                worth = (float(graph.flops(candidate)) - flops) / max(table.density(candidate) - latency, 1e-9)
                if best is None or worth > best[0]:
                    best = (worth, candidate)
        if best is None:
            return counts
        counts = best[1]


def _relative_seconds(a: tuple[nn.Module, torch.Tensor], b: tuple[nn.Module, torch.Tensor], threads: int) -> float:
    """``a``'s module on its input over ``b``'s (``relative_latency``): at least ``_MIN_BLOCKS``
    blocks, more (up to ``_MAX_BLOCKS``) until they fill ``_TARGET_SECONDS``, after one untimed call
    of each."""
    return relative_latency(a[0], b[0], a[1], reference_input=b[1], blocks=_MIN_BLOCKS, threads=threads,
                            fill_seconds=_TARGET_SECONDS, max_blocks=_MAX_BLOCKS)


def _timed(module: nn.Module, x: torch.Tensor, threads: int, min_repeats: int = _MIN_REPEATS) -> float:
    """Median seconds of ``module(x)`` after one untimed pass: at least ``min_repeats`` timed passes,
    more (up to ``_MAX_REPEATS``) until they fill ``_TARGET_SECONDS``."""
    return measure_latency(module, x, repeats=min_repeats, warmup=1, threads=threads, fill_seconds=_TARGET_SECONDS,
                           max_repeats=_MAX_REPEATS)
