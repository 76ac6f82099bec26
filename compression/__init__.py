"""The compression core: data, models, training, channel machinery and metrics. Knows nothing of RL."""

from .channels import ChannelGraph, ChannelGroup, SoftMask, prune_channels, recalibrate_bn, reorder_channels
from .checkpoint import build_from_architecture, describe_architecture, load_checkpoint, save_checkpoint
from .data import DATASETS, Split, Splits, load_dataset
from .fusion import fold_batchnorm, inference_form
from .importance import (
    IMPORTANCES,
    BNScaleImportance,
    GroupL1Importance,
    Importance,
    L1Importance,
    L2Importance,
    make_importance,
)
from .latency import LatencyTable
from .metrics import count_flops, count_layer_flops, count_params, measure_latency, model_bytes
from .models import MODELS, build_model
from .training import base_model, evaluate, resolve_device, train_classifier

__all__ = [
    "BNScaleImportance",
    "ChannelGraph",
    "ChannelGroup",
    "DATASETS",
    "GroupL1Importance",
    "IMPORTANCES",
    "Importance",
    "L1Importance",
    "L2Importance",
    "LatencyTable",
    "MODELS",
    "SoftMask",
    "Split",
    "Splits",
    "base_model",
    "build_from_architecture",
    "build_model",
    "count_flops",
    "count_layer_flops",
    "count_params",
    "describe_architecture",
    "evaluate",
    "fold_batchnorm",
    "inference_form",
    "load_checkpoint",
    "load_dataset",
    "make_importance",
    "measure_latency",
    "model_bytes",
    "prune_channels",
    "recalibrate_bn",
    "reorder_channels",
    "resolve_device",
    "save_checkpoint",
    "train_classifier",
]
