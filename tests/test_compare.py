"""Tests for the comparison harness: ``CompareConfig`` validation, one tiny comparison run end to end
(every method, one seed, one budget), its outputs, resuming from the cells it wrote, the table
helpers, and ``scripts/compare.py`` as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script
from helpers import tiny_comparison as tiny

from prunegym.agents.cli import interrupted_status
from prunegym.agents.compare import compare, finished_table
from prunegym.agents.compare_table import format_table, markdown_table, summarize
from prunegym.agents.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One comparison of every method (tiny budgets), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("compare") / "out"
    lines: list[str] = []
    results = compare(tiny(out), log=lines.append)
    return out, results, "\n".join(lines)


def test_every_method_has_a_row(run):
    out, results, _ = run
    table = {(e["method"], e["budget"]) for e in results["table"]}
    for name, method in METHODS.items():
        assert (name, 0.5 if method.per_budget else None) in table
    assert len(results["rows"]) == len(METHODS)


def test_outputs_are_written(run):
    out, results, text = run
    for name in ("config.json", "results.json", "results.md", "pareto.png"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "cells").glob("*.json"))) == len(METHODS)
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    markdown = (out / "results.md").read_text()
    for method in METHODS.values():
        assert method.label in markdown and method.label in text
    assert list((out / "tb").rglob("events.out.tfevents.*")), "no TensorBoard hparams"


def test_the_rl_runs_are_complete_run_directories(run):
    out, _, _ = run
    for name in ("layer__b0.5__s0", "input__s0"):
        assert (out / "runs" / name / "report.json").is_file()


def test_random_search_makes_as_many_reward_evaluations_as_the_agent(run):
    out, results, _ = run
    rows = {r["method"]: r for r in results["rows"]}
    report = json.loads((out / "runs" / "layer__b0.5__s0" / "report.json").read_text())
    assert rows["random_search"]["search_episodes"] == report["search"]["episodes"] > 0
    # The comparison runs the uniform baselines as methods of its own: its RL run leaves them out.
    assert set(report["results"]) == {"dense", "rl"}
    assert not (out / "runs" / "layer__b0.5__s0" / "uniform.pt").exists()
    assert rows["random_search"]["flops_ratio"] <= 0.5 + 1e-6
    # Both search the same supernet: uniform counts from it are what the uniform row measures.
    assert rows["uniform_supernet"]["flops"] == rows["uniform_l1"]["flops"]


def test_every_per_budget_method_is_paired_with_rl(run):
    _, results, text = run
    for entry in results["table"]:
        if entry["budget"] is None or entry["method"] == "rl_layer":
            assert "rl_minus_this" not in entry
            continue
        versus = entry["rl_minus_this"]
        rl = next(e for e in results["table"] if e["method"] == "rl_layer")
        assert versus["mean"] == pytest.approx(rl["accuracy_mean"] - entry["accuracy_mean"])
        assert versus["n"] == 1 and versus["low"] is None  # one seed: no interval
    assert "RL - this" in text


def test_budgets_are_met_and_costs_make_sense(run):
    _, results, _ = run
    rows = {r["method"]: r for r in results["rows"]}
    dense = rows["dense"]
    assert rows["dense"]["flops_ratio"] == 1.0
    for name in ("rl_layer", "uniform_l1", "global_l1", "global_l2", "slimming", "random", "torch_pruning",
                 "kd_student"):
        assert rows[name]["flops_ratio"] <= 0.5 + 1e-6, name
        assert rows[name]["params"] < dense["params"], name
        assert 0 <= rows[name]["test_accuracy"] <= 1
    # Random channels use the RL policy's counts: the same FLOPs, other channels.
    assert rows["random"]["flops"] == pytest.approx(rows["rl_layer"]["flops"])
    # Unstructured sparsity keeps dense shapes: all the FLOPs, fewer bytes.
    agp = rows["magnitude_agp"]
    assert agp["flops_ratio"] == 1.0 and agp["sparsity"] >= 0.5 - 1e-3
    assert agp["nonzero_flops_ratio"] < 0.75 and agp["bytes"] < dense["bytes"]
    # int8 stores a quarter of the bytes, at the dense FLOPs; the RL model quantized stores fewer still.
    assert rows["int8"]["bytes"] <= 0.3 * dense["bytes"]
    assert rows["int8_mean_centred"]["bytes"] <= 0.35 * dense["bytes"]
    assert rows["rl_layer_int8"]["bytes"] < rows["int8"]["bytes"]
    assert rows["rl_layer_int8"]["flops"] == rows["rl_layer"]["flops"]
    # Per-input methods report their mean density.
    for name in ("rl_input", "gate"):
        assert 0 < rows[name]["flops_ratio"] <= 1


def test_a_rerun_reuses_the_cells(run, monkeypatch):
    out, results, _ = run
    from prunegym.agents import compare as module

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(module, "METHODS", {name: dataclasses.replace(method, run=fail)
                                            for name, method in module.METHODS.items()})
    again = compare(tiny(out), log=lambda text: None)
    assert again["table"] == results["table"]


def test_a_rerun_computes_only_missing_cells(tmp_path):
    out = tmp_path / "out"
    config = tiny(out, methods=["uniform_l1", "global_l1"])
    compare(config, log=lambda text: None)
    cell = out / "cells" / "global_l1__b0.5__s0.json"
    before = cell.read_text()
    (out / "cells" / "uniform_l1__b0.5__s0.json").unlink()
    (out / "results.json").unlink()
    compare(tiny(out, methods=["uniform_l1", "global_l1"]), log=lambda text: None)
    assert cell.read_text() == before
    assert (out / "cells" / "uniform_l1__b0.5__s0.json").is_file() and (out / "results.json").is_file()


def test_a_comparison_grows_by_methods_budgets_and_seeds_with_the_cells_it_has(tmp_path):
    out = tmp_path / "out"
    compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    cell = out / "cells" / "uniform_l1__b0.5__s0.json"
    before = cell.read_text()
    grown = compare(tiny(out, methods=["uniform_l1", "global_l1"], budgets=[0.5, 0.3]), log=lambda text: None)
    assert cell.read_text() == before  # kept, not computed again
    assert {(r["method"], r["budget"]) for r in grown["rows"]} == {
        ("dense", None), ("uniform_l1", 0.5), ("uniform_l1", 0.3), ("global_l1", 0.5), ("global_l1", 0.3)}
    assert json.loads((out / "config.json").read_text())["config"]["budgets"] == [0.5, 0.3]
    narrowed = compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)  # a table of fewer cells
    assert {(r["method"], r["budget"]) for r in narrowed["rows"]} == {("dense", None), ("uniform_l1", 0.5)}
    assert (out / "cells" / "global_l1__b0.3__s0.json").is_file()  # the others stay for a later table


def test_other_settings_in_the_same_out_are_refused(tmp_path):
    out = tmp_path / "out"
    compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    with pytest.raises(ValueError, match=r"other settings.*\['finetune_epochs'\]: finetune_epochs 1 there, 2 here"):
        compare(tiny(out, methods=["uniform_l1"], finetune_epochs=2), log=lambda text: None)
    # A folder written before a setting existed continues with that setting at its default, not another.
    saved = json.loads((out / "config.json").read_text())
    del saved["config"]["supernet_sampling"]
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"other settings.*\['supernet_sampling'\]"):
        compare(tiny(out, methods=["uniform_l1"], supernet_sampling="budget"), log=lambda text: None)
    compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    # One whose default has changed since continues with the value it ran with: before importance
    # existed the supernet's channels were in L1 order, today's default is group_l1.
    saved = json.loads((out / "config.json").read_text())
    del saved["config"]["importance"]
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"other settings.*\['importance'\]: importance 'l1' there, 'group_l1' here"):
        compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    compare(tiny(out, methods=["uniform_l1"], importance="l1"), log=lambda text: None)
    # likewise the reward's task loss: the cross-entropy before the setting existed, the error rate today
    saved = json.loads((out / "config.json").read_text())
    del saved["config"]["task_loss"]
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"\['task_loss'\]: task_loss 'cross_entropy' there, 'error' here"):
        compare(tiny(out, methods=["uniform_l1"], importance="l1"), log=lambda text: None)
    results = compare(tiny(out, methods=["uniform_l1"], importance="l1", task_loss="cross_entropy"),
                      log=lambda text: None)
    assert "score an allocation" not in results["notes"]  # neither RL per-layer nor random search ran


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "something.txt").write_text("not a comparison")
    with pytest.raises(ValueError, match="not a comparison folder"):
        compare(tiny(tmp_path, methods=["uniform_l1"]), log=lambda text: None)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"budgets": [1.5]}, "budget 1.5"),
    ({"budgets": [0.0]}, "budget 0.0"),
    ({"budgets": []}, "at least one"),
    ({"budgets": [0.5, 0.5]}, "repeat"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"seeds": [-1]}, "seed must be an integer.*-1"),
    ({"methods": ["magic"]}, "magic"),
    ({"model": "nope"}, "nope"),
    ({"finetune_epochs": -1}, "finetune_epochs"),
    ({"layer_timesteps": 0}, "layer_timesteps"),
    ({"finetune_lr": 0.0}, "finetune_lr"),
    ({"input_lam": float("nan")}, "input_lam"),
    ({"threads": 0}, "threads"),
    ({"device": "tpu"}, "tpu"),
    ({"supernet_sampling": "layers"}, "supernet_sampling 'layers'"),
    ({"task_loss": "hinge"}, "task_loss 'hinge'"),
    ({"importance": "taylor"}, "importance 'taylor'"),
    ({"min_keep": 0.0}, r"min_keep must be in \(0, 1\], got 0.0"),
    ({"min_keep": 1.5}, r"min_keep must be in \(0, 1\], got 1.5"),
    ({"algo": "magic"}, "algo 'magic'"),
    ({"policy_start": "warm"}, "policy_start 'warm'"),
    ({"policy_start": "uniform", "algo": "td3"}, "policy_start 'uniform'.*got 'td3'"),
    ({"layer_hyperparameters": {"n_epochs_typo": 3}}, r"\['n_epochs_typo'\] are not arguments of PPO"),
    ({"layer_hyperparameters": [3]}, "JSON object.*3"),
    ({"supernet_sampling": "budget", "supernet_epochs": 0, "methods": ["rl_layer"]}, "budget.*supernet_epochs > 0"),
])
def test_bad_settings_name_the_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        compare(tiny(tmp_path / "out", **overrides), log=lambda text: None)
    assert not (tmp_path / "out").exists()


def test_summarize_pairs_rl_with_each_method_over_the_same_seeds():
    def row(method, seed, accuracy):
        return {"method": method, "budget": 0.25, "seed": seed, "test_accuracy": accuracy, "flops_ratio": 0.25,
                "params": 10, "bytes": 100, "latency_b1_ms": 1.0, "latency_b64_ms": 2.0}

    rl = [0.95, 0.96, 0.97, 0.98]
    other = [0.94, 0.94, 0.96, 0.99]  # RL - other: +1, +2, +1, -1 points
    rows = [row("rl_layer", s, a) for s, a in enumerate(rl)] + [row("uniform_l1", s, a) for s, a in enumerate(other)]
    rows.append(row("uniform_l1", 9, 0.10))  # a seed RL did not run is not paired
    entry = next(e for e in summarize(rows) if e["method"] == "uniform_l1")
    versus = entry["rl_minus_this"]
    diffs = np.array([1.0, 2.0, 1.0, -1.0])
    half = 3.182446305284263 * diffs.std(ddof=1) / 2  # t(0.975, 3) * s / sqrt(4)
    assert versus["mean"] == pytest.approx(0.75) and versus["n"] == 4
    assert (versus["won"], versus["lost"]) == (3, 1)
    assert versus["low"] == pytest.approx(0.75 - half) and versus["high"] == pytest.approx(0.75 + half)
    assert f"+0.75 [{0.75 - half:+.2f}, {0.75 + half:+.2f}] 3/4" in markdown_table([entry])
    assert "rl_minus_this_loss" not in entry and "test_loss" not in entry  # cells without a test loss


def test_summarize_pairs_rl_test_loss_with_each_method():
    def row(method, seed, loss):
        return {"method": method, "budget": 0.5, "seed": seed, "test_accuracy": 0.9, "test_loss": loss,
                "flops_ratio": 0.5, "params": 10, "bytes": 100, "latency_b1_ms": 1.0, "latency_b64_ms": 2.0}

    rl = [0.20, 0.30, 0.25]
    other = [0.25, 0.33, 0.24]  # RL - other: -0.05, -0.03, +0.01: RL's loss lower on two seeds
    rows = [row("rl_layer", s, v) for s, v in enumerate(rl)] + [row("random_search", s, v) for s, v in enumerate(other)]
    table = summarize(rows)
    entry = next(e for e in table if e["method"] == "random_search")
    assert entry["test_loss"] == pytest.approx(np.mean(other))
    versus = entry["rl_minus_this_loss"]
    diffs = np.array([-0.05, -0.03, 0.01])
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2) * s / sqrt(3)
    assert versus["mean"] == pytest.approx(diffs.mean()) and versus["n"] == 3
    assert (versus["won"], versus["lost"]) == (1, 2)  # won: RL's loss higher; lost: lower
    assert versus["low"] == pytest.approx(diffs.mean() - half) and versus["high"] == pytest.approx(diffs.mean() + half)
    mean = diffs.mean()
    assert f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] 2/3" in markdown_table([entry])
    assert "rl_minus_this_loss" not in next(e for e in table if e["method"] == "rl_layer")
    assert "2/3" in format_table([entry])


def test_summarize_pairs_the_searches_rewards_and_shows_them_apart():
    def row(method, seed, reward, **extra):
        return {"method": method, "budget": 0.25, "seed": seed, "test_accuracy": 0.9, "flops_ratio": 0.25,
                "params": 10, "bytes": 100, "latency_b1_ms": 1.0, "latency_b64_ms": 2.0, "best_reward": reward,
                "search_seconds": 30.0, **extra}

    rl = [-0.40, -0.30, -0.50]
    other = [-0.45, -0.32, -0.49]  # RL - random search: +0.05, +0.02, -0.01: RL's reward higher on two seeds
    rows = [row("rl_layer", s, v) for s, v in enumerate(rl)] + [row("random_search", s, v) for s, v in enumerate(other)]
    uniform_row = row("uniform_l1", 0, 0.0)
    del uniform_row["best_reward"], uniform_row["search_seconds"]
    rows.append(uniform_row)
    table = summarize(rows)
    entry = next(e for e in table if e["method"] == "random_search")
    assert entry["best_reward"] == pytest.approx(np.mean(other)) and entry["search_seconds"] == 30.0
    versus = entry["rl_minus_this_reward"]
    diffs = np.array([0.05, 0.02, -0.01])
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)
    assert versus["mean"] == pytest.approx(diffs.mean()) and (versus["won"], versus["lost"], versus["n"]) == (2, 1, 3)
    assert versus["low"] == pytest.approx(diffs.mean() - half)
    uniform = next(e for e in table if e["method"] == "uniform_l1")
    assert "best_reward" not in uniform and "rl_minus_this_reward" not in uniform  # not a search
    mean = diffs.mean()
    shown = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] 2/3"
    for text in (markdown_table(table), format_table(table)):
        search = text.split("reward", 1)[1]  # the searches' table follows the main one
        assert shown in search and "-0.4200" in search and METHODS["uniform_l1"].label not in search


def test_the_searches_rewards_reach_the_table(run):
    out, results, text = run
    rows = {r["method"]: r for r in results["rows"]}
    report = json.loads((out / "runs" / "layer__b0.5__s0" / "report.json").read_text())
    assert rows["rl_layer"]["best_reward"] == report["search"]["best_reward"]
    assert rows["rl_layer"]["search_episodes"] == report["search"]["episodes"]
    entry = next(e for e in results["table"] if e["method"] == "random_search")
    assert entry["rl_minus_this_reward"]["mean"] == pytest.approx(
        rows["rl_layer"]["best_reward"] - rows["random_search"]["best_reward"])
    assert "reward kept" in text and "reward of the allocation kept" in (out / "results.md").read_text()


def test_uniform_supernet_needs_a_supernet(tmp_path):
    with pytest.raises(ValueError, match="supernet_epochs"):
        compare(tiny(tmp_path / "out", methods=["uniform_supernet"], supernet_epochs=0), log=lambda text: None)


def test_the_search_settings_reach_rl_and_random_search(tmp_path, monkeypatch):
    """The task loss, the head re-fit and min_keep reach both, the hyperparameters and the policy's start RL,
    and min_keep the supernet that RL's env and uniform-from-supernet share: one, trained from that width up"""
    prunegym_cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNEGYM_CACHE", str(prunegym_cache))
    out = tmp_path / "out"
    results = compare(tiny(out, methods=["rl_layer", "random_search", "uniform_supernet"], task_loss="cross_entropy",
                           min_keep=0.4, layer_hyperparameters={"n_epochs": 2}, policy_start="uniform",
                           refit_head=True),
                     log=lambda text: None)
    assert not results["failed"]
    config = json.loads((out / "runs" / "layer__b0.5__s0" / "config.json").read_text())
    # the run's setting; its env's kwargs leave out the env's own default
    assert config["config"]["task_loss"] == "cross_entropy" and "task_loss" not in config["env_kwargs"]
    assert config["config"]["min_keep"] == config["env_kwargs"]["min_keep"] == 0.4
    assert config["config"]["refit_head"] is config["env_kwargs"]["refit_head"] is True
    assert config["config"]["hyperparameters"] == {"n_epochs": 2}
    assert config["config"]["policy_start"] == "uniform"
    rows = {r["method"]: r for r in results["rows"]}
    for method in ("rl_layer", "random_search"):
        assert min(rows[method]["keep_ratios"]) >= 0.4 - 1e-9, method
    assert "keep at least 0.4 of every group" in results["notes"]
    assert ("by the supernet's cross-entropy on the reward split, its classifier first re-fitted to its features "
            "of the BN-recalibration batches" in results["notes"])
    assert "first policy proposes the uniform widths" in results["notes"]
    assert [p.name for p in (prunegym_cache / "supernet").glob("digits_cnn__*.pt")] == \
        [p.name for p in (prunegym_cache / "supernet").glob("digits_cnn__*sn1_k0.4_*.pt")] != []


