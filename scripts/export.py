"""Export a finished run's pruned model for deployment: a checkpoint, TorchScript, or ONNX.

Formats: state_dict (model_state.pt: architecture + weights, reload with
prunegym.compression.checkpoint.load_checkpoint), torchscript (model.torchscript.pt, traced; reload
with torch.jit.load, no prunegym needed), onnx (model.onnx, dynamic batch axis; needs the `onnx`
package: pip install onnx). Every file is loaded back and checked against the model before the
script reports success; ONNX outputs are compared too when onnxruntime is installed.

A per-input run (`--env input`) exports as state_dict (the run's checkpoint: network, spec and
decider; reload with prunegym.agents.load_inference_model's loader, load_dynamic) and torchscript
(a scripted program with its control flow: each input's decisions made inside it; torch.jit.load
runs it without prunegym and it returns (logits, actions, density)). Its check runs many inputs
with different decisions against the Python model, one input at a time. ONNX is not offered for it.

The ONNX file is written by torch's TorchScript-based exporter (torch.onnx.export(dynamo=False)),
which needs only `onnx`; the newer torch.export-based exporter (the default) also needs `onnxscript`
and is used only where the first is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegym.agents import load_inference_model
from prunegym.agents.config import load_config
from prunegym.agents.loading import load_dynamic
from prunegym.compression.checkpoint import atomic_path, describe_architecture, load_checkpoint, save_checkpoint
from prunegym.compression.dynamic import DynamicNetwork
from prunegym.compression.dynamic_script import script_dynamic

FORMATS = ("state_dict", "torchscript", "onnx")
FILE_NAMES = {"state_dict": "model_state.pt", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
ATOL = 1e-5
RTOL = 1e-4


class ExportError(RuntimeError):
    """An export could not be written or did not reproduce the model."""


def _optional_import(name: str) -> Any:
    """The module, or None where it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes:,} B"
    scaled, unit = (num_bytes / 1024, "KiB") if num_bytes < 1024**2 else (num_bytes / 1024**2, "MiB")
    return f"{scaled:.1f} {unit} ({num_bytes:,} B)"


def _check_close(name: str, expected: torch.Tensor, got: Any) -> None:
    got = torch.as_tensor(got)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape " + str(tuple(got.shape))
        raise ExportError(f"{name} does not reproduce the model's outputs (max abs difference {diff})")


def _inputs(arch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tracing example (batch 1) and a batch of 3 that checks the batch axis is not baked in."""
    generator = torch.Generator().manual_seed(0)
    shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
    return torch.randn((1, *shape), generator=generator), torch.randn((3, *shape), generator=generator)


@torch.no_grad()
def export_state_dict(model: nn.Module, arch: dict[str, Any], metadata: dict[str, Any], path: Path,
                      checks: tuple[torch.Tensor, ...], trust_factory: bool = False) -> None:
    save_checkpoint(path, model, arch, metadata)
    reloaded, _, _ = load_checkpoint(path, trust_factory=trust_factory)
    for x in checks:
        _check_close(path.name, model(x), reloaded(x))


@torch.no_grad()
def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, checks: tuple[torch.Tensor, ...]) -> None:
    # torch marks TorchScript deprecated in favour of torch.export; it is still what C++ and mobile load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
        reloaded = torch.jit.load(str(path), map_location="cpu")
    for x in checks:
        _check_close(path.name, model(x), reloaded(x))


def _varied_inputs(example: torch.Tensor, count: int = 64) -> torch.Tensor:
    """``count`` random inputs of ``example``'s shape at scales from 0.1 to 10, so that a per-input
    model's deciders see features of many sizes and take different decisions."""
    generator = torch.Generator().manual_seed(1)
    scales = torch.logspace(-1, 1, count).view(-1, *([1] * (example.dim() - 1)))
    return torch.randn((count, *example.shape[1:]), generator=generator) * scales


@torch.no_grad()
def export_dynamic_state_dict(model: nn.Module, arch: dict[str, Any], metadata: dict[str, Any], path: Path,
                              run_dir: Path, checks: torch.Tensor, trust_factory: bool = False) -> None:
    """A per-input run's checkpoint as loaded (its unfolded network, spec and decider), checked by
    loading it back."""
    save_checkpoint(path, model, arch, {**metadata, "exported_from": str(run_dir)})
    original = load_dynamic(model, metadata)
    reloaded_model, _, reloaded_metadata = load_checkpoint(path, trust_factory=trust_factory)
    _check_close(path.name, original(checks, mode="loop"), load_dynamic(reloaded_model, reloaded_metadata)(
        checks, mode="loop"))


@torch.no_grad()
def export_dynamic_torchscript(model: DynamicNetwork, path: Path, checks: torch.Tensor) -> int:
    """Write the scripted per-input program and check its logits, decisions and densities against the
    Python model run one input at a time; return how many distinct decision paths the check saw."""
    scripted = script_dynamic(model, checks[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp))
        reloaded = torch.jit.load(str(path), map_location="cpu")
    expected = model(checks, mode="loop")
    actions = torch.stack([torch.as_tensor(a) for a in model.last_actions], dim=1)
    logits, got_actions, density = reloaded(checks)
    _check_close(path.name, expected, logits)
    if not torch.equal(got_actions, actions):
        rows = int((got_actions != actions).any(dim=1).sum())
        raise ExportError(f"{path.name} decides differently from the model on {rows} of {len(checks)} inputs")
    _check_close(f"{path.name} (density)", model.last_density.double(), density)
    return len({tuple(row) for row in actions.tolist()})


def _onnx_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _onnx_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    if _optional_import("onnxscript") is None:
        raise ExportError("torch's torch.export-based ONNX exporter needs the onnxscript package: "
                          "pip install onnxscript")
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), external_data=False)


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, checks: tuple[torch.Tensor, ...]) -> str:
    """Write and check ``path``; return which exporter wrote it."""
    onnx = _optional_import("onnx")
    if onnx is None:
        raise ExportError("--format onnx needs the onnx package: pip install onnx")

    exporters: list[tuple[str, Callable[[nn.Module, torch.Tensor, Path], None]]] = [
        ("torch.onnx.export(dynamo=False)", _onnx_legacy), ("torch.onnx.export(dynamo=True)", _onnx_dynamo)]
    failures = []
    for name, exporter in exporters:
        try:
            with atomic_path(path) as tmp:
                exporter(model, example, tmp)
                onnx.checker.check_model(str(tmp), full_check=True)
        except ExportError as err:
            failures.append(f"{name}: {err}")
            continue
        except Exception as err:  # the exporters raise many types; report them all if none works
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        break
    else:
        raise ExportError("no ONNX exporter of this torch could write the model; " + "; ".join(failures))
    onnxruntime = _optional_import("onnxruntime")
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        for x in checks:
            _check_close(f"{path.name} (onnxruntime)", model(x), session.run(None, {input_name: x.numpy()})[0])
        name += ", outputs checked with onnxruntime"
    else:
        name += ", checked with onnx.checker (install onnxruntime to compare outputs too)"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path, help="a finished run directory (it has model.pt)")
    parser.add_argument("--format", choices=[*FORMATS, "all"], default="all",
                        help="what to write; all skips onnx with a note when onnx is not installed (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR/export)")
    parser.add_argument("--trust-factory", action="store_true",
                        help="a run of your own model (package.module:factory): import and call that factory to "
                             "rebuild it (it runs that code; only for a run from a source you trust)")
    return parser


