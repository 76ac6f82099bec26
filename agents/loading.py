"""From a run directory back to models: the inference model, and the trained agent with its env config.

Loading an inference model imports neither gymnasium nor stable-baselines3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from prunegym.compression.checkpoint import load_checkpoint, read_json
from prunegym.compression.fusion import inference_form
from prunegym.compression.gated_layers import DynamicSpec
from prunegym.compression.gates import GateDecider, dynamic_inference

from .gated import PolicyDecider, check_spec

__all__ = ["load_inference_model", "load_agent", "load_dynamic"]


def _run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a prunegym run directory (no config.json)")
    return path


def load_dynamic(model: nn.Module, metadata: dict[str, Any]) -> nn.Module:
    """The inference network of a dynamic checkpoint: BN folded, its decider (policy or gate) inside."""
    spec = DynamicSpec.from_dict(metadata["spec"])
    saved = metadata["decider"]
    kind = saved["config"].get("kind")
    if kind == "policy":
        decider = PolicyDecider.from_config(saved["config"], saved["state_dict"])
        check_spec(decider, spec)
    elif kind == "gate":
        decider = GateDecider(spec, int(saved["config"]["hidden"]))
        decider.load_state_dict(saved["state_dict"])
    else:
        raise ValueError(f"unknown decider kind {kind!r} in the checkpoint; expected 'policy' or 'gate'")
    net = dynamic_inference(model, spec, decider)
    if metadata.get("kernels"):
        net.set_kernels(metadata["kernels"])
    return net


def load_inference_model(run_dir: str | os.PathLike, name: str = "model", fold_bn: bool = True,
                         trust_factory: bool | str = False) -> nn.Module:
    """A model of a finished run, ready for inference: eval mode, on the CPU, BN folded into the convs.

    ``name`` picks the file: ``model`` (what the agent learned), ``uniform`` (the static run's
    uniform baseline), ``latency_greedy`` (a latency-budgeted run's greedy baseline) or ``gate``
    (the per-input run's gate baseline). A static model comes back
    physically pruned (``fold_bn=False``: as trained, e.g. to fine-tune further); a per-input one
    as a ``DynamicNetwork`` whose decider (the policy's actor, or the gates) picks each input's
    channels. Either is a plain ``nn.Module``: running it needs neither gymnasium nor
    stable-baselines3. A run of a user model (``package.module:factory``) needs
    ``trust_factory=True``, or ``trust_factory`` naming that factory: rebuilding it imports and calls it.
    """
    path = _run_dir(run_dir)
    file = path / f"{name}.pt"
    if not (path / "report.json").is_file() or not file.is_file():
        if (path / "report.json").is_file():
            present = sorted(p.stem for p in path.glob("*.pt"))
            raise FileNotFoundError(f"run {path} has no {file.name}; it has {present}")
        raise FileNotFoundError(f"run {path} is incomplete (no report.json or {file.name}); continue it with "
                                f"`python scripts/train.py --run-dir {path} --resume`")
    model, _, metadata = load_checkpoint(file, trust_factory=trust_factory)
    if metadata.get("kind") == "dynamic":
        if not fold_bn:
            raise ValueError(f"{file.name} is a per-input model, which runs with BN folded only (fold_bn=False "
                             "applies to static models); load_checkpoint gives its unfolded network")
        return load_dynamic(model, metadata)
    return inference_form(model)[0] if fold_bn else model


def load_agent(run_dir: str | os.PathLike, device: str = "auto", trust: bool = False) -> tuple[Any, dict[str, Any]]:
    """The trained SB3 agent and the keywords of the env it was trained on.

    ``gymnasium.make(config["env_id"], **env_kwargs)`` rebuilds that env (``env_id`` is in the run's
    ``config.json``). A run that was stopped during the search yields its latest checkpoint's agent.
    The agent zip is read without running code from it: an entry that refers to anything but the
    spaces, schedules and classes SB3 saves is refused (``UntrustedFileError``) unless ``trust``.
    """
    from .agent_files import load_agent_file
    from .callbacks import latest_checkpoint
    from .factory import ALGORITHMS

    path = _run_dir(run_dir)
    data = read_json(path / "config.json")
    algo = data["config"]["algo"]
    if algo not in ALGORITHMS:
        raise ValueError(f"{path / 'config.json'} names algo {algo!r}; expected one of {sorted(ALGORITHMS)}")
    agent_path = path / "agent.zip"
    if not (path / "report.json").is_file() or not agent_path.is_file():  # unfinished: the latest checkpoint
        checkpoint = latest_checkpoint(path / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"run {path} has no agent.zip and no checkpoint yet")
        agent_path = checkpoint[0]
    return load_agent_file(ALGORITHMS[algo], agent_path, trust=trust, device=device), dict(data["env_kwargs"])