def test_the_rl_search_defaults_are_the_main_jobs(run):
    """RL per-layer's row is what ``train.py`` gives at the same budget: every search setting the two share
    defaults alike (the data set aside: the comparison's default is the digits as they ship)"""
    from prunegym.agents.compare import CompareConfig
    from prunegym.agents.config import DEFAULT_IMPORTANCE, TrainConfig

    compare_defaults, train_defaults = CompareConfig(), TrainConfig()
    shared = [f.name for f in dataclasses.fields(CompareConfig) if hasattr(train_defaults, f.name)]
    assert {"task_loss", "min_keep", "policy_start", "reward_model", "supernet_sampling", "algo"} <= set(shared)
    differ = {"dataset": "digits", "importance": DEFAULT_IMPORTANCE["layer"]}  # train.py resolves importance per env
    for name in shared:
        expected = differ.get(name, getattr(train_defaults, name))
        assert getattr(compare_defaults, name) == expected, name
    out, results, _ = run  # a budget: the reward is minus the error rate on the reward split, between -1 and 0
    config = json.loads((out / "runs" / "layer__b0.5__s0" / "config.json").read_text())
    assert config["config"]["task_loss"] == config["env_kwargs"]["task_loss"] == "error"
    rows = {r["method"]: r for r in results["rows"]}
    assert -1.0 <= rows["random_search"]["best_reward"] <= 0.0
    assert "by the supernet's error rate on the reward split" in results["notes"]


