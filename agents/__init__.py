"""Stable-Baselines3 agents for the pruning environments: factory, callbacks, runs, loading.

Names load on first use (PEP 562), so ``from prunegym.agents import load_inference_model`` and
the policy-gated inference model work where stable-baselines3 and gymnasium are not installed.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ALGORITHMS": "factory",
    "default_hyperparameters": "factory",
    "make_agent": "factory",
    "ResumableCheckpointCallback": "callbacks",
    "PruningCallback": "callbacks",
    "InputPruningCallback": "callbacks",
    "latest_checkpoint": "callbacks",
    "load_agent": "loading",
    "load_inference_model": "loading",
    "load_dynamic": "loading",
    "UntrustedFileError": "agent_files",
    "PolicyDecider": "gated",
    "random_search": "random_search",
    "BatchedInputPruningVecEnv": "vec_env",
    "RunDirError": "config",
    "TrainConfig": "config",
    "format_report": "run_layer",
    "load_config": "config",
    "train": "run",
    "train_input": "run_input",
    "format_input_report": "run_input",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
