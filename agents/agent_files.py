"""A Stable-Baselines3 agent's files (its zip and replay buffer): written whole, read without running
code from them.

``save_agent`` and ``save_replay_buffer`` write through ``atomic_path``: a crash or a Ctrl-C never
leaves a truncated file that looks like a checkpoint.

SB3 restores the non-tensor parts of an agent zip (spaces, schedules, the policy class) and a whole
replay buffer with cloudpickle, which can call any function a crafted file names. A run directory
is data that people share, so prunegym reads those parts with ``restricted_loads``: numpy arrays,
gymnasium spaces, SB3's policy, buffer, noise and schedule classes, torch's module and optimizer
classes, and nothing else. The unpickled
entries go to SB3's ``load`` as ``custom_objects``, which takes them instead of unpickling its own;
the weights load with ``torch.load(weights_only=True)`` there. ``trust=True`` hands the file to SB3
unchecked, for agents whose saved parts hold other objects (a callable learning rate, say), from a
source the user trusts.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import BaseBuffer, ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule
from torch import nn

from prunegym.compression.checkpoint import atomic_path
from prunegym.compression.unpickling import NUMPY_GLOBALS, restricted_loads

__all__ = ["UntrustedFileError", "load_agent_file", "load_replay_buffer", "save_agent", "save_replay_buffer"]

_GLOBALS = NUMPY_GLOBALS | {
    ("collections", "deque"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch", "device"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
    ("numpy.random.bit_generator", "SeedSequence"),
    ("numpy.random._generator", "Generator"),
    ("numpy.random.mtrand", "RandomState"),
    ("numpy.random._pcg64", "PCG64"),
    ("numpy.random._pcg64", "PCG64DXSM"),
    ("numpy.random._mt19937", "MT19937"),
    ("numpy.random._philox", "Philox"),
    ("numpy.random._sfc64", "SFC64"),
}
_PACKAGES = ("numpy", "gymnasium.spaces", "stable_baselines3", "torch.nn", "torch.optim")
_BASES = (np.generic, np.dtype,  # numpy's scalar and dtype classes
          spaces.Space, BasePolicy, BaseBuffer, ActionNoise, FloatSchedule, LinearSchedule, ConstantSchedule,
          TrainFreq, TrainFrequencyUnit,
          nn.Module, torch.optim.Optimizer)  # activation, extractor and optimizer classes


class UntrustedFileError(ValueError):
    """A saved agent or replay buffer refers to something that could run code when loaded."""


def _loads(data: bytes, what: str) -> Any:
    try:
        return restricted_loads(data, what=what, allowed=_GLOBALS, packages=_PACKAGES, bases=_BASES)
    except pickle.UnpicklingError as err:
        raise UntrustedFileError(f"{err}; it could run code when loaded, so it was not. Load it with "
                                 "trust=True (train.py: --trust-run) only if you trust where it came from") from err
    except Exception as err:  # a corrupt pickle can fail in almost any way
        raise ValueError(f"{what} is damaged ({type(err).__name__}: {err})") from err


def load_agent_file(cls: type[BaseAlgorithm], path: str | os.PathLike, *, trust: bool = False,
                    **load_kwargs: Any) -> BaseAlgorithm:
    """``cls.load(path, **load_kwargs)``, its pickled entries read with ``restricted_loads`` unless ``trust``.

    Raises ``UntrustedFileError`` naming the entry and the global it refers to, and ``ValueError`` for a
    file that is not an agent zip.
    """
    path = Path(path)
    if trust:
        return cls.load(path, **load_kwargs)
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data"))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a readable agent zip ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a readable agent zip (its data entry is not a JSON object)")
    custom_objects = dict(load_kwargs.pop("custom_objects", None) or {})
    for key, item in data.items():
        if key in custom_objects or not (isinstance(item, dict) and ":serialized:" in item):
            continue
        try:
            raw = base64.b64decode(item[":serialized:"], validate=True)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: entry {key!r} is damaged ({err})") from err
        custom_objects[key] = _loads(raw, f"entry {key!r} of {path}")
    return cls.load(path, custom_objects=custom_objects, **load_kwargs)


def load_replay_buffer(agent: BaseAlgorithm, path: str | os.PathLike, *, trust: bool = False) -> None:
    """Give the off-policy ``agent`` the replay buffer saved at ``path`` (``agent.save_replay_buffer``),
    read with ``restricted_loads`` unless ``trust``."""
    if trust:
        agent.load_replay_buffer(path)
        return
    buffer = _loads(Path(path).read_bytes(), f"replay buffer {path}")
    if not isinstance(buffer, ReplayBuffer):
        raise ValueError(f"{path} holds a {type(buffer).__name__}, not a replay buffer")
    if not hasattr(buffer, "handle_timeout_termination"):  # saved by SB3 < 2.1, as SB3 itself reads it
        buffer.handle_timeout_termination = False
        buffer.timeouts = np.zeros_like(buffer.dones)
    buffer.device = agent.device
    agent.replay_buffer = buffer


def save_agent(agent: BaseAlgorithm, path: str | os.PathLike) -> None:
    """``agent.save`` to ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        agent.save(file)


def save_replay_buffer(agent: BaseAlgorithm, path: str | os.PathLike) -> None:
    """``agent.save_replay_buffer`` to ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        agent.save_replay_buffer(file)