def test_finalists_choose_rl_and_random_search_answers_alike(tmp_path):
    out = tmp_path / "out"
    results = compare(tiny(out, methods=["rl_layer", "random_search"], finalists=2), log=lambda text: None)
    assert not results["failed"]
    rows = {r["method"]: r for r in results["rows"]}
    chosen = rows["random_search"]["finalists"]
    assert len(chosen["candidates"]) == 2
    assert rows["random_search"]["best_reward"] == chosen["candidates"][chosen["chosen"]]["reward"]
    run = json.loads((out / "runs" / "layer__b0.5__s0" / "report.json").read_text())
    assert len(run["search"]["finalists"]["candidates"]) == 2
    assert "finalists" in results["notes"]
    with pytest.raises(ValueError, match="finalists must be >= 0"):
        compare(tiny(tmp_path / "bad", finalists=-1), log=lambda text: None)


def test_budget_sampling_gives_each_budget_its_supernet(tmp_path, monkeypatch):
    """With ``supernet_sampling="budget"`` RL's search, random search and uniform-from-supernet use the
    supernet trained at their budget: one per budget, the one RL's env reads."""
    prunegym_cache = tmp_path / "cache"  # its own: the files counted are this test's alone
    monkeypatch.setenv("PRUNEGYM_CACHE", str(prunegym_cache))
    out = tmp_path / "out"
    results = compare(tiny(out, budgets=[0.3, 0.6], methods=["rl_layer", "random_search", "uniform_supernet"],
                           supernet_sampling="budget"), log=lambda text: None)
    assert not results["failed"]
    for budget in (0.3, 0.6):
        assert len(list((prunegym_cache / "supernet").glob(f"digits_cnn__*sn1_k0.25*_b{budget:g}.pt"))) == 1
        run = json.loads((out / "runs" / f"layer__b{budget:g}__s0" / "config.json").read_text())
        assert run["config"]["supernet_sampling"] == "budget"
    rows = {(r["method"], r["budget"]): r for r in results["rows"]}
    assert all(rows[(m, b)]["flops_ratio"] <= b + 1e-6 for m in ("rl_layer", "random_search", "uniform_supernet")
               for b in (0.3, 0.6))


