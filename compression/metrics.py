"""What a compressed model costs: FLOPs, parameters, bytes on disk, latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-add; papers that quote MACs quote half these numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_layer_flops", "count_params", "model_bytes", "saved_bytes", "measure_latency",
           "measure_latency_rounds", "latency_rounds", "relative_latency", "measure_input_latency", "num_threads",
           "keep_freed_memory"]


@torch.no_grad()
def _count(model: nn.Module, example_input: torch.Tensor) -> FlopCounterMode:
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example_input)
    model.train(was_training)
    return counter


def count_layer_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward pass, per leaf module name (only modules that do matmuls or convs appear)."""
    leaf_names = {name for name, m in model.named_modules() if not list(m.children())}
    counts = _count(model, example_input).get_flop_counts()
    # FlopCounterMode names modules "<RootClass>.<fqn>".
    prefix = type(model).__name__ + "."
    stripped = {("" if name == type(model).__name__ else name.removeprefix(prefix)): ops
                for name, ops in counts.items()}
    return {name: int(sum(ops.values())) for name, ops in stripped.items() if name in leaf_names}


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """Total FLOPs of one forward pass on ``example_input`` (2 per multiply-add)."""
    return int(_count(model, example_input).get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def saved_bytes(obj: Any) -> int:
    """Size in bytes of ``obj`` (a state dict, or any object ``torch.save`` takes) as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def model_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's state dict as ``torch.save`` writes it."""
    return saved_bytes(model.state_dict())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_FREED = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed buffers back to the kernel, for the rest of the process
    (a process-wide setting: the scripts that time models ask for it; library code never does).

    By default glibc unmaps a freed batch of activations and page-faults it in again on the next
    pass; that cost grows with channels, not FLOPs, and swings from run to run. Deployments avoid it
    (jemalloc, tcmalloc, or these settings), so latency is measured without it. Returns whether the
    setting took (False where the C library is not glibc).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED))
    except (OSError, AttributeError):
        return False


@contextmanager
def num_threads(threads: int | None):
    """Run the body with ``torch.set_num_threads(threads)``, restoring the old value after."""
    old = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    repeats: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    fill_seconds: float = 0.0,
    max_repeats: int | None = None,
) -> float:
    """Median wall-clock seconds of one forward pass, after ``warmup`` untimed passes.

    ``repeats`` passes are timed, and more (up to ``max_repeats``) while they add up to less than
    ``fill_seconds``: a fast model gets more passes than a slow one for the same time. For timings
    as a deployment sees them, call ``keep_freed_memory()`` once first (the scripts do).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    was_training = model.training
    model.eval()
    times = []
    with num_threads(threads):
        for _ in range(warmup):
            model(example_input)
        most = repeats if max_repeats is None else max(repeats, max_repeats)
        while len(times) < repeats or (sum(times) < fill_seconds and len(times) < most):
            start = time.perf_counter()
            model(example_input)
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)


@torch.no_grad()
def relative_latency(model: nn.Module, reference: nn.Module, example_input: torch.Tensor, *,
                     reference_input: torch.Tensor | None = None, blocks: int = 30, warmup: int = 1,
                     threads: int | None = None, fill_seconds: float = 0.0, max_blocks: int | None = None) -> float:
    """``model``'s latency over ``reference``'s: their wall-clock seconds timed in blocks of four calls,
    model, reference, reference, model, and the median over the blocks of each block's model seconds
    over its reference seconds. A drift of the machine's speed that is steady over a block lands on
    both alike, and a slow spell spoils the blocks it falls in, not the estimate: on a shared machine
    whose speed jumps from call to call this is about twice as stable as the ratio of two medians
    timed together (docs/latency.md). ``reference_input`` is the reference's input when it differs
    from ``example_input``. At least ``blocks`` blocks, more (up to ``max_blocks``) while they add up
    to less than ``fill_seconds``, after ``warmup`` untimed calls of each."""
    if blocks < 1 or warmup < 0:
        raise ValueError(f"need blocks >= 1 and warmup >= 0, got blocks={blocks}, warmup={warmup}")
    x_ref = example_input if reference_input is None else reference_input
    most = blocks if max_blocks is None else max(blocks, max_blocks)
    modes = model.training, reference.training
    model.eval()
    reference.eval()
    ratios, spent = [], 0.0
    try:
        with num_threads(threads):
            for _ in range(warmup):
                model(example_input)
                reference(x_ref)
            while len(ratios) < blocks or (spent < fill_seconds and len(ratios) < most):
                times = []
                for module, x in ((model, example_input), (reference, x_ref), (reference, x_ref),
                                  (model, example_input)):
                    start = time.perf_counter()
                    module(x)
                    times.append(time.perf_counter() - start)
                ratios.append((times[0] + times[3]) / (times[1] + times[2]))
                spent += sum(times)
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    return statistics.median(ratios)


def measure_latency_rounds(models: list[nn.Module], example_input: torch.Tensor, *, rounds: int = 3,
                           repeats: int = 50, warmup: int = 10, threads: int | None = None,
                           per_input: bool = False) -> list[float]:
    """Each model's latency for comparing them: the median over ``rounds`` of ``latency_rounds``."""
    return [statistics.median(r) for r in latency_rounds(models, example_input, rounds=rounds, repeats=repeats,
                                                         warmup=warmup, threads=threads, per_input=per_input)]


