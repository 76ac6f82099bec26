"""What decides a dynamic network's actions from the features entering each gated layer: the
per-input observation (``Observation``, shared by the env and the inference model), and the
fast single-input deciders (``PooledMLP`` in NumPy, ``FoldedDecider`` with the observation's
standardisation folded into the first layer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["FEATURE_CLIP", "standardise", "Observation", "PooledMLP", "FoldedDecider"]


FEATURE_CLIP = 10.0  # standardised features are clipped to [-FEATURE_CLIP, FEATURE_CLIP]


def standardise(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: features ``[B, C, H, W]`` average-pooled per channel, standardised, clipped."""
    return ((features.mean(dim=(2, 3)) - mean) / std).clamp_(-FEATURE_CLIP, FEATURE_CLIP)


class Observation(nn.Module):
    """The per-input pruning observation at a gated layer, ``[B, F + L + 1]``: the features entering
    it average-pooled per channel, padded with zeros to ``F`` and standardised by the layer's
    ``mean`` and ``std`` (``[L, F]``), clipped to ±``FEATURE_CLIP``; a one-hot of the layer among
    the ``L`` gated layers; and the FLOPs density spent before it.

    The environment and the policy-gated inference model both build observations with this
    module, so a policy sees at inference exactly what it saw in training. The parts that do not
    depend on the input (padding, one-hot) are precomputed: at batch 1 a handful of operators."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        layers, width = mean.shape
        self.register_buffer("mean", mean.clone().float())
        self.register_buffer("std", std.clone().float())
        rows = torch.zeros(layers, width + layers + 1)
        rows[:, :width] = ((0.0 - self.mean) / self.std).clamp(-FEATURE_CLIP, FEATURE_CLIP)
        rows[torch.arange(layers), width + torch.arange(layers)] = 1.0
        self.register_buffer("rows", rows)
        self.num_layers, self.width = layers, width

    def _apply(self, fn, recurse=True):
        self._parts = {}  # tensors moved or cast: cut the parts again
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._parts = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def part(self, gate: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a gated layer whose features have ``channels`` channels: its ``mean`` and ``std`` for
        them, and ``[1, F + L - channels]``, the observation's entries after them and before the
        density spent (padding and one-hot), which do not depend on the input."""
        key = (gate, channels)
        parts = self.__dict__.setdefault("_parts", {})
        if key not in parts:
            parts[key] = (self.mean[gate, :channels].contiguous(), self.std[gate, :channels].contiguous(),
                          self.rows[gate, channels:-1][None].contiguous())
        return parts[key]

    def forward(self, gate: int, features: torch.Tensor, spent: Any) -> torch.Tensor:
        n, c = features.shape[:2]
        mean, std, rest = self.part(gate, c)
        standard = standardise(features, mean, std)
        if isinstance(spent, torch.Tensor):
            spent = spent.to(standard.dtype).reshape(-1, 1).expand(n, 1)
        else:
            spent = torch.full((n, 1), spent, dtype=standard.dtype, device=standard.device)
        return torch.cat([standard, rest.expand(n, -1), spent], dim=1)


_NUMPY_ACTIVATIONS: dict[type, Callable[[np.ndarray], Any]] = {
    nn.Tanh: lambda h: np.tanh(h, out=h),
    nn.ReLU: lambda h: np.maximum(h, 0, out=h),
}


