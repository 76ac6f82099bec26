"""Tests for the latency lookup table (prunegym.compression.latency) and the layer env's latency density and
latency budget: what the table times, its memo and saved state, bad input, the budget clamp with
non-monotone timings, and a resumed run keeping the timings it was rewarded with."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gymnasium
import numpy as np
import pytest
import torch
from helpers import ok, run_train
from torch import nn

from prunegym.compression import latency as latency_module
from prunegym.compression import metrics as metrics_module
from prunegym.compression.channels import ChannelGraph
from prunegym.compression.latency import LatencyTable, narrowed_within, widest_within
from prunegym.compression.models import build_model
from prunegym.compression.supernet import width_choices
from prunegym.envs import LAYER_PRUNING_ID

SMALL = {"base_epochs": 2}


def _fake_seconds(module: nn.Module, x: torch.Tensor, threads: int, min_repeats: int = 3) -> float:
    """Deterministic stand-in timings for tests of what is built on the table: in x out channels, twice
    as dear at an odd output count (the uneven cost real kernels have), plus a whole-model term."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        cin = module.weight.shape[1] * getattr(module, "groups", 1)
        cout = module.weight.shape[0]
        return 1e-6 * cin * cout * (2.0 if cout % 2 else 1.0)
    return 1.0  # the whole dense model


def _fake_relative(a: tuple[nn.Module, torch.Tensor], b: tuple[nn.Module, torch.Tensor], threads: int) -> float:
    return _fake_seconds(*a, threads) / _fake_seconds(*b, threads)


@pytest.fixture
def fake_timer(monkeypatch):
    monkeypatch.setattr(latency_module, "_timed", _fake_seconds)
    monkeypatch.setattr(latency_module, "_relative_seconds", _fake_relative)


def _resnet_table(**kwargs) -> tuple[nn.Module, ChannelGraph, LatencyTable]:
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 10).eval()
    example = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph(model, example)
    return model, graph, LatencyTable(model, graph, example, **kwargs)


# ---- the table -----------------------------------------------------------------------------------
def test_table_times_each_conv_at_its_pruned_widths_once():
    model, graph, table = _resnet_table(batch_size=4)
    dense = graph.num_channels
    assert table.density(dense) == pytest.approx(1.0)
    assert table.seconds(dense) == pytest.approx(table.dense_seconds)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert [layer.name for layer in table.layers] == convs
    assert len(table.entries) == len(convs)  # the dense widths, measured while building

    counts = dense.copy()
    counts[1] = dense[1] // 2  # layer1.0.conv1's outputs, read by layer1.0.conv2
    before = len(table.entries)
    predicted = table.seconds(counts)
    new = set(table.entries) - {k for k in list(table.entries)[:before]}
    names = {table.layers[i].name: (cin, cout) for i, cin, cout in new}
    assert names == {"layer1.0.conv1": (16, 8), "layer1.0.conv2": (8, 16)}
    assert table.seconds(counts) == predicted  # memoised: the same value, nothing timed again
    assert len(table.entries) == before + 2
    for value in table.entries.values():
        assert value > 0


def test_a_pruned_entry_is_the_dense_entry_times_their_ratio_timed_together(monkeypatch):
    timed_together, references = [], []

    def relative(a, b, threads):
        timed_together.append((a[0].weight.shape, b[0].weight.shape))
        references.append(b[0])
        return 0.25

    monkeypatch.setattr(latency_module, "_timed", _fake_seconds)
    monkeypatch.setattr(latency_module, "_relative_seconds", relative)
    _, graph, table = _resnet_table()
    counts = graph.num_channels.copy()
    counts[1] = counts[1] // 2  # layer1.0.conv1's outputs, read by layer1.0.conv2
    table.seconds(counts)
    index = {layer.name: i for i, layer in enumerate(table.layers)}
    conv1, conv2 = index["layer1.0.conv1"], index["layer1.0.conv2"]
    assert table.entries[(conv1, 16, 8)] == pytest.approx(0.25 * table.entries[(conv1, 16, 16)])
    assert table.entries[(conv2, 8, 16)] == pytest.approx(0.25 * table.entries[(conv2, 16, 16)])
    # each pruned layer timed with the same layer at its dense widths
    assert sorted(timed_together) == sorted([(torch.Size([8, 16, 3, 3]), torch.Size([16, 16, 3, 3])),
                                             (torch.Size([16, 8, 3, 3]), torch.Size([16, 16, 3, 3]))])
    # the dense layer a pruned entry is timed against is built once per layer and kept
    counts[1] = counts[1] // 4
    table.seconds(counts)
    assert len(references) == 4 and references[2] is references[0] and references[3] is references[1]