def export(run_dir: Path, formats: list[str], out: Path, log: Callable[[str], None] = print,
           trust_factory: bool = False) -> dict[str, Path]:
    """Write ``formats`` of the run's pruned model into ``out``; return the paths written. A run of a user
    model (``package.module:factory``) needs ``trust_factory``: rebuilding it calls that factory."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory to write the exports into")
    checkpoint = run_dir / "model.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} does not exist: the run is not finished, or {run_dir} is not a run "
                                "directory")
    model = load_inference_model(run_dir, trust_factory=trust_factory)  # BN folded: the architecture is the folded one
    trained, trained_arch, metadata = load_checkpoint(checkpoint, trust_factory=trust_factory)
    dynamic = isinstance(model, DynamicNetwork)
    arch = trained_arch if dynamic else describe_architecture(
        model, trained_arch["model"], trained_arch["in_channels"], trained_arch["num_classes"],
        trained_arch["image_size"])
    example, batch = _inputs(arch)
    checks = (example, batch)
    varied = _varied_inputs(example) if dynamic else None  # the per-input checks' inputs
    if dynamic and "onnx" in formats:
        raise ValueError("a per-input run exports as state_dict or torchscript; ONNX is not offered for its "
                         "per-input decisions")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        if dynamic and fmt == "state_dict":
            export_dynamic_state_dict(trained, trained_arch, metadata, path, run_dir, varied, trust_factory)
            note = "the run's per-input checkpoint; reloads with load_checkpoint and load_dynamic"
        elif dynamic:
            paths = export_dynamic_torchscript(model, path, varied)
            note = (f"scripted with its decisions; reloaded and checked on {len(varied)} inputs one at a time "
                    f"({paths} distinct decision paths): logits, actions and density")
        elif fmt == "state_dict":
            export_state_dict(model, arch, {**metadata, "exported_from": str(run_dir)}, path, checks, trust_factory)
            note = "reloads with load_checkpoint"
        elif fmt == "torchscript":
            export_torchscript(model, example, path, checks)
            note = "traced at batch 1; reloaded and checked at batch 1 and 3"
        else:
            note = export_onnx(model, example, path, checks)
        written[fmt] = path
        log(f"wrote {path}  {_size(path.stat().st_size)}  [{note}]")
    return written


def _is_per_input(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a per-input run (False where it cannot be read: export names the problem)."""
    try:
        return load_config(run_dir).env == "input"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    formats = list(FORMATS) if args.format == "all" else [args.format]
    if args.format == "all" and _optional_import("onnx") is None:
        print("note: skipping onnx: the onnx package is not installed (pip install onnx)")
        formats.remove("onnx")
    elif args.format == "all" and _is_per_input(args.run_dir):
        print("note: skipping onnx: a per-input run exports as state_dict and torchscript")
        formats.remove("onnx")
    out = args.out if args.out is not None else args.run_dir / "export"
    try:
        export(args.run_dir, formats, out, trust_factory=args.trust_factory)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
