"""Checkpoints that rebuild themselves: weights beside the architecture description they need.

Pruned models change shape, so a state dict alone cannot be loaded into the dense builder. The
architecture description records the zoo name (or import path) and every conv, linear and BN
layer's channel counts; ``build_from_architecture`` builds the dense model and resizes those layers.
Checkpoints load with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import MODELS, build_model

__all__ = [
    "describe_architecture",
    "build_from_architecture",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_path",
    "interrupts_held",
    "write_json",
    "read_json",
]

_ARCH_KEYS = ("model", "in_channels", "num_classes", "image_size", "layers")


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives while the body runs and raise it as ``KeyboardInterrupt``
    once the body is done; a second Ctrl-C raises at once.

    A write cut short is worse than a late stop: torch's zip writer, interrupted, replaces the
    ``KeyboardInterrupt`` with a ``RuntimeError`` and the program dies with a traceback instead of
    stopping cleanly. Python delivers SIGINT to the main thread only, so elsewhere (and where a
    handler other than Python's own is installed, or inside another ``interrupts_held``) the body
    runs as is.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:  # asked twice: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:  # after the body, whether it ended or raised: the user asked to stop
            raise KeyboardInterrupt


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the body succeeds.

    A reader never sees a half-written file: it sees the old one, or the whole new one. A Ctrl-C
    during the write is held until the file is in place (``interrupts_held``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_held():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _layer_shape(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        return {"type": "conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return {"type": "batchnorm", "num_features": module.num_features}
    if isinstance(module, nn.Identity):  # where a BN was folded into its conv (fusion.fold_batchnorm)
        return {"type": "identity"}
    return None


def describe_architecture(model: nn.Module, model_name: str, in_channels: int, num_classes: int,
                          image_size: int) -> dict[str, Any]:
    """A JSON-able description from which ``build_from_architecture`` rebuilds ``model``'s shape."""
    layers = {name: shape for name, m in model.named_modules() if (shape := _layer_shape(m)) is not None}
    return {"model": model_name, "in_channels": int(in_channels), "num_classes": int(num_classes),
            "image_size": int(image_size), "layers": layers}


def _resized(module: nn.Module, shape: dict[str, Any]) -> nn.Module:
    if shape["type"] == "identity":
        return nn.Identity()
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(shape["in_channels"], shape["out_channels"], module.kernel_size, module.stride,
                         module.padding, module.dilation, shape["groups"], shape["bias"], module.padding_mode)
    if isinstance(module, nn.Linear):
        return nn.Linear(shape["in_features"], shape["out_features"], shape["bias"])
    return type(module)(shape["num_features"], module.eps, module.momentum, module.affine,
                        module.track_running_stats)


def build_from_architecture(arch: dict[str, Any], trust_factory: bool | str = False) -> nn.Module:
    """Build an (untrained) model of the shape ``arch`` describes.

    A zoo model is built from data alone. A ``package.module:factory`` model imports and calls that
    factory, which is code: it is built only with ``trust_factory=True`` (any factory), or with
    ``trust_factory`` naming that very factory.
    """
    missing = [k for k in _ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"architecture description lacks {missing}")
    trusted = trust_factory is True or (isinstance(trust_factory, str) and trust_factory == arch["model"])
    if arch["model"] not in MODELS and not trusted:
        raise ValueError(f"the checkpoint's model {arch['model']!r} is built by importing and calling code; "
                         "load it with trust_factory=True (scripts/export.py: --trust-factory) if you trust that "
                         "factory")
    model = build_model(arch["model"], arch["in_channels"], arch["num_classes"])
    modules = dict(model.named_modules())
    for name, shape in arch["layers"].items():
        if name not in modules:
            raise ValueError(f"architecture names layer {name!r}, which {arch['model']!r} does not have")
        module = modules[name]
        current = _layer_shape(module)
        folded_bn = current is not None and (current["type"], shape["type"]) == ("batchnorm", "identity")
        if current is None or (current["type"] != shape["type"] and not folded_bn):
            raise ValueError(f"layer {name!r} is {type(module).__name__}, architecture says {shape['type']!r}")
        # Older descriptions lack some keys (e.g. "bias"); what they do not say stays as built.
        if any(current.get(k) != v for k, v in shape.items()):
            shape = {**current, **shape}
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, attr, _resized(module, shape))
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: dict[str, Any],
                    metadata: dict[str, Any] | None = None) -> None:
    """Write the architecture, the weights and JSON-able metadata to ``path`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"architecture": arch, "state_dict": state, "metadata": metadata or {}}, tmp)


def load_checkpoint(path: str | os.PathLike, trust_factory: bool | str = False
                    ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load ``(model, architecture, metadata)``; the model is in eval mode on the CPU.

    ``trust_factory``: see ``build_from_architecture``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there (expected a file written by save_checkpoint)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable prunegym checkpoint ({err})") from err
    if not isinstance(payload, dict) or not {"architecture", "state_dict"} <= payload.keys():
        raise ValueError(f"{path}: not a prunegym checkpoint (expected keys 'architecture' and 'state_dict')")
    model = build_from_architecture(payload["architecture"], trust_factory=trust_factory)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the architecture it describes ({err})") from err
    model.eval()
    return model, payload["architecture"], payload.get("metadata", {})