class _Clocked(nn.Module):
    """Costs ``work`` seconds of a fake clock per call, times the machine's slowness at the moment:
    the slowness grows with every call of any module (a machine drifting slower as it is timed)."""

    clock = [0.0, 1.0]  # now, slowness

    def __init__(self, work: float):
        super().__init__()
        self.work = work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.work * self.clock[1]
        self.clock[1] *= 1.05
        return x


def test_relative_seconds_cancels_a_drifting_machine(monkeypatch):
    clock = SimpleNamespace(perf_counter=lambda: _Clocked.clock[0])
    monkeypatch.setattr(metrics_module, "time", clock)
    monkeypatch.setattr(_Clocked, "clock", [0.0, 1.0])
    x = torch.zeros(1)
    ratio = latency_module._relative_seconds((_Clocked(0.002), x), (_Clocked(0.008), x), threads=1)
    assert ratio == pytest.approx(0.25, rel=0.01)
    # the same two timed one after the other: the drift between them is what they measure
    monkeypatch.setattr(_Clocked, "clock", [0.0, 1.0])
    apart = latency_module._timed(_Clocked(0.002), x, 1) / latency_module._timed(_Clocked(0.008), x, 1)
    assert apart < 0.25 * 0.7


def test_fewer_channels_predict_less_time(fake_timer):
    _, graph, table = _resnet_table()
    dense = graph.num_channels
    even = np.maximum(2, (dense // 4) * 2)  # about half of every group, even counts
    assert table.density(even) < 0.7
    odd = even + 1  # more channels, but odd: the fake kernels charge double
    assert table.density(odd) > table.density(even)


def test_state_round_trips_through_json_without_timing_again(monkeypatch):
    _, graph, table = _resnet_table(batch_size=2)
    table.seconds(np.maximum(1, graph.num_channels // 2))
    state = json.loads(json.dumps(table.state_dict()))
    other = _resnet_table(batch_size=2)[2]
    other.load_state_dict(state)
    assert other.entries == table.entries
    assert other.dense_seconds == table.dense_seconds

    def no_timing(*args):
        raise AssertionError("a loaded entry was timed again")

    monkeypatch.setattr(latency_module, "_timed", no_timing)
    monkeypatch.setattr(latency_module, "_relative_seconds", no_timing)
    half = np.maximum(1, graph.num_channels // 2)
    assert other.seconds(half) == table.seconds(half)


def test_a_resumed_table_times_new_entries_against_its_saved_dense_entries(monkeypatch):
    monkeypatch.setattr(latency_module, "_relative_seconds", _fake_relative)
    monkeypatch.setattr(latency_module, "_timed", _fake_seconds)
    _, graph, saved = _resnet_table()
    state = json.loads(json.dumps(saved.state_dict()))
    # the machine is twice as slow when the search resumes
    monkeypatch.setattr(latency_module, "_timed", lambda *args, **kwargs: 2 * _fake_seconds(*args, **kwargs))
    resumed = _resnet_table()[2]
    resumed.load_state_dict(state)
    half = np.maximum(1, graph.num_channels // 2)
    assert resumed.seconds(half) == pytest.approx(saved.seconds(half))  # new entries on the saved scale

    state["entries"] = [e for e in state["entries"] if e[0] != "layer1.0.conv1"]
    with pytest.raises(ValueError, match=r"lacks the dense entries of \['layer1.0.conv1'\]"):
        resumed.load_state_dict(state)


def test_timing_an_entry_leaves_the_global_random_stream_alone(fake_timer):
    _, graph, table = _resnet_table()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    table.seconds(np.maximum(1, graph.num_channels // 2))  # builds random layers and inputs to time
    assert torch.equal(torch.rand(3), expected)


def test_bad_input_raises_naming_it(fake_timer):
    model, graph, table = _resnet_table()
    with pytest.raises(ValueError, match="batch_size"):
        LatencyTable(model, graph, torch.randn(1, 3, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        LatencyTable(model, graph, torch.randn(1, 3, 8, 8), threads=0)
    with pytest.raises(ValueError, match="one keep count per group"):
        table.seconds([1, 2])
    too_many = graph.num_channels.copy()
    too_many[0] += 1
    with pytest.raises(ValueError, match="keep counts"):
        table.seconds(too_many)
    state = table.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        _resnet_table(batch_size=8)[2].load_state_dict(state)
    state["entries"][0][3] = -1.0
    with pytest.raises(ValueError, match="bad entry"):
        table.load_state_dict(state)


def test_grouped_conv_that_is_not_depthwise_is_refused(fake_timer):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    example = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="'2'.*groups=2"):
        LatencyTable(model, ChannelGraph(model, example), example)


# ---- the env -------------------------------------------------------------------------------------
def _episode(env, rng):
    env.reset()
    done = False
    while not done:
        _, reward, done, _, info = env.step(rng.uniform(-1, 1, 1).astype(np.float32))
    return reward, info


def test_latency_density_is_the_tables_prediction(fake_timer):
    env = gymnasium.make(LAYER_PRUNING_ID, density="latency", lam=2.0, **SMALL).unwrapped
    rng = np.random.default_rng(0)
    for _ in range(3):
        reward, info = _episode(env, rng)
        assert info["density"] == pytest.approx(env.latency.density(np.array(info["keep_counts"])))
        assert reward == pytest.approx(-info["loss"] - 2.0 * info["density"], abs=1e-12)
    env.close()


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_latency_budget_never_ends_over_the_target_with_uneven_timings(fake_timer, target):
    env = gymnasium.make(LAYER_PRUNING_ID, latency_target=target, lam=2.0, **SMALL).unwrapped
    assert env.latency is not None and env.density_kind == "flops"
    rng = np.random.default_rng(int(target * 10))
    ratios = []
    for _ in range(100):
        reward, info = _episode(env, rng)
        predicted = env.latency.density(np.array(info["keep_counts"]))
        ratios.append(predicted)
        assert predicted <= target + 1e-9
        assert reward == pytest.approx(-info["loss"], abs=1e-12)  # budget mode: lam is ignored
    assert max(ratios) > target - 0.15  # the budget binds, it does not just prune everything
    env.reset()
    done = False
    while not done:  # "keep everything" is clamped too
        _, _, done, _, info = env.step(np.ones(1, dtype=np.float32))
    assert env.latency.density(np.array(info["keep_counts"])) <= target + 1e-9
    env.close()


def test_latency_budget_below_reachable_minimum_and_bad_settings_raise(fake_timer):
    with pytest.raises(ValueError, match="latency_target"):
        gymnasium.make(LAYER_PRUNING_ID, latency_target=0.001, **SMALL)
    for kwargs, name in (({"latency_target": 0}, "latency_target"), ({"latency_target": 1.5}, "latency_target"),
                         ({"latency_batch": 0}, "latency_batch"), ({"latency_threads": -1}, "latency_threads")):
        with pytest.raises(ValueError, match=name):
            gymnasium.make(LAYER_PRUNING_ID, density="latency", **SMALL, **kwargs)


def test_env_state_carries_the_table():
    env = gymnasium.make(LAYER_PRUNING_ID, density="latency", latency_batch=4, **SMALL).unwrapped
    _episode(env, np.random.default_rng(0))
    other = gymnasium.make(LAYER_PRUNING_ID, density="latency", latency_batch=4, **SMALL).unwrapped
    other.load_state_dict(json.loads(json.dumps(env.state_dict())))
    assert other.latency.entries == env.latency.entries
    assert gymnasium.make(LAYER_PRUNING_ID, **SMALL).unwrapped.state_dict() == {}


# ---- the latency-greedy allocation -----------------------------------------------------------------
@pytest.mark.parametrize(("flops_target", "latency_target"), [(None, 0.4), (0.5, 0.6), (0.3, None)])
def test_widest_within_fills_the_budgets_and_no_group_can_grow(fake_timer, flops_target, latency_target):
    _, graph, table = _resnet_table()
    allowed = width_choices(graph, 0.25, 4)
    counts = widest_within(table, allowed, flops_target=flops_target, latency_target=latency_target)

    def within(c):
        return ((flops_target is None or graph.flops(c) <= flops_target * graph.dense_flops * (1 + 1e-9))
                and (latency_target is None or table.density(c) <= latency_target * (1 + 1e-9)))

    assert within(counts)
    assert all(c in a for c, a in zip(counts, allowed, strict=True))
    for g, choices in enumerate(allowed):  # where greedy stops, no group can widen (4 widths ahead) and fit
        for wider in choices[choices > counts[g]][:4]:
            grown = counts.copy()
            grown[g] = wider
            assert not within(grown)
    looser = widest_within(table, allowed, flops_target=None if flops_target is None else flops_target + 0.2,
                           latency_target=None if latency_target is None else latency_target + 0.2)
    assert graph.flops(looser) >= graph.flops(counts)


def test_widest_within_refuses_budgets_nothing_fits(fake_timer):
    _, graph, table = _resnet_table()
    with pytest.raises(ValueError, match="no allocation fits"):
        widest_within(table, width_choices(graph, 0.25, 4), latency_target=0.01)


def test_narrowed_within_narrows_until_the_table_puts_the_counts_within(fake_timer):
    _, graph, table = _resnet_table()
    allowed = width_choices(graph, 0.25, 4)
    full = np.array([a[-1] for a in allowed])
    for target in (0.8, 0.5, 0.3):
        counts = narrowed_within(table, allowed, full, target)
        assert table.density(counts) <= target * (1 + 1e-9)
        assert np.all(counts <= full) and all(c in a for c, a in zip(counts, allowed, strict=True))
        assert np.array_equal(narrowed_within(table, allowed, counts, target), counts)  # within: unchanged
        for g, choices in enumerate(allowed):  # widened back: no group can widen (up to its count before) and fit
            for wider in choices[(choices > counts[g]) & (choices <= full[g])][:4]:
                grown = counts.copy()
                grown[g] = wider
                assert table.density(grown) > target
    half = narrowed_within(table, allowed, full, 0.5)
    assert graph.flops(half) < graph.flops(full)
    with pytest.raises(ValueError, match="no allocation fits the latency budget 0.01"):
        narrowed_within(table, allowed, full, 0.01)
    odd = full.copy()
    odd[0] -= 1
    with pytest.raises(ValueError, match="one allowed count per group"):
        narrowed_within(table, allowed, odd, 0.5)
    with pytest.raises(ValueError, match="lookahead must be >= 1, got 0"):
        narrowed_within(table, allowed, full, 0.5, lookahead=0)


# ---- a run ---------------------------------------------------------------------------------------
def test_resumed_latency_run_keeps_its_timings(prunegym_cache, tmp_path):
    target = tmp_path / "run"
    tiny = ["--timesteps", "48", "--finetune-epochs", "1", "--base-epochs", "2", "--checkpoint-freq", "24",
            "--device", "cpu", "--density", "latency", "--lam", "0.5", "--flops-target", "none"]
    ok(run_train("--run-dir", str(target), *tiny))
    config = json.loads((target / "config.json").read_text())
    assert config["env_kwargs"]["latency_threads"] == 1
    first = json.loads((target / "checkpoints" / "state.json").read_text())["env"]["latency_table"]
    assert first["entries"]

    ok(run_train("--run-dir", str(target), "--resume", "--timesteps", "96"))
    second = json.loads((target / "checkpoints" / "state.json").read_text())["env"]["latency_table"]
    # every timing the first part measured is still there, unchanged (re-timing would change it)
    later = {(name, cin, cout): s for name, cin, cout, s in second["entries"]}
    for name, cin, cout, s in first["entries"]:
        assert later[(name, cin, cout)] == s
    assert second["dense_seconds"] == first["dense_seconds"]


def test_latency_target_is_for_the_layer_env_only(prunegym_cache, tmp_path):
    result = run_train("--env", "input", "--latency-target", "0.5", "--run-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "latency_target" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_latency_budgeted_run_reports_the_latency_greedy_baseline(prunegym_cache, tmp_path):
    target = tmp_path / "run"
    ok(run_train("--run-dir", str(target), "--timesteps", "48", "--finetune-epochs", "1", "--base-epochs", "2",
                 "--supernet-epochs", "0", "--device", "cpu", "--flops-target", "0.6", "--latency-target", "0.7",
                 "--channel-multiple", "4"))
    report = json.loads((target / "report.json").read_text())
    greedy = report["results"]["latency_greedy"]
    assert greedy["flops_ratio"] <= 0.6 + 1e-6
    assert greedy["flops_ratio"] >= report["results"]["rl"]["flops_ratio"] - 0.15  # it spends the budget
    assert (target / "latency_greedy.pt").is_file()
    assert "uniform_l1" not in report["results"]  # no supernet: the uniform model is pruned from the dense one
    from prunegym.agents import load_inference_model

    assert load_inference_model(target, name="latency_greedy") is not None


def test_the_job_keeps_the_best_allocation_whose_measured_latency_is_within_the_budget(fake_timer, monkeypatch):
    from prunegym.agents import run_layer

    env = gymnasium.make(LAYER_PRUNING_ID, latency_target=0.9, **SMALL).unwrapped
    full = env.graph.num_channels
    infos = [env.evaluate_counts(np.maximum(1, full * k // 8)) for k in (7, 5, 3)]
    final = ("final deterministic policy", -0.3, infos[0])
    top = [{"episode": 4, "reward": r, **info} for r, info in ((-0.2, infos[1]), (-0.5, infos[2]), (-0.6, infos[0]))]
    candidates = run_layer._candidates(final, top)
    assert [(c[0], c[1]) for c in candidates] == [("best search episode", -0.2), ("final deterministic policy", -0.3),
                                                  ("search episode 4", -0.5)]  # the repeated allocation once
    logged = []

    timed = []
    real_ratio = run_layer.relative_latency

    def measured(model, dense, x, **kwargs):  # the candidates in turn, best reward first, each against the dense
        timed.append(real_ratio(model, dense, x, **{**kwargs, "blocks": 2}))
        return [0.9, 0.7, 0.5][len(timed) - 1]

    monkeypatch.setattr(run_layer, "relative_latency", measured)
    check, kept = run_layer.measured_latency_check(env, candidates, 1, logged.append)
    assert check["chosen"] == 0 and check["within"] and kept == candidates[0]  # the rest are not timed
    assert [c["measured_latency_ratio"] for c in check["candidates"]] == [0.9, None, None]
    assert len(timed) == 1 and 0 < timed[0] < 1.5
    env.latency_target = 0.8
    timed.clear()
    check, kept = run_layer.measured_latency_check(env, candidates, 1, logged.append)
    assert check["chosen"] == 1 and check["within"] and kept == candidates[1]
    assert [c["measured_latency_ratio"] for c in check["candidates"]] == [0.9, 0.7, None]
    assert all(0 < c["predicted_latency_ratio"] <= 1 for c in check["candidates"])
    with pytest.raises(ValueError, match="no candidates"):
        run_layer.measured_latency_check(env, [], 1, logged.append)
    env.close()


def test_when_no_candidate_is_within_the_check_narrows_the_best_and_times_it_again(fake_timer, monkeypatch):
    from prunegym.agents import run_layer

    env = gymnasium.make(LAYER_PRUNING_ID, latency_target=0.4, **SMALL).unwrapped
    full = env.graph.num_channels
    # allowed counts near 7/8, 5/8 and 3/8 of each group
    infos = [env.evaluate_counts(np.array([a[min(np.searchsorted(a, c * k / 8), len(a) - 1)]
                                           for a, c in zip(env.allowed, full, strict=True)])) for k in (7, 5, 3)]
    candidates = [("best search episode", -0.2, infos[0]), ("final deterministic policy", -0.3, infos[1]),
                  ("search episode 4", -0.5, infos[2])]
    measures = []

    def measured(model, dense, x, **kwargs):
        measures.append(next(values))
        return measures[-1]

    monkeypatch.setattr(run_layer, "relative_latency", measured)
    logged = []
    values = iter([0.9, 0.7, 0.5, 0.45, 0.38])  # the three over 0.4; narrowed once, 0.45; twice, 0.38
    check, kept = run_layer.measured_latency_check(env, candidates, 1, logged.append)
    assert check["within"] and check["chosen"] == 4
    narrowed = check["candidates"][3:]
    assert [c["source"] for c in narrowed] == ["best search allocation narrowed (1)",
                                               "best search allocation narrowed (2)"]
    assert [c["measured_latency_ratio"] for c in check["candidates"]] == [0.9, 0.7, 0.5, 0.45, 0.38]
    # each narrowed to the budget over the table's error just measured (0.9 and 0.45 measured for the last timed)
    assert narrowed[0]["predicted_latency_ratio"] <= 0.4 * infos[0]["latency_ratio"] / 0.9 * (1 + 1e-9)
    assert narrowed[1]["predicted_latency_ratio"] <= 0.4 * narrowed[0]["predicted_latency_ratio"] / 0.45 * (1 + 1e-9)
    assert np.all(np.array(narrowed[1]["keep_counts"]) <= np.array(narrowed[0]["keep_counts"]))
    assert np.all(np.array(narrowed[0]["keep_counts"]) <= np.array(infos[0]["keep_counts"]))
    assert kept[0] == "best search allocation narrowed (2)" and kept[2]["keep_counts"] == narrowed[1]["keep_counts"]
    assert kept[1] == pytest.approx(env.reward_of(env.evaluate_counts(np.array(kept[2]["keep_counts"]))))
    assert "the best narrowed 2 time(s), #5, is" in logged[-1]

    values = iter([0.9, 0.7, 0.5] + [0.6] * run_layer.NARROWING_STEPS)  # narrowing never gets within
    check, kept = run_layer.measured_latency_check(env, candidates, 1, logged.append)
    assert not check["within"] and check["chosen"] == 2 and kept == candidates[2]  # the fastest, said so
    assert 3 < len(check["candidates"]) <= 3 + run_layer.NARROWING_STEPS
    assert "keeping the fastest, #3" in logged[-1]
    env.close()