def test_importance_orders_the_supernet_of_every_method_cut_from_it(tmp_path, monkeypatch):
    """``importance`` reaches RL's run and the supernet that RL per-layer and uniform-from-supernet cut
    from (one supernet, cached under that criterion); the notes say so."""
    prunegym_cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNEGYM_CACHE", str(prunegym_cache))
    out = tmp_path / "out"
    results = compare(tiny(out, budgets=[0.5], methods=["rl_layer", "uniform_supernet"], importance="group_l1"),
                      log=lambda text: None)
    assert not results["failed"]
    assert len(list((prunegym_cache / "supernet").glob("digits_cnn__*sn1_k0.25_group_l1_*.pt"))) == 1
    assert not list((prunegym_cache / "supernet").glob("*_k0.25_l1_*.pt"))  # no L1-ordered one
    run = json.loads((out / "runs" / "layer__b0.5__s0" / "config.json").read_text())
    assert run["config"]["importance"] == "group_l1"
    assert "in group_l1 order" in results["notes"]


def test_summarize_gives_mean_and_std_over_seeds():
    rows = [{"method": "uniform_l1", "budget": 0.5, "seed": s, "test_accuracy": a, "flops_ratio": 0.5,
             "params": 10, "bytes": 100, "bytes_ratio": 0.5, "latency_b1_ms": 1.0, "latency_b64_ms": 2.0,
             "latency_ratio_b1": 0.6, "latency_ratio_b64": 0.5} for s, a in ((0, 0.90), (1, 0.94))]
    (entry,) = summarize(rows)
    assert entry["accuracy_mean"] == pytest.approx(92.0)
    assert entry["accuracy_std"] == pytest.approx(2.828427, rel=1e-5)  # sample std of 90 and 94
    assert entry["seeds"] == 2 and entry["flops_ratio"] == 0.5
    assert "uniform L1" in format_table([entry]) and "92.00 ± 2.83" in markdown_table([entry])


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_script_help_documents_every_option():
    result = _script("--help")
    assert result.returncode == 0
    for flag in ("--model", "--dataset", "--budgets", "--seeds", "--finetune-epochs", "--out", "--methods",
                 "--distill", "--layer-timesteps", "--input-timesteps", "--device"):
        assert flag in result.stdout
    assert "``" not in result.stdout


