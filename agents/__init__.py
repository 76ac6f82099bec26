"""Stable-Baselines3 agents for the pruning environments: factory, callbacks, runs, loading."""

from .callbacks import CheckpointCallback, PruningCallback, latest_checkpoint
from .factory import ALGORITHMS, default_hyperparameters, make_agent
from .loading import load_agent, load_inference_model
from .run import RunDirError, TrainConfig, format_report, load_config, train, uniform_keep_counts

__all__ = [
    "ALGORITHMS",
    "CheckpointCallback",
    "PruningCallback",
    "RunDirError",
    "TrainConfig",
    "default_hyperparameters",
    "format_report",
    "latest_checkpoint",
    "load_agent",
    "load_config",
    "load_inference_model",
    "make_agent",
    "train",
    "uniform_keep_counts",
]