@torch.no_grad()
def latency_rounds(models: list[nn.Module], example_input: torch.Tensor, *, rounds: int = 3, repeats: int = 50,
                   warmup: int = 10, threads: int | None = None, per_input: bool = False) -> list[list[float]]:
    """Each model's latency in seconds in each of ``rounds`` rounds (``[model][round]``), the models
    interleaved call by call: in a round each input is run ``repeats`` times by every model in turn,
    the order rotating from call to call, so that a slow spell of the machine lands on every model
    alike and their ratios hold even when absolute times drift. The input is ``example_input`` as
    one batch, or with ``per_input`` each of its inputs alone (a batch of one: for models whose work
    depends on the input). A model's round result is the median of its calls on each input,
    averaged over the inputs. ``warmup`` untimed calls of each model on each input come first."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if repeats < 1 or warmup < 0 or len(example_input) < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and inputs, got repeats={repeats}, warmup={warmup}, "
                         f"{len(example_input)} inputs")
    inputs = [x[None] for x in example_input] if per_input else [example_input]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    results: list[list[float]] = [[] for _ in models]
    try:
        with num_threads(threads):
            for _ in range(warmup):
                for x in inputs:
                    for m in models:
                        m(x)
            for _ in range(rounds):
                times: list[list[list[float]]] = [[[] for _ in inputs] for _ in models]
                for rep in range(repeats):
                    for j, x in enumerate(inputs):
                        first = (rep + j) % len(models)
                        for i in [*range(first, len(models)), *range(first)]:
                            start = time.perf_counter()
                            models[i](x)
                            times[i][j].append(time.perf_counter() - start)
                for i, per_model in enumerate(times):
                    results[i].append(statistics.fmean(statistics.median(t) for t in per_model))
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return results


def measure_input_latency(model: nn.Module, inputs: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                          threads: int | None = None) -> float:
    """Batch-1 latency of a model whose work depends on its input: the mean over ``inputs`` (each
    run alone, as a batch of one) of the median wall-clock seconds of its forward pass."""
    return latency_rounds([model], inputs, rounds=1, repeats=repeats, warmup=warmup, threads=threads,
                          per_input=True)[0][0]


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (the builder's init) and random batch-norm statistics and affine parameters.

    Latency does not depend on the values, but a fresh BN (mean 0, variance 1, scale 1, shift 0) is
    an identity no trained network has; random ones keep the outputs ordinary.
    """
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()