def test_script_runs_and_reports(tmp_path):
    out = tmp_path / "out"
    result = _script("--methods", "uniform_l1", "int8", "--budgets", "0.5", "--seeds", "0", "--finetune-epochs", "1",
                     "--base-epochs", "2", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "uniform L1" in result.stdout and "int8 (PTQ)" in result.stdout
    assert (out / "results.json").is_file()


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process is POSIX")
def test_a_ctrl_c_keeps_the_finished_cells_and_says_how_to_continue(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--methods", "rl_layer", "--budgets", "0.5", "--seeds", "0",
                             "--layer-timesteps", "100000", "--base-epochs", "2", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.monotonic() + 300
    while not list((out / "cells").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the dense cell comes first; the RL search runs far longer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"1 finished cell is kept in {out / 'cells'}" in err and "same command again" in err
    assert [p.name for p in (out / "cells").iterdir()] == ["dense__-__s0.json"]
    assert not (out / "results.json").exists()


def test_an_interrupted_grid_says_what_is_kept_and_how_to_go_on(capsys):
    assert interrupted_status(None, "cell", None) == 130
    assert capsys.readouterr().err.strip() == "interrupted before any cell finished; nothing to continue from"
    assert interrupted_status(1, "cell", Path("out/cells")) == 130
    assert capsys.readouterr().err.strip() == ("interrupted; 1 finished cell is kept in out/cells. "
                                               "Run the same command again to continue from there")
    assert interrupted_status(2, "trial", Path("s/runs"), "with --out s", ", the others' checkpoints too") == 130
    assert capsys.readouterr().err.strip() == ("interrupted; 2 finished trials are kept in s/runs, the others' "
                                               "checkpoints too. Run the same command with --out s to continue "
                                               "from there")


def test_script_bad_budget_is_a_clear_error(tmp_path):
    result = _script("--budgets", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "budget 2.0" in result.stderr


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        compare(tiny(tmp_path / "out", methods=["uniform_l1"]), log=lambda text: None)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda row: {**row, "test_accuracy": 1.7}, "test_accuracy is 1.7"),
    (lambda row: {k: v for k, v in row.items() if k != "flops"}, "flops is None"),
    (lambda row: {**row, "method": "dense", "budget": None}, "method='dense'"),
    (lambda row: [row], "not a cell"),
])
def test_a_damaged_cell_is_refused_by_name(tmp_path, edit, message):
    out = tmp_path / "out"
    compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    cell = out / "cells" / "uniform_l1__b0.5__s0.json"
    cell.write_text(json.dumps(edit(json.loads(cell.read_text()))))
    with pytest.raises(ValueError, match=message) as err:
        compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    assert str(cell) in str(err.value) and "delete the file" in str(err.value)


def test_a_reused_rl_run_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "out"
    compare(tiny(out, methods=["rl_layer"]), log=lambda text: None)
    run_config = out / "runs" / "layer__b0.5__s0" / "config.json"
    data = json.loads(run_config.read_text())
    data["config"]["lam"] = 7.0
    run_config.write_text(json.dumps(data))
    (out / "cells" / "rl_layer__b0.5__s0.json").unlink()
    with pytest.raises(ValueError, match=r"other settings.*\['lam'\]"):
        compare(tiny(out, methods=["rl_layer"]), log=lambda text: None)


def test_an_out_in_use_by_another_comparison_is_refused(tmp_path):
    from prunegym.compression.locking import DirectoryLock

    out = tmp_path / "out"
    with DirectoryLock(out):  # another comparison holds it
        with pytest.raises(ValueError, match="in use by another comparison"):
            compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    assert not (out / "config.json").exists()
    compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)  # free again
    assert (out / "results.json").is_file()


