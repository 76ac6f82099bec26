"""The comparison's cells as Ray tasks (``compare.py --workers``, ``--address``): the same cells as a
serial run, failed cells reported and retried on the next run, and a grid that survives losing a
node of a two-node cluster."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_comparison

from prunegym.agents.compare import compare
from prunegym.compression.checkpoint import write_json

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[distributed]')")

# Dependencies between cells (random search after RL per-layer) and a supernet to train once per seed.
METHODS = ["dense", "rl_layer", "random_search", "uniform_l1", "uniform_supernet"]


def _cells(results: dict) -> dict:
    return {(r["method"], r["budget"], r["seed"]): (r["test_accuracy"], r["flops"], r.get("keep_ratios"))
            for r in results["rows"]}


def test_workers_run_the_serial_cells_and_report_failures(tmp_path):
    serial = compare(tiny_comparison(tmp_path / "serial", seeds=[0, 1], methods=METHODS), log=lambda _: None)
    assert serial["failed"] == []

    config = tiny_comparison(tmp_path / "parallel", seeds=[0, 1], methods=METHODS, workers=2)
    out = Path(config.out)
    # A file where seed 1's RL run directory belongs: that cell fails on every try, and random
    # search, which reuses the run, fails after it; every other cell still finishes.
    write_json(out / "config.json", {"config": dataclasses.asdict(config), "torch": torch.__version__})
    blocker = out / "runs" / "layer__b0.5__s1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a run directory")
    first = compare(config, log=lambda _: None)
    failed = {(f["method"], f["seed"]): f["error"] for f in first["failed"]}
    assert set(failed) == {("rl_layer", 1), ("random_search", 1)}
    assert "NotADirectoryError" in failed[("rl_layer", 1)]
    assert "rl_layer" in failed[("random_search", 1)]
    assert "Failed" in (out / "results.md").read_text()
    assert len(list((out / "cells").glob("*.json"))) == len(serial["rows"]) - 2

    blocker.unlink()  # the next run computes only the two missing cells
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    second = compare(config, log=lambda _: None)
    assert second["failed"] == []
    assert all((out / "cells" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert _cells(second) == _cells(serial)
    keys = ("method", "budget", "accuracy_mean", "accuracy_std", "flops_ratio", "rl_minus_this")
    assert [{k: e.get(k) for k in keys} for e in second["table"]] == \
        [{k: e.get(k) for k in keys} for e in serial["table"]]


def test_cells_finish_in_the_order_of_the_grid(tmp_path):
    # One worker: each cell runs as soon as the one before it in the grid has finished (random search
    # right after the RL run it reuses), so a comparison stopped halfway has its first seeds whole.
    from prunegym.agents.compare import _cells
    from prunegym.agents.methods import METHODS as ALL

    lines: list[str] = []
    config = tiny_comparison(tmp_path / "out", seeds=[0, 1], methods=METHODS, workers=1)
    assert compare(config, log=lines.append)["failed"] == []
    order = [line for line in lines if ": accuracy " in line]
    expected = [f"{ALL[m].label:<22} budget {'-' if b is None else b:<5} seed {s}:" for m, b, s in _cells(config)]
    assert [line[:len(e)] for line, e in zip(order, expected, strict=True)] == expected


def test_settings_of_where_cells_run_do_not_split_a_comparison(tmp_path):
    config = tiny_comparison(tmp_path / "out", methods=["dense", "uniform_l1"])
    compare(config, log=lambda _: None)
    again = dataclasses.replace(config, workers=1)
    assert compare(again, log=lambda _: None)["failed"] == []  # the cells are read back, nothing reruns


def test_bad_worker_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        compare(tiny_comparison(tmp_path / "a", workers=-1))
    with pytest.raises(ValueError, match="give one of the two"):
        compare(tiny_comparison(tmp_path / "b", workers=2, address="auto"))


def test_a_grid_survives_losing_a_worker_node(tmp_path):
    from ray.cluster_utils import Cluster

    # The head runs no task, as on a cluster; two worker nodes of one CPU each run a cell each,
    # so the one that goes is busy when it goes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        args = ["--methods", *METHODS, "--seeds", "0", "1", "--budgets", "0.5", "--finetune-epochs", "1",
                "--base-epochs", "2", "--layer-timesteps", "64", "--supernet-epochs", "1", "--device", "cpu",
                "--out", str(out), "--address", cluster.address, "--no-progress-bar"]
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "compare.py"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while len(list((out / "cells").glob("*.json"))) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no cell finished in 300 s"
            time.sleep(0.2)
        cells_before = len(list((out / "cells").glob("*.json")))
        cluster.remove_node(worker)  # its raylet and workers are killed, mid-grid
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        results = json.loads((out / "results.json").read_text())
        assert results["failed"] == []
        assert cells_before < len(results["rows"]) == 2 * len(METHODS)
    finally:
        cluster.shutdown()


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch):
    from prunegym.agents.distributed import MissingExtraError
    from prunegym.agents.sweep import SweepConfig

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    with pytest.raises(MissingExtraError, match=r"\.\[distributed\]"):
        tiny_comparison(tmp_path / "a", workers=2).validate()
    with pytest.raises(MissingExtraError, match=r"\.\[distributed\]"):
        SweepConfig(grid={"lam": [1.0]}, settings={"flops_target": None}).validate()
    tiny_comparison(tmp_path / "b").validate()  # a serial comparison needs no Ray
