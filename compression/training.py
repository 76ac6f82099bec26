"""Training, fine-tuning and evaluation of classifiers, and the cache of trained base models."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import describe_architecture, load_checkpoint, save_checkpoint
from .data import Split, Splits, dataset_key
from .distillation import Distillation, kd_loss
from .models import build_model

__all__ = ["resolve_device", "evaluate", "train_classifier", "base_model", "cache_dir", "cache_key", "check_seed",
           "BASE_EPOCHS", "MAX_SEED"]

# Enough for every zoo model to converge on the digits default within seconds on a CPU.
BASE_EPOCHS = 30


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; anything else must name an available device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (try 'auto', 'cpu' or 'cuda')") from err
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if resolved.type not in available:
        raise ValueError(f"device {device!r} is not supported; expected auto, cpu, cuda or mps")
    if not available[resolved.type]:
        raise ValueError(f"device {device!r} is not available on this machine")
    return resolved


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are; the CPU for a model without any (quantized kernels pack theirs)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1024,
             device: torch.device | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode)."""
    device = device or _device_of(model)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        x = split.x[start:start + batch_size].to(device)
        y = split.y[start:start + batch_size].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    return loss_sum / len(split), correct / len(split)


def train_classifier(model: nn.Module, split: Split, *, epochs: int, lr: float = 1e-3, batch_size: int = 64,
                     weight_decay: float = 5e-4, seed: int = 0, device: torch.device | None = None,
                     distill: Distillation | None = None,
                     penalty: Callable[[nn.Module], torch.Tensor] | None = None,
                     after_step: Callable[[int, int], None] | None = None,
                     max_steps: int | None = None,
                     loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                     ) -> nn.Module:
    """Train (or fine-tune) ``model`` in place with AdamW and a cosine schedule; returns it in eval mode.

    ``max_steps``: stop after this many batches, the cosine schedule spanning them, however many
    epochs that is (the short-term fine-tune of a search reward; ``epochs`` is then ignored);
    ``None``: ``epochs`` whole epochs.

    ``distill``: learn from a teacher's soft targets as well as the labels (``kd_loss``; the teacher
    runs in eval mode). ``penalty(model)`` is added to the loss (network slimming's L1 on BN scales).
    ``after_step(step, total_steps)`` runs after every optimiser step (gradual magnitude pruning
    re-applies its masks there). ``loss_fn(model, x, y)`` replaces the loss of a batch (the supernet's
    sandwich rule runs several widths of the model on each batch); it excludes ``distill``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be None or >= 0, got {max_steps}")
    if loss_fn is not None and distill is not None:
        raise ValueError("loss_fn replaces the batch loss; it cannot be combined with distill")
    device = device or _device_of(model)
    model.to(device)
    steps_per_epoch = -(-len(split) // batch_size)
    if max_steps is not None:
        epochs = -(-max_steps // steps_per_epoch)
    if epochs == 0:
        return model.eval()
    total = epochs * steps_per_epoch if max_steps is None else max_steps
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    teacher = None
    if distill is not None:
        teacher = distill.teacher.to(device)
        teacher_was_training = teacher.training
        teacher.eval()
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split), generator=generator)
        for start in range(0, len(split), batch_size):
            if step == total:
                break
            idx = order[start:start + batch_size]
            step += 1
            if len(idx) < 2:
                continue  # a batch of one breaks batch norm
            x, y = split.x[idx].to(device), split.y[idx].to(device)
            if loss_fn is not None:
                loss = loss_fn(model, x, y)
            elif teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = kd_loss(model(x), teacher_logits, y, distill.temperature, distill.alpha)
            else:
                loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(step, total)
    if teacher is not None:
        teacher.train(teacher_was_training)
    return model.eval()


MAX_SEED = 2**32 - 1  # numpy's and Stable-Baselines3's seeds are 32-bit


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` if it is an integer in [0, 2**32 - 1]; otherwise a ValueError naming ``name`` and the value."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def cache_dir() -> Path:
    """Where trained base models are kept: ``$PRUNEGYM_CACHE`` or ``~/.cache/prunegym``."""
    return Path(os.environ.get("PRUNEGYM_CACHE", Path.home() / ".cache" / "prunegym"))


def cache_key(model_name: str, splits: Splits, seed: int, epochs: int) -> str:
    """The name a trained base model is cached under (models derived from it extend the name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    if safe != model_name:  # import paths: keep names short and unique
        safe = f"{safe[:40]}_{hashlib.sha1(model_name.encode()).hexdigest()[:8]}"
    # The data itself is part of the key, images and labels: a model must never have trained on
    # another split's reward or test images, nor on an older version of a file at the same path.
    split = splits.fingerprint[:8]
    return f"{safe}__{dataset_key(splits.name)}_{split}__seed{seed}__ep{epochs}"


def base_model(model_name: str, splits: Splits, seed: int = 0, *, epochs: int = BASE_EPOCHS,
               device: torch.device | None = None, use_cache: bool = True) -> nn.Module:
    """The trained dense model for (model, dataset, seed), trained once and then read from the cache."""
    path = cache_dir() / "base" / f"{cache_key(model_name, splits, seed, epochs)}.pt"
    if use_cache and path.is_file():
        model, _, _ = load_checkpoint(path, trust_factory=model_name)  # only the factory asked for
        return model.to(device or "cpu")
    torch.manual_seed(seed)
    model = build_model(model_name, splits.in_channels, splits.num_classes)
    train_classifier(model, splits.train, epochs=epochs, seed=seed, device=device or torch.device("cpu"))
    if use_cache:
        arch = describe_architecture(model, model_name, splits.in_channels, splits.num_classes, splits.image_size)
        save_checkpoint(path, model, arch, {"dataset": splits.name, "seed": seed, "epochs": epochs})
    return model
