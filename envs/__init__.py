"""Gymnasium environments for learning where to prune; importing this module registers their ids."""

import gymnasium

from .layer_pruning import DENSITY_KINDS, OBSERVATION_FEATURES, LayerPruningEnv

__all__ = ["LayerPruningEnv", "DENSITY_KINDS", "OBSERVATION_FEATURES", "LAYER_PRUNING_ID"]

LAYER_PRUNING_ID = "prunegym/LayerPruning-v0"

if LAYER_PRUNING_ID not in gymnasium.registry:
    gymnasium.register(id=LAYER_PRUNING_ID, entry_point="prunegym.envs.layer_pruning:LayerPruningEnv")
