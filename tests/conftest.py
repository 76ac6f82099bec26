"""Shared test fixtures: a per-run model cache, so base models train once and never touch ~/.cache.

The suite runs on every core (``pytest -n auto``, pytest-xdist): each worker is a process of its own
with one torch thread, and all workers share one model cache (writes to it are atomic, so two
workers that train the same base model at once leave one good file).
"""

from __future__ import annotations

import os
import signal

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def prunegym_cache(tmp_path_factory: pytest.TempPathFactory):
    """``PRUNEGYM_CACHE`` for this run (subprocesses inherit it): trained base models are shared by all tests."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <run's temp>/popen-gwN: the run's folder is shared
        path = base.parent / "prunegym_cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("prunegym_cache")
    previous = os.environ.get("PRUNEGYM_CACHE")
    os.environ["PRUNEGYM_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PRUNEGYM_CACHE", None)
    else:
        os.environ["PRUNEGYM_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: on a few shared cores, thread synchronisation costs more than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (Ctrl-C raises KeyboardInterrupt) for one test: a shell that starts
    a job in the background (CI, nohup) hands it SIGINT ignored, and Python then installs none."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
