"""``scripts/sweep.py`` on Ray Tune: a grid of train.py runs with its table and front, an interrupted
sweep resumed with no trial run twice to completion, and bad settings refused by name."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from prunegym.agents import TrainConfig
from prunegym.agents.config import main_defaults
from prunegym.agents.sweep import SweepConfig, _train_config, sweep

pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[distributed]')")

SCRIPT = ROOT / "scripts" / "sweep.py"
TINY = ["--set", "flops_target=none", "--set", "timesteps=64", "--set", "base_epochs=2", "--set", "finetune_epochs=1",
        "--set", "supernet_epochs=1", "--set", "checkpoint_freq=16"]  # no budget: the grid's λ prices density


def test_an_interrupted_sweep_resumes_without_running_a_finished_trial_again(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, str(SCRIPT), "--grid", "lam=0.5,1,2", *TINY, "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((out / "runs").glob("*/report.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C mid-sweep: one trial done, one running
    printed = proc.communicate(timeout=300)[0]
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/report.json")}
    assert 1 <= len(finished) < 3
    # Tune saves its state and stops; the script says what is kept and how to go on, and writes no results.
    assert proc.returncode == 130, printed
    kept = "1 finished trial is" if len(finished) == 1 else f"{len(finished)} finished trials are"
    assert f"interrupted; {kept} kept in {out / 'runs'}" in printed, printed
    assert f"Run the same command with --out {out} --trust-sweep to continue" in printed, printed
    assert "Traceback" not in printed, printed
    assert not any((out / name).exists() for name in ("results.json", "results.md", "front.png"))

    # Tune's saved state is pickled: continuing it is refused without the trust flag, touching nothing.
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--trust-sweep" in refused.stderr, refused.stderr
    again = subprocess.run([*command, "--trust-sweep"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == [] and len(results["trials"]) == 3
    assert sorted(t["params"]["lam"] for t in results["trials"]) == [0.5, 1.0, 2.0]
    for name, mtime in finished.items():  # read back, not run again
        assert (out / "runs" / name / "report.json").stat().st_mtime_ns == mtime
    assert len(list((out / "runs").glob("*/report.json"))) == 3
    # The table and the plot of the front: every trial, sorted by FLOPs; a larger λ buys fewer FLOPs.
    flops = [t["flops_ratio"] for t in results["trials"]]
    assert flops == sorted(flops)
    by_lam = {t["params"]["lam"]: t["flops_ratio"] for t in results["trials"]}
    assert by_lam[2.0] < by_lam[0.5]
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["config"]["main_defaults"] == main_defaults()
    table = (out / "results.md").read_text()
    assert table.count("\n| lam=") == 3 and "*" in table


def test_a_failing_trial_is_listed_and_the_others_kept(tmp_path):
    """A trial that fails after the sweep's checks (here PPO refuses one-step rollouts, which A2C takes)
    is tried again, then listed with its error; the others' results are written, and the exit status
    and message say how to retry it."""
    out = tmp_path / "sweep"
    result = subprocess.run([sys.executable, str(SCRIPT), "--grid", "algo=ppo,a2c", "--set",
                             'hyperparameters={"n_steps": 1}', *TINY, "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"1 trial(s) failed (listed above); run the same command again with --out {out} --trust-sweep "
            "to retry them") in result.stderr, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [t["params"] for t in results["trials"]] == [{"algo": "a2c"}]
    assert [f["params"] for f in results["failed"]] == [{"algo": "ppo"}]
    assert "PPO refused the hyperparameters {'n_steps': 1}" in results["failed"][0]["error"]
    assert "Failed (run the sweep again to retry): {'algo': 'ppo'}" in (out / "results.md").read_text()


def test_a_hyperparameter_search_runs_optuna_trials(tmp_path):
    config = SweepConfig(settings={"timesteps": 64, "base_epochs": 2, "finetune_epochs": 1, "supernet_epochs": 1,
                                   "flops_target": 0.5},
                         search={"learning_rate": "loguniform:1e-4:1e-2"}, trials=2, out=str(tmp_path / "s"))
    results = sweep(config, log=lambda _: None)
    rates = [t["params"]["learning_rate"] for t in results["trials"]]
    assert len(rates) == 2 and all(1e-4 <= r <= 1e-2 for r in rates)
    for t in results["trials"]:
        saved = json.loads((tmp_path / "s" / "runs" / t["run_dir"].split("/")[-1] / "config.json").read_text())
        assert saved["config"]["hyperparameters"] == {"learning_rate": t["params"]["learning_rate"]}
        assert t["flops_ratio"] <= 0.5 + 1e-6


@pytest.mark.parametrize("settings, message", [
    (dict(grid={"lam": [1, 2]}, settings={"lam": 1}), "both as fixed settings and as a grid"),
    (dict(settings={"seed": 1}), "needs a grid"),
    (dict(grid={"lamb": [1, 2]}), "'lamb' is not a setting of train.py"),
    (dict(search={"learning_rate": "normal:0:1"}), "one of ('uniform'"),
    (dict(search={"learning_rate": "loguniform:0:1"}), "LOW < HIGH, both > 0"),
    (dict(search={"learning_rat": "loguniform:1e-4:1e-2"}), "['learning_rat'] are not arguments of"),
    (dict(search={"min_keep": "uniform:0.5:1.5"}), "min_keep must be in (0, 1], got 1.5"),  # a range's end
    (dict(search={"min_keep": "choice:0.5|0"}), "min_keep must be in (0, 1], got 0"),  # any of a choice
    (dict(settings={"seed": 1}, search={"seed": "randint:0:9"}), "both as fixed settings and as a search"),
    (dict(grid={"lam": [1, 2]}, settings={"run_dir": "x"}), "set by the sweep"),
    (dict(grid={"lam": [-1, 2]}), "lam"),
    (dict(grid={"lam": []}), "one or more values"),
    (dict(grid={"lam": [1]}, trials=0), "trials must be >= 1"),
    (dict(grid={"lam": [1, 2]}, workers=2, address="auto"), "give one of the two"),
    (dict(grid={"lam": [1, 2]}), "['lam'] price density only without a budget"),  # the default budget
])
def test_bad_sweeps_are_refused_by_name(tmp_path, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sweep(SweepConfig(**settings, out=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()


def test_the_script_refuses_bad_values_before_starting(tmp_path):
    for args, message in ((["--grid", "lam=1,x"], "expected a number, got 'x'"),
                          (["--grid", "lam=1,2", "--grid", "lam=3"], "names ['lam'] more than once")):
        result = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "s")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()


def test_a_sweep_runs_its_trials_with_the_defaults_it_began_with():
    """A sweep folder from before the main job's defaults changed records none, and its trials keep the
    first ones (digits, no budget, cross-entropy, L1 order); a new one records today's, and one that
    recorded them before the channel order's changed keeps the L1 order."""
    old = _train_config(SweepConfig(grid={"lam": [1.0]}), {"lam": 1.0}, "")
    assert (old.dataset, old.flops_target, old.task_loss) == ("digits", None, "cross_entropy")
    new = _train_config(SweepConfig(grid={"seed": [0]}, main_defaults=main_defaults()), {"seed": 0}, "")
    assert (new.dataset, new.flops_target, new.task_loss) == (TrainConfig().dataset, 0.2, "error")
    new.validate()
    assert new.importance == "group_l1"  # resolved for the layer env when the trial runs
    assert old.importance == "l1"
    # A sweep that recorded its defaults before the importance's changed keeps the L1 order.
    before = {"dataset": "digits_distorted", "flops_target": 0.2, "task_loss": "error"}
    kept = _train_config(SweepConfig(grid={"seed": [0]}, main_defaults=before), {"seed": 0}, "")
    assert (kept.dataset, kept.flops_target, kept.task_loss) == ("digits_distorted", 0.2, "error")
    assert kept.importance == "l1"
