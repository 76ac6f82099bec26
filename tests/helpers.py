"""Helpers several test modules share (pytest puts this folder on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics, so every channel matters to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
                m.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python scripts/train.py ARGS`` from the repository root; PRUNEGYM_CACHE comes from the session fixture."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the models are tiny; threads only contend on shared cores
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_script(name: str):
    """``scripts/<name>.py`` as a module, to call its ``main`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"prunegym_{name}_script", ROOT / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def train_script():
    """``scripts/train.py`` as a module, to call its ``main`` in this process."""
    return load_script("train")


def train_in_process(capsys, *args: str) -> tuple[int, str]:
    """``scripts/train.py ARGS`` run by its ``main`` in this process: (exit status, stderr). For refusals,
    where a subprocess would spend most of the test importing torch; torch's thread count is kept."""
    import torch

    threads = torch.get_num_threads()
    try:
        status = train_script().main(list(args))
    except SystemExit as err:  # argparse's own refusals
        status = err.code
    finally:
        torch.set_num_threads(threads)
    return status, capsys.readouterr().err


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def trained_digits_cnn(split) -> nn.Module:
    """A digits CNN trained briefly (5 epochs, about 98% test accuracy on digits), in eval mode."""
    from prunegym.compression.models import build_model
    from prunegym.compression.training import train_classifier

    torch.manual_seed(0)
    return train_classifier(build_model("digits_cnn", 1, 10), split, epochs=5, lr=3e-3, seed=0)


def tiny_comparison(out, **overrides):
    """A ``CompareConfig`` of every method at one budget and one seed that runs in seconds, written to ``out``."""
    from prunegym.agents.compare import CompareConfig

    settings = dict(budgets=[0.5], seeds=[0], finetune_epochs=1, base_epochs=2, layer_timesteps=64,
                    input_timesteps=512, supernet_epochs=1, device="cpu", out=str(out))
    return CompareConfig(**{**settings, **overrides})