class PooledMLP:
    """A small MLP on one input's per-channel feature sums, run in NumPy on preallocated vectors: how
    a decider decides for a single input. It runs at every gated layer, and at batch 1 a torch
    operator's dispatch costs more than a NumPy one on a 64-vector (docs/per-input.md times a decision).

    The input vector holds the sums of ``features`` ``[1, C, H, W]`` over each channel, the
    ``extras`` scalars passed at the call, and a 1. So ``first`` (``[C + extras + 1, out]``) carries
    the pooling's ``1 / (H·W)``, any standardisation, the extras' weights and the bias in its last
    row. ``layers`` follow: a matrix (its bias as the last row) or an activation (``supports``).
    ``low`` and ``high`` clip the input vector (of the same length as ``first``'s rows). Calls
    return the last layer's output, a vector each thread has its own of.
    """

    def __init__(self, channels: int, first: torch.Tensor, layers: Sequence[torch.Tensor | nn.Module] = (),
                 low: torch.Tensor | None = None, high: torch.Tensor | None = None):
        if not self.supports(layers):
            raise ValueError(f"PooledMLP runs Linear matrices and {sorted(t.__name__ for t in _NUMPY_ACTIVATIONS)}, "
                             f"got {[type(layer).__name__ for layer in layers]}")
        self.channels = channels
        self.extras = first.shape[0] - channels - 1
        self.steps = [(layer.detach().float().numpy().copy(), None) if isinstance(layer, torch.Tensor)
                      else (None, _NUMPY_ACTIVATIONS[type(layer)]) for layer in (first, *layers)]
        # what each step is: "matrix", or the activation's name ("tanh", "relu")
        self.kinds = ["matrix" if isinstance(layer, torch.Tensor) else type(layer).__name__.lower()
                      for layer in (first, *layers)]
        self.bounds = None if low is None else (low.float().numpy().copy(), high.float().numpy().copy())
        self._vectors: dict[int, tuple[Any, ...]] = {}

    @staticmethod
    def supports(layers: Sequence[torch.Tensor | nn.Module]) -> bool:
        return all(isinstance(layer, torch.Tensor) or type(layer) in _NUMPY_ACTIVATIONS for layer in layers)

    def _allocate(self) -> tuple[Any, ...]:
        x = np.ones(self.channels + self.extras + 1, dtype=np.float32)
        sums = torch.from_numpy(x)[: self.channels].view(1, self.channels)
        program, body = [], None
        for matrix, activation in self.steps:
            if matrix is None:
                program.append((None, activation, body))
            else:
                out = np.ones(matrix.shape[1] + 1, dtype=np.float32)  # its last entry: the next layer's 1
                body = out[:-1]
                program.append((matrix, out, body))
        return sums, x, program, body

    def __call__(self, features: torch.Tensor, *extras: float) -> np.ndarray:
        vectors = self._vectors.get(threading.get_ident())
        if vectors is None:
            vectors = self._vectors[threading.get_ident()] = self._allocate()
        sums, x, program, output = vectors
        torch.sum(features.detach(), (2, 3), out=sums)
        for i, value in enumerate(extras):
            x[self.channels + i] = value
        if self.bounds is not None:
            np.minimum(x, self.bounds[1], out=x)
            np.maximum(x, self.bounds[0], out=x)
        for matrix, out, body in program:
            if matrix is None:
                out(body)  # the activation, in place
            else:
                np.dot(x, matrix, out=body)
                x = out
        return output

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_vectors"] = {}  # a copy gets vectors of its own (the torch view must share the array)
        return state


class FoldedDecider(nn.Module):
    """A decider that keeps its weights rearranged for fast decisions, cut again on the next
    decision after anything that may change them: ``to``, ``load_state_dict``, ``train`` and
    ``eval``. Call ``refresh()`` after editing a weight in place. ``folded(key, build)`` is what
    ``build()`` returns, built once per ``key`` until then; ``pooled(gate, features)`` is the
    subclass's ``_pooled_mlp`` for one input's features, or None where the torch path decides.
    ``decision`` says how an action follows from that MLP's outputs: ``argmax`` (a policy) or
    ``leading_positive`` (the gates: the number of leading outputs above 0)."""

    decision = "argmax"

    def refresh(self) -> None:
        self.__dict__["_folded"] = {}

    def folded(self, key: Hashable, build: Callable[[], Any]) -> Any:
        cache = self.__dict__.setdefault("_folded", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def pooled(self, gate: int, features: torch.Tensor) -> PooledMLP | None:
        """The ``PooledMLP`` deciding at gated layer ``gate`` for ``features``, built once per shape,
        dtype and device: None unless they are one float32 ``[1, C, H, W]`` input on the CPU and
        ``_pooled_mlp`` gives one."""
        if features.shape[0] != 1:
            return None
        key = (gate, features.shape, features.dtype, features.is_cpu)
        cache = self.__dict__.setdefault("_folded", {})
        mlp = cache.get(key, False)  # at batch 1 this runs at every gated layer: one lookup
        if mlp is False:
            _, shape, dtype, cpu = key
            single = len(shape) == 4 and dtype == torch.float32 and cpu
            mlp = cache[key] = self._pooled_mlp(gate, shape) if single else None
        return mlp

    def action(self, outputs: np.ndarray) -> int:
        """The action from a ``PooledMLP``'s outputs, as ``decision`` says."""
        if self.decision == "argmax":
            return int(outputs.argmax())
        opened = outputs > 0
        return len(opened) if opened.all() else int(opened.argmin())

    def decide_one(self, gate: int, features: torch.Tensor, spent: float) -> int:
        """The action at gated layer ``gate`` for one input's ``features``, as an int: what ``forward``
        decides (eval mode), by the ``PooledMLP`` where there is one. The batch-1 path calls this
        directly: at batch 1 a module call costs as much as a decision's arithmetic."""
        mlp = self.pooled(gate, features)
        if mlp is None:
            return int(self.forward(gate, features, spent))
        return self.action(mlp(features, spent) if mlp.extras else mlp(features))

    def _pooled_mlp(self, gate: int, shape: torch.Size) -> PooledMLP | None:
        """The decision at ``gate`` as a ``PooledMLP`` for one input's features of ``shape``, or None."""
        return None

    def _apply(self, fn, recurse=True):
        self.refresh()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.refresh()
        return super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        self.refresh()
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_folded"] = {}
        return state
