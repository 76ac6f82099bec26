"""Gymnasium environments for learning where to prune; importing this module registers their ids."""

import gymnasium

from .input_pruning import (
    INPUT_DENSITY_KINDS,
    InputPruningEngine,
    InputPruningEnv,
    InputPruningSetup,
    make_setup,
    observation_size,
)
from .layer_pruning import DENSITY_KINDS, OBSERVATION_FEATURES, REWARD_MODELS, TASK_LOSSES, LayerPruningEnv

__all__ = ["LayerPruningEnv", "InputPruningEnv", "InputPruningEngine", "InputPruningSetup", "make_setup",
           "observation_size", "DENSITY_KINDS", "INPUT_DENSITY_KINDS", "OBSERVATION_FEATURES", "REWARD_MODELS",
           "TASK_LOSSES", "LAYER_PRUNING_ID", "INPUT_PRUNING_ID"]

LAYER_PRUNING_ID = "prunegym/LayerPruning-v0"
INPUT_PRUNING_ID = "prunegym/InputPruning-v0"

if LAYER_PRUNING_ID not in gymnasium.registry:
    gymnasium.register(id=LAYER_PRUNING_ID, entry_point="prunegym.envs.layer_pruning:LayerPruningEnv")
if INPUT_PRUNING_ID not in gymnasium.registry:
    gymnasium.register(id=INPUT_PRUNING_ID, entry_point="prunegym.envs.input_pruning:InputPruningEnv")
