"""From a run directory back to models: the inference model, and the trained agent with its env config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from torch import nn

from prunegym.compression.checkpoint import load_checkpoint, read_json
from prunegym.compression.fusion import inference_form

from .callbacks import latest_checkpoint
from .factory import ALGORITHMS

__all__ = ["load_inference_model", "load_agent"]


def _run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a prunegym run directory (no config.json)")
    return path


def load_inference_model(run_dir: str | os.PathLike, fold_bn: bool = True, trust_factory: bool = False) -> nn.Module:
    """The pruned (physically smaller) model of a finished run, in eval mode on the CPU, with its
    batch norms folded into the convs (``fold_bn=False``: as trained, e.g. to fine-tune it further).

    It is a plain ``nn.Module``: running it needs neither gymnasium nor stable-baselines3. A run of
    a user model (``package.module:factory``) needs ``trust_factory=True``: rebuilding it imports
    and calls that factory.
    """
    path = _run_dir(run_dir)
    if not (path / "report.json").is_file() or not (path / "model.pt").is_file():
        raise FileNotFoundError(f"run {path} is incomplete (no report.json or model.pt); continue it with "
                                f"`python scripts/train.py --run-dir {path} --resume`")
    model, _, _ = load_checkpoint(path / "model.pt", trust_factory=trust_factory)
    return inference_form(model)[0] if fold_bn else model


def load_agent(run_dir: str | os.PathLike, device: str = "auto") -> tuple[BaseAlgorithm, dict[str, Any]]:
    """The trained SB3 agent and the keywords of the env it was trained on.

    ``gymnasium.make("prunegym/LayerPruning-v0", **env_kwargs)`` rebuilds that env. A run that was
    stopped during the search yields its latest checkpoint's agent.
    """
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
    return ALGORITHMS[algo].load(agent_path, device=device), dict(data["env_kwargs"])
