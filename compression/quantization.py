"""Post-training int8 quantization, stored as real int8.

``quantize_int8``: PyTorch's FX graph-mode post-training quantization. BatchNorm is fused into the
convs, weights are quantized per output channel, symmetric (``qint8``, zero point 0), activations
per tensor from a histogram observer over a few calibration batches; the result runs on the
quantized CPU kernels (fbgemm/oneDNN on x86, QNNPACK on ARM). ``int8_state`` stores it compactly
(int8 weights, fp32 per-channel scales and biases, one tensor of all scalar parameters), so bytes
on disk drop close to 4×; ``save_int8``/``load_int8`` write and rebuild it.

``mean_centred_int8``: a weight-only scheme. Each output channel's weights are centred on their
mean μ and scaled by α = max|w - μ| / 127, stored as ``q = round((w - μ)/α)`` in int8 and
dequantized as ``q·α + μ``. It quantizes the *weights* (quantizing a layer's outputs instead
leaves the weights in fp32 and saves nothing); it saves bytes, and runs on the fp32 kernels.

torch.ao.quantization is deprecated in favour of torchao, which this project's pinned torch does
not ship; it still works on torch <= 2.13, and its deprecation warnings are silenced here alone.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_path, build_from_architecture
from .fusion import inference_form
from .metrics import saved_bytes

__all__ = ["quantize_int8", "int8_state", "int8_bytes", "save_int8", "load_int8", "quantized_engine",
           "mean_centred_int8", "mean_centred_quantize"]

_WEIGHTED = (nn.Conv2d, nn.Linear)


def quantized_engine() -> str:
    """The quantized CPU backend: x86 (fbgemm + oneDNN) where available, else QNNPACK (ARM)."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            return engine
    raise RuntimeError(f"this torch build has no quantized CPU engine (it has {engines})")


@contextmanager
def _ao_quiet():
    with warnings.catch_warnings():
        for message in ("torch.ao.quantization is deprecated", ".*reduce_range will be deprecated",
                        ".*torch.quantize_per_tensor, torch.quantize_per_channel", "TypedStorage is deprecated"):
            warnings.filterwarnings("ignore", message=message)
        yield


def _prepare(model: nn.Module, example: torch.Tensor, engine: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = engine
    try:
        return prepare_fx(copy.deepcopy(model).cpu().eval(), get_default_qconfig_mapping(engine), (example,))
    except Exception as err:  # fx raises many types on code it cannot trace
        raise ValueError(f"cannot quantize {type(model).__name__}: torch.fx cannot trace it ({err})") from err


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor], engine: str | None = None) -> nn.Module:
    """An int8 copy of ``model`` (eval mode, CPU): per-channel symmetric weights, activations
    calibrated on the ``calibration`` batches (a few hundred train images are plenty)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    batches = [b.cpu() for b in calibration]
    if not batches:
        raise ValueError("calibration needs at least one batch of inputs")
    engine = engine or quantized_engine()
    with _ao_quiet():
        prepared = _prepare(model, batches[0][:1], engine)
        for batch in batches:
            prepared(batch)
        return convert_fx(prepared).eval()


def _encode(key: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        if value.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
            raise ValueError(f"{key}: only per-channel quantized weights are stored compactly, got {value.qscheme()}")
        if bool((value.q_per_channel_zero_points() != 0).any()):
            raise ValueError(f"{key}: symmetric weights (zero point 0) expected")
        out["tensors"][key] = value.int_repr().clone()
        out["tensors"][key + ".#scales"] = value.q_per_channel_scales().float()
        out["per_channel"][key] = int(value.q_per_channel_axis())
    elif isinstance(value, torch.Tensor) and value.dim() == 0:
        out["scalar_keys"].append(key)
        out["scalar_dtypes"][key] = str(value.dtype)
        out["scalars"].append(float(value.item()))
    elif isinstance(value, torch.Tensor):
        out["tensors"][key] = value.detach().cpu().clone()
    elif isinstance(value, torch.dtype):
        out["dtypes"][key] = str(value)
    elif isinstance(value, tuple):
        out["tuples"][key] = len(value)
        for i, item in enumerate(value):
            _encode(f"{key}.#{i}", item, out)
    elif value is None:
        out["nones"].append(key)
    else:
        raise ValueError(f"{key}: cannot store a {type(value).__name__} in an int8 checkpoint")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _decode(key: str, state: dict[str, Any], scalars: dict[str, torch.Tensor]) -> Any:
    if key in state["tuples"]:
        return tuple(_decode(f"{key}.#{i}", state, scalars) for i in range(state["tuples"][key]))
    if key in state["dtypes"]:
        return _dtype(state["dtypes"][key])
    if key in state["nones"]:
        return None
    if key in scalars:
        return scalars[key]
    value = state["tensors"][key]
    if key in state["per_channel"]:
        scales = state["tensors"][key + ".#scales"].double()
        return torch._make_per_channel_quantized_tensor(value, scales, torch.zeros_like(scales, dtype=torch.long),
                                                        state["per_channel"][key])
    return value


def int8_state(qmodel: nn.Module) -> dict[str, Any]:
    """The quantized model's state, compact: int8 weights, fp32 per-channel scales, fp32 biases and
    one float64 tensor holding every scalar (activation scales and zero points)."""
    out: dict[str, Any] = {"keys": [], "tensors": {}, "per_channel": {}, "scalar_keys": [], "scalar_dtypes": {},
                           "scalars": [], "dtypes": {}, "tuples": {}, "nones": []}
    with _ao_quiet():
        for key, value in qmodel.state_dict().items():
            out["keys"].append(key)
            _encode(key, value, out)
    out["scalars"] = torch.tensor(out["scalars"], dtype=torch.float64)
    return out


def _expand(state: dict[str, Any]) -> dict[str, Any]:
    scalars = {key: torch.tensor(value, dtype=_dtype(state["scalar_dtypes"][key]))
               for key, value in zip(state["scalar_keys"], state["scalars"].tolist(), strict=True)}
    return {key: _decode(key, state, scalars) for key in state["keys"]}


def int8_bytes(qmodel: nn.Module) -> int:
    """Bytes on disk of the quantized model's compact state (``int8_state``)."""
    return saved_bytes(int8_state(qmodel))


