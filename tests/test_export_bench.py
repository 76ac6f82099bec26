"""scripts/export.py and scripts/bench.py run as a user runs them, with tiny budgets, under tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prunegym.agents import load_inference_model
from prunegym.compression.checkpoint import load_checkpoint

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def cache(prunegym_cache: Path) -> Path:
    """The session's model cache (conftest.py), passed to every script run explicitly."""
    return prunegym_cache


def _run(script: str, *args: str | os.PathLike, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    # One thread: on a busy machine two OpenMP threads can wait on each other for seconds.
    env = {**os.environ, "PRUNEGYM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    run = tmp / "run"
    done = _run("train.py", "--run-dir", run, "--timesteps", "32", "--base-epochs", "1", "--finetune-epochs", "0",
                "--checkpoint-freq", "32", cache=cache, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, run_dir: Path, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("export")
    done = _run("export.py", "--run-dir", run_dir, "--format", "all", "--out", out, cache=cache, cwd=out)
    assert done.returncode == 0, done.stderr
    assert "model_state.pt" in done.stdout and "model.torchscript.pt" in done.stdout
    return out


def _example(run_dir: Path, batch: int = 4) -> torch.Tensor:
    _, arch, _ = load_checkpoint(run_dir / "model.pt")
    return torch.randn(batch, arch["in_channels"], arch["image_size"], arch["image_size"],
                       generator=torch.Generator().manual_seed(1))


def test_export_writes_every_format(exported: Path):
    for name in ("model_state.pt", "model.torchscript.pt"):
        assert (exported / name).stat().st_size > 0
    assert not list(exported.glob(".*.tmp")), "a temporary file was left behind"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_matches_pruned_model(exported: Path, run_dir: Path):
    x = _example(run_dir)  # batch 4: the trace at batch 1 must not have fixed the batch size
    scripted = torch.jit.load(str(exported / "model.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), load_inference_model(run_dir)(x), rtol=1e-4, atol=1e-5)


def test_state_dict_checkpoint_reloads(exported: Path, run_dir: Path):
    model, arch, _ = load_checkpoint(exported / "model_state.pt")
    original, original_arch, _ = load_checkpoint(run_dir / "model.pt")
    # The export is the inference form: every BN of the trained model is folded into its conv.
    assert {k for k, v in original_arch["layers"].items() if v["type"] == "batchnorm"} == {
        k for k, v in arch["layers"].items() if v["type"] == "identity"}
    assert not any(v["type"] == "batchnorm" for v in arch["layers"].values())
    x = _example(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))


def test_onnx_is_valid(exported: Path):
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(exported / "model.onnx"))
    graph = onnx.load(str(exported / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_export_of_missing_run_names_it(tmp_path: Path, cache: Path):
    missing = tmp_path / "no_such_run"
    done = _run("export.py", "--run-dir", missing, "--format", "state_dict", cache=cache, cwd=tmp_path)
    assert done.returncode == 2
    assert str(missing) in done.stderr and done.stderr.startswith("error:")


def test_bench_latency_writes_ratios(tmp_path: Path, cache: Path):
    out = tmp_path / "bench.json"
    done = _run("bench.py", "--what", "latency", "--repeats", "3", "--rounds", "1", "--warmup", "1", "--threads", "1",
                "--json", out, cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    rows = figures["latency"]["pruned"]
    assert [row["target"] for row in rows] == [0.25, 0.5, 0.75]
    for row in rows:
        for key in ("flops_ratio", "latency_ratio_b1", "latency_ratio_b64", "latency_over_flops_b1",
                    "latency_over_flops_b64", "predicted_latency_ratio_b64"):
            assert row[key] > 0
        assert abs(row["flops_ratio"] - row["target"]) < 0.05
    predicted = [row["predicted_latency_ratio_b64"] for row in rows]
    # a quarter against three quarters of the FLOPs: far apart in time (a half against three quarters
    # can swap on a noisy machine, since the table times each layer once, for about 30 ms)
    assert predicted[0] < predicted[2]


def test_bench_env_runs(tmp_path: Path, cache: Path, run_dir: Path):
    # run_dir first: it caches the one-epoch base model this reuses.
    done = _run("bench.py", "--what", "env", "--episodes", "5", "--warmup-episodes", "1", "--base-epochs", "1",
                cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "steps/s" in done.stdout and "unwrapped" in done.stdout


def test_bench_parallel_times_each_number_of_env_copies(tmp_path: Path, cache: Path, run_dir: Path):
    # run_dir first: it caches the one-epoch base model and its supernet this reuses.
    done = _run("bench.py", "--what", "parallel", "--num-envs", "1,2", "--timesteps", "32", "--base-epochs", "1",
                cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line[:1] in ("1", "2") and line.endswith("x")]
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][-1] == "1.00x"
    assert "in the env's steps" in done.stdout and "2 copies at most" in done.stdout


@pytest.mark.parametrize("script", ["export.py", "bench.py"])
def test_help(script: str, tmp_path: Path, cache: Path):
    done = _run(script, "--help", cache=cache, cwd=tmp_path)
    assert done.returncode == 0 and "usage:" in done.stdout


def test_bench_proxy_scores_every_candidate_with_every_evaluation(tmp_path: Path, cache: Path):
    out, cells = tmp_path / "proxy.json", tmp_path / "cells"
    flags = ["--what", "proxy", "--model", "digits_cnn", "--budgets", "0.3", "--candidates", "4", "--finetune-seeds",
             "0,1", "--supernet-epochs", "1", "--finetune-steps", "3", "--base-epochs", "2", "--device", "cpu",
             "--cells", cells]
    done = _run("bench.py", *flags, "--finetune-epochs", "1", "--json", out, cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # (dense, supernet) x (candidates and the uniform widths) x fine-tune seeds
    assert len(list(cells.glob("*.json"))) == 2 * (4 + 1) * 2
    (r,) = json.loads(out.read_text())["proxy"]
    assert len(r["keep_counts"]) == 4 and all(0.3 * 0.97 <= f <= 0.3 + 1e-9 for f in r["flops_ratios"])
    assert r["importance"] == "group_l1"  # train.py's default order for the supernet
    assert r["uniform"]["flops_ratio"] <= 0.3 and len(r["uniform"]["keep_counts"]) == len(r["keep_counts"][0])
    for measure in ("accuracy", "loss", "reward_accuracy", "reward_loss"):
        assert {source: len(v) for source, v in r["uniform"][f"finetuned_{measure}"].items()} == {"dense": 2,
                                                                                                  "supernet": 2}
        assert all(len(per_seed) == 2 for per_seed in r[f"finetuned_{measure}"]["supernet"])
    assert set(r["finetuned_accuracy"]) == {"dense", "supernet"}
    assert all(len(per_seed) == 2 for per_seed in r["finetuned_accuracy"]["dense"])
    assert set(r["finetuned_loss"]) == {"dense", "supernet"}
    assert all(len(per_seed) == 2 and min(per_seed) > 0 for per_seed in r["finetuned_loss"]["dense"])
    names = [p["proxy"] for p in r["proxies"]]
    assert names[:4] == ["BN 2 batches", "BN 10 batches (adaptive BN)", "BN 2 batches, head re-fitted",
                         "fine-tune 3 steps"]
    assert {"supernet, BN 2 batches", "supernet, BN 2 batches, head re-fitted",
            "supernet, fine-tune 3 steps"} <= set(names)
    for proxy in r["proxies"]:
        assert len(proxy["scores"]) == 4 and proxy["seconds"] > 0
        assert {"loss", "accuracy", "distillation"} <= set(proxy["scores"][0])
    assert "ρ dense" in done.stdout and "ρ supernet loss" in done.stdout and "top-1 acc" in done.stdout
    assert done.stdout.count("against the uniform widths") == 2 and "− uniform" in done.stdout
    # the full fine-tune, the score --finalists keeps a candidate by, is a row of the table
    assert "supernet, fine-tune 1 epochs (finalists)" in done.stdout

    # A rerun continues from the saved fine-tunes (each cell's seconds come back as measured) ...
    first = {c.name: c.read_text() for c in cells.glob("*.json")}
    again = _run("bench.py", *flags, "--finetune-epochs", "1", "--json", tmp_path / "again.json", cache=cache,
                 cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    (r2,) = json.loads((tmp_path / "again.json").read_text())["proxy"]
    assert r2["finetuned_accuracy"] == r["finetuned_accuracy"] and r2["finetune_seconds"] == r["finetune_seconds"]
    assert r2["finetuned_loss"] == r["finetuned_loss"]
    assert {c.name: c.read_text() for c in cells.glob("*.json")} == first
    # A cell saved before the reward split's measures were recorded is measured again, to the same accuracy.
    old = next(iter(sorted(cells.glob("*.json"))))
    saved = json.loads(old.read_text())
    old.write_text(json.dumps({k: v for k, v in saved.items() if k != "reward_loss"}))
    assert _run("bench.py", *flags, "--finetune-epochs", "1", cache=cache, cwd=tmp_path).returncode == 0
    remeasured = json.loads(old.read_text())
    assert remeasured["accuracy"] == saved["accuracy"] and remeasured["loss"] == pytest.approx(saved["loss"])
    assert remeasured["reward_loss"] == pytest.approx(saved["reward_loss"])
    # ... and refuses cells measured with other settings, naming the cell.
    other = _run("bench.py", *flags, "--finetune-epochs", "2", cache=cache, cwd=tmp_path)
    assert other.returncode == 2 and "other settings" in other.stderr and str(cells) in other.stderr
    # Fine-tuning only the supernet's candidates scores every evaluation still, against those alone.
    alone = _run("bench.py", *flags, "--finetune-epochs", "1", "--finetune-from", "supernet", "--json",
                 tmp_path / "alone.json", cache=cache, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    (r3,) = json.loads((tmp_path / "alone.json").read_text())["proxy"]
    assert r3["finetuned_accuracy"] == {"supernet": r["finetuned_accuracy"]["supernet"]}
    assert [p["proxy"] for p in r3["proxies"]] == names
    assert "ρ supernet" in alone.stdout and "ρ dense" not in alone.stdout


def test_proxy_cells_of_several_seeds_share_a_folder(tmp_path: Path):
    """A cell's name holds its seed (seed 0's keep the names of cells saved before): seeds run into one
    --cells folder continue each from its own cells, and a cell with other settings is still refused."""
    from prunegym.agents.proxy_bench import FINETUNED_MEASURES, _finetune_cell

    settings = {"seed": 0, "source": "supernet", "budget": 0.5, "candidate": 3, "finetune_seed": 1}
    measures = {seed: dict.fromkeys(FINETUNED_MEASURES, value) for seed, value in ((0, 0.9), (1, 0.8))}
    for seed, measured in measures.items():
        assert _finetune_cell(tmp_path, {**settings, "seed": seed}, lambda m=measured: m)[0] == measured
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sourcesupernet__budget0.5__candidate3__finetune_seed1.json",
        "sourcesupernet__budget0.5__candidate3__finetune_seed1__seed1.json"]
    for seed, saved in measures.items():  # read back, not measured again
        assert _finetune_cell(tmp_path, {**settings, "seed": seed}, lambda: pytest.fail("measured again"))[0] == saved
    with pytest.raises(ValueError, match="other settings"):
        _finetune_cell(tmp_path, {**settings, "seed": 1, "finetune_epochs": 2}, lambda: measures[1])


def test_allocation_headroom_of_known_candidates():
    """Three candidates and the uniform widths, two fine-tune seeds: every figure worked out by hand."""
    from prunegym.agents.proxy_bench import allocation_headroom

    r = {"finetuned_accuracy": {"supernet": [[0.90, 0.92], [0.95, 0.93], [0.80, 0.82]]},
         "finetuned_loss": {"supernet": [[0.30, 0.20], [0.25, 0.35], [0.50, 0.40]]},
         "uniform": {"finetuned_accuracy": {"supernet": [0.91, 0.91]}, "finetuned_loss": {"supernet": [0.30, 0.30]}}}
    h = allocation_headroom(r)["supernet"]
    assert h["uniform_accuracy"] == pytest.approx(0.91) and h["uniform_loss"] == pytest.approx(0.30)
    assert h["candidates_accuracy"] == pytest.approx(5.32 / 6) and h["best_accuracy"] == pytest.approx(0.94)
    assert h["share_above"] == pytest.approx(1 / 3)  # 0.91 is not above 0.91
    assert h["seed_std"] == pytest.approx(0.0002 ** 0.5)  # each candidate's two seeds 0.02 apart
    # variance of the means [0.91, 0.94, 0.81] less the noise's share of it, 0.0002 / 2 seeds
    assert h["between_std"] == pytest.approx((0.0092667 / 2 - 0.0001) ** 0.5, rel=1e-4)
    # best after seed 0 (0.95) read after seed 1: 0.93 - 0.91; best after seed 1 (0.93) read after seed 0: 0.95 - 0.91
    assert h["oracle"] == pytest.approx(0.03)
    # lowest loss after seed 0 (0.25) read after seed 1: 0.35 - 0.30; after seed 1 (0.20), after seed 0: 0.30 - 0.30
    assert h["oracle_loss"] == pytest.approx(0.025)
    # one fine-tune seed: no oracle that its luck does not choose, and no noise to take out
    one = allocation_headroom({**r, "finetuned_accuracy": {"supernet": [[0.9], [0.95], [0.8]]},
                               "finetuned_loss": {"supernet": [[0.3], [0.25], [0.5]]},
                               "uniform": {"finetuned_accuracy": {"supernet": [0.91]},
                                           "finetuned_loss": {"supernet": [0.3]}}})["supernet"]
    assert np.isnan(one["oracle"]) and np.isnan(one["seed_std"])
    assert one["between_std"] == pytest.approx(np.std([0.9, 0.95, 0.8], ddof=1))
    assert allocation_headroom({k: v for k, v in r.items() if k != "uniform"}) == {}  # measured before the reference


def test_bench_finetune_measures_each_length_and_seed(tmp_path: Path, cache: Path):
    out = tmp_path / "finetune.json"
    done = _run("bench.py", "--what", "finetune", "--model", "digits_cnn", "--budgets", "0.3", "--epochs-list", "0,1",
                "--finetune-seeds", "0,1", "--base-epochs", "2", "--device", "cpu", "--threads", "1", "--json", out,
                cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torch.get_num_threads() = 1;" in done.stdout  # its training runs on the threads asked for
    r = json.loads(out.read_text())["finetune"]
    assert [row["epochs"] for row in r["rows"]] == [0, 1]
    assert all(len(row["accuracies"]) == 2 for row in r["rows"])
    assert r["rows"][0]["accuracies"][0] == r["rows"][0]["accuracies"][1]  # no fine-tune: no seed to differ by
    assert r["flops_ratio"] <= 0.3


def test_bench_scoring_times_both_ways_of_scoring_the_same_network(tmp_path: Path, cache: Path):
    out = tmp_path / "scoring.json"
    done = _run("bench.py", "--what", "scoring", "--model", "digits_cnn", "--budgets", "0.3,0.6", "--candidates", "3",
                "--base-epochs", "2", "--threads", "1", "--json", out, cache=cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "soft-masked ms" in done.stdout and "speed-up" in done.stdout
    r = json.loads(out.read_text())["scoring"]
    assert [row["budget"] for row in r["rows"]] == [0.3, 0.6] and r["threads"] == 1
    for row in r["rows"]:
        assert row["sliced_ms"] > 0 and row["soft-masked_ms"] > 0
        assert row["max_loss_difference"] < 1e-4


@pytest.mark.parametrize(("args", "message"), [(["--budgets", "1.5"], "FLOPs ratios"),
                                               (["--finetune-steps", "x"], "integers"),
                                               (["--finetune-from", "teacher"], "'teacher'")])
def test_bench_proxy_bad_flags_are_named(tmp_path: Path, cache: Path, args: list[str], message: str):
    done = _run("bench.py", "--what", "proxy", *args, cache=cache, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr


def test_export_of_a_user_model_run_needs_and_takes_trust_factory(run_dir: Path, tmp_path: Path, cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """A run of ``package.module:factory`` rebuilds its model by calling the factory: refused by name
    without --trust-factory, exported with it."""
    import shutil

    from prunegym.compression.checkpoint import save_checkpoint

    (tmp_path / "user_models.py").write_text(
        "from prunegym.compression.models import build_model\n\n\n"
        "def digits_cnn(in_channels, num_classes):\n"
        "    return build_model('digits_cnn', in_channels, num_classes)\n")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    model, arch, metadata = load_checkpoint(run / "model.pt")
    save_checkpoint(run / "model.pt", model, {**arch, "model": "user_models:digits_cnn"}, metadata)
    env = {**os.environ, "PRUNEGYM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, str(SCRIPTS / "export.py"), "--run-dir", str(run), "--format", "state_dict",
               "--out", str(tmp_path / "out")]
    refused = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--trust-factory" in refused.stderr, refused.stderr
    done = subprocess.run([*command, "--trust-factory"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    reloaded, _, _ = load_checkpoint(tmp_path / "out" / "model_state.pt", trust_factory=True)
    x = _example(run_dir)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), load_inference_model(run_dir)(x), atol=1e-5)


def test_export_to_a_file_is_refused_by_name(run_dir: Path, tmp_path: Path, cache: Path):
    target = tmp_path / "a_file"
    target.write_text("x")
    done = _run("export.py", "--run-dir", run_dir, "--out", target, cache=cache, cwd=tmp_path)
    assert done.returncode == 2 and str(target) in done.stderr and "Traceback" not in done.stderr


def test_bench_dynamic_reports_each_ratio_with_its_spread_over_rounds():
    from prunegym.agents.dynamic_bench import bench_dynamic, format_dynamic

    r = bench_dynamic("digits_cnn", 4, 1, inputs=2, repeats=1, rounds=2, seed=0, tune=False, batch=8,
                      batch_repeats=1)
    for prefix, rows in (("b1", r["rows"]), ("b8", r["batch_rows"])):
        for row in rows:
            assert row[f"{prefix}_ratio_low"] <= row[f"{prefix}_ratio"] <= row[f"{prefix}_ratio_high"]
            assert row[f"{prefix}_ratio_over_density"] == pytest.approx(row[f"{prefix}_ratio"] / row["density_mean"])
            assert 0 < row["density_mean"] <= 1
    export = r["rows"][-1]
    assert export["model"].endswith("TorchScript export") and export["density_mean"] == r["rows"][1]["density_mean"]
    assert r["batch_rows"][0]["density_std"] > 0  # random per-input actions: a mixed batch
    text = format_dynamic(r)
    assert "batch 1" in text and "batch 8, one mixed batch" in text and "spread" in text