def test_the_table_so_far_reads_the_finished_cells_and_writes_nothing(tmp_path):
    from prunegym.compression.locking import DirectoryLock

    out = tmp_path / "out"
    full = compare(tiny(out, methods=["uniform_l1", "global_l1"]), log=lambda text: None)
    for name in ("results.json", "results.md", "pareto.png", "cells/global_l1__b0.5__s0.json"):
        (out / name).unlink()  # as while the comparison runs: one cell to go, no final outputs yet
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    lines: list[str] = []
    with DirectoryLock(out):  # the comparison still holds its folder
        so_far = finished_table(out, log=lines.append)
    assert (so_far["finished"], so_far["cells"]) == (2, 3)
    assert [e["method"] for e in so_far["table"]] == ["dense", "uniform_l1"]
    assert so_far["table"] == [e for e in full["table"] if e["method"] != "global_l1"]  # as the final table gives them
    assert "uniform L1" in lines[0] and "2 of 3 cells finished" in lines[1]
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before

    (out / "cells" / "dense__-__s0.json").unlink()  # the seed's ratios need its dense cell
    lines.clear()
    assert finished_table(out, log=lines.append)["rows"] == []
    assert "seeds [0] are left out until their dense cell finishes" in lines[1]


def test_the_table_so_far_needs_a_comparison_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no comparison"):
        finished_table(tmp_path, log=lambda text: None)


def test_script_table_only_prints_the_table_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "out"
    compare(tiny(out, methods=["uniform_l1"]), log=lambda text: None)
    script = load_script("compare")
    assert script.main(["--table-only", "--out", str(out)]) == 0
    assert "uniform L1" in capsys.readouterr().out
    assert script.main(["--table-only", "--out", str(out), "--budgets", "0.3", "--seeds", "1"]) == 2
    assert "drop --budgets, --seeds" in capsys.readouterr().err
    assert script.main(["--table-only", "--out", str(tmp_path / "none")]) == 2
    assert "holds no comparison" in capsys.readouterr().err