def save_int8(path: str | os.PathLike, qmodel: nn.Module, arch: dict[str, Any],
              metadata: dict[str, Any] | None = None) -> None:
    """Write an int8 model (from ``quantize_int8`` of a model with this architecture) atomically."""
    payload = {"architecture": arch, "int8": int8_state(qmodel), "engine": torch.backends.quantized.engine,
               "metadata": metadata or {}}
    with atomic_path(path) as tmp, _ao_quiet():
        torch.save(payload, tmp)


def load_int8(path: str | os.PathLike, trust_factory: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an int8 model written by ``save_int8``: ``(model, metadata)``; loads with ``weights_only``."""
    from torch.ao.quantization.quantize_fx import convert_fx

    try:
        with _ao_quiet():
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not a readable int8 checkpoint ({err})") from err
    if not isinstance(payload, dict) or not {"architecture", "int8"} <= payload.keys():
        raise ValueError(f"{path}: not a prunegym int8 checkpoint (expected keys 'architecture' and 'int8')")
    arch = payload["architecture"]
    model = build_from_architecture(arch, trust_factory=trust_factory)
    example = torch.zeros(1, arch["in_channels"], arch["image_size"], arch["image_size"])
    with _ao_quiet():
        prepared = _prepare(model, example, payload.get("engine") or quantized_engine())
        prepared(example)  # the observers need one pass before convert; the saved scales replace theirs
        qmodel = convert_fx(prepared).eval()
        state = OrderedDict(_expand(payload["int8"]))
        state._metadata = qmodel.state_dict()._metadata  # module versions: how each one reads its keys
        qmodel.load_state_dict(state)
    return qmodel, payload.get("metadata", {})


@torch.no_grad()
def mean_centred_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, α, μ)`` per output channel (dim 0): ``q`` int8 with ``weight ≈ q·α + μ``."""
    flat = weight.detach().float().flatten(1)
    mu = flat.mean(dim=1)
    alpha = ((flat - mu[:, None]).abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round((flat - mu[:, None]) / alpha[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), alpha, mu


@torch.no_grad()
def mean_centred_int8(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The mean-centred weight-only int8 form of ``model`` (BN folded first, as deployed): the model
    with its weights dequantized (``q·α + μ``), and the compact state that stores them as int8."""
    model = inference_form(copy.deepcopy(model))[0]  # the caller's model stays where and as it was
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHTED):
            q, alpha, mu = mean_centred_quantize(module.weight)
            shape = (-1,) + (1,) * (module.weight.dim() - 1)
            module.weight.copy_(q.float() * alpha.view(shape) + mu.view(shape))
            del state[f"{name}.weight"]
            state[f"{name}.weight.q"], state[f"{name}.weight.alpha"], state[f"{name}.weight.mu"] = q, alpha, mu
    return model.eval(), state
