"""Tests for prunegym.compression.supernet: width choices, sampling, the sandwich-rule training,
the cache, and LayerPruning-v0 searching a supernet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import trained_digits_cnn

from prunegym.compression.channels import ChannelGraph, SoftMask, recalibrate_bn
from prunegym.compression.data import load_dataset
from prunegym.compression.importance import L1Importance
from prunegym.compression.supernet import (
    make_supernet,
    prefix_kept,
    sample_keep_counts,
    supernet_model,
    width_choices,
)
from prunegym.compression.training import evaluate


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits", 0)
    return splits, trained_digits_cnn(splits.train)


def _narrow_accuracy(model, splits, keep=0.25) -> float:
    """Reward-split accuracy of the model's first ``keep`` of every group, BN recalibrated."""
    graph = ChannelGraph(model, splits.train.x[:1])
    counts = np.maximum(1, np.ceil(keep * graph.num_channels)).astype(int)
    mask = SoftMask(model, graph)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        mask.set(prefix_kept(counts))
        recalibrate_bn(model, [splits.train.x[i:i + 128] for i in range(0, 512, 128)])
        return evaluate(model, splits.reward)[1]
    finally:
        mask.remove()
        model.load_state_dict(state)


def test_width_choices_run_from_min_keep_to_every_channel(digits):
    splits, model = digits
    graph = ChannelGraph(model, splits.train.x[:1])
    choices = width_choices(graph, 0.25)
    for c, n in zip(choices, graph.num_channels, strict=True):
        assert c[0] == int(np.ceil(0.25 * n)) and c[-1] == n and np.all(np.diff(c) == 1)
    rng = np.random.default_rng(0)
    draws = np.stack([sample_keep_counts(choices, rng) for _ in range(200)])
    for g, c in enumerate(choices):
        assert set(draws[:, g]) <= set(c.tolist()) and len(set(draws[:, g])) > len(c) // 2
    with pytest.raises(ValueError, match="min_keep"):
        width_choices(graph, 0.0)


def test_extremes_put_groups_at_their_floor_or_full_width_that_often():
    choices = [np.arange(4, 17), np.arange(8, 33)]
    plain = [sample_keep_counts(choices, np.random.default_rng(1)) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in
               zip(plain, [sample_keep_counts(choices, np.random.default_rng(1), 0.0) for _ in range(3)], strict=True))
    rng = np.random.default_rng(0)
    for extremes in (0.0, 0.5, 1.0):
        draws = np.stack([sample_keep_counts(choices, rng, extremes) for _ in range(4000)])
        for g, c in enumerate(choices):
            at_floor, at_full = np.mean(draws[:, g] == c[0]), np.mean(draws[:, g] == c[-1])
            expected = extremes / 2 + (1 - extremes) / len(c)
            assert abs(at_floor - expected) < 0.03 and abs(at_full - expected) < 0.03, (extremes, g)
            assert set(draws[:, g]) <= set(c.tolist())
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="extremes"):
            sample_keep_counts(choices, rng, bad)


def test_prefix_kept_keeps_the_first_channels():
    kept = prefix_kept([3, 1])
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0]]


def test_zero_epochs_only_reorders_the_channels(digits):
    splits, model = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    supernet = make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), epochs=0, min_keep=0.25)
    x = splits.test.x[:64]
    torch.testing.assert_close(supernet(x), model(x), rtol=1e-4, atol=1e-4)
    for key, value in model.state_dict().items():  # the model given is left as it was
        assert torch.equal(value, before[key]), key
    # In L1 order: the first filter of each conv has the largest L1 norm.
    norms = supernet.features[0].weight.abs().flatten(1).sum(1)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-6)


def test_supernet_training_makes_narrow_subnetworks_accurate_without_finetuning(digits):
    splits, model = digits
    supernet = make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), epochs=3, min_keep=0.25)
    reordered = make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), epochs=0, min_keep=0.25)
    narrow_before, narrow_after = _narrow_accuracy(reordered, splits), _narrow_accuracy(supernet, splits)
    assert narrow_after > narrow_before + 0.2, (narrow_before, narrow_after)
    assert narrow_after > 0.5
    assert evaluate(supernet, splits.reward)[1] > 0.9  # the full width stays accurate
    assert not supernet.training


def test_supernet_model_is_cached(digits, tmp_path, monkeypatch):
    prunegym_cache = tmp_path / "cache"  # its own: the files counted are this test's alone
    monkeypatch.setenv("PRUNEGYM_CACHE", str(prunegym_cache))
    splits, model = digits
    kwargs = dict(base_epochs=5, epochs=1, min_keep=0.5, importance=L1Importance())
    first, seconds = supernet_model("digits_cnn", model, splits, 0, **kwargs)
    files = list((prunegym_cache / "supernet").glob("digits_cnn__*sn1_k0.5_l1*.pt"))
    assert len(files) == 1
    second, cached_seconds = supernet_model("digits_cnn", model, splits, 0, **kwargs)
    assert seconds > 0 and cached_seconds == seconds
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    supernet_model("digits_cnn", model, splits, 0, extremes=0.5, **kwargs)  # another setting, another file
    assert len(list((prunegym_cache / "supernet").glob("digits_cnn__*sn1_k0.5_l1*.pt"))) == 2
    assert len(list((prunegym_cache / "supernet").glob("digits_cnn__*sn1_k0.5_l1*_x0.5.pt"))) == 1
    supernet_model("digits_cnn", model, splits, 0, budget=0.6, **kwargs)  # one supernet per search budget
    assert len(list((prunegym_cache / "supernet").glob("digits_cnn__*sn1_k0.5_l1*_b0.6.pt"))) == 1


@pytest.mark.parametrize(("kwargs", "match"), [({"epochs": -1}, "epochs"), ({"epochs": 1, "candidates": -1},
                                                                           "candidates"),
                                               ({"epochs": 1, "extremes": 2.0}, "extremes")])
def test_bad_settings_are_refused_by_name(digits, kwargs, match):
    splits, model = digits
    with pytest.raises(ValueError, match=match):
        make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), min_keep=0.25, **kwargs)


def test_a_budget_supernet_trains_the_full_width_and_candidates_at_its_budget_only(digits, monkeypatch):
    from prunegym.compression.slicing import ChannelSlicer

    splits, model = digits
    widths = []
    forward = ChannelSlicer.forward

    def recording(self, kept, *args):
        widths.append([len(k) for k in kept])
        return forward(self, kept, *args)

    monkeypatch.setattr(ChannelSlicer, "forward", recording)
    supernet = make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), epochs=1, min_keep=0.25,
                             budget=0.3)
    graph = ChannelGraph(supernet, splits.train.x[:1])
    batches = -(-len(splits.train) // 64)
    assert len(widths) == 2 * batches  # two candidates per batch; no narrowest width
    for counts in widths:
        assert 0.3 * 0.97 <= graph.flops(np.array(counts)) / graph.dense_flops <= 0.3 + 1e-9, counts
    plain = make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), epochs=1, min_keep=0.25)
    assert not torch.equal(supernet.features[0].weight, plain.features[0].weight)


@pytest.mark.parametrize(("kwargs", "match"), [({"budget": 0.0}, "budget must be a FLOPs ratio.*0.0"),
                                               ({"budget": 1.5}, "budget must be a FLOPs ratio.*1.5"),
                                               ({"budget": 0.3, "extremes": 0.5}, "budget=0.3 and extremes=0.5")])
def test_bad_budgets_are_refused_by_name(digits, prunegym_cache, kwargs, match):
    splits, model = digits
    with pytest.raises(ValueError, match=match):
        make_supernet(model, splits.train.x[:1], splits.train, L1Importance(), epochs=1, min_keep=0.25, **kwargs)
    with pytest.raises(ValueError, match=match):
        supernet_model("digits_cnn", model, splits, 0, base_epochs=5, epochs=1, min_keep=0.25,
                       importance=L1Importance(), **kwargs)


def test_layer_env_searches_the_supernet(digits):
    from prunegym.envs import LayerPruningEnv

    splits, model = digits
    plain = LayerPruningEnv(model=model, dataset=splits, flops_target=0.2)
    env = LayerPruningEnv(model=model, dataset=splits, flops_target=0.2, supernet_epochs=3)
    assert env.dense is not env.model and plain.dense is plain.model
    assert [r.tolist() for r in env.ranking] == [list(range(n)) for n in env.graph.num_channels]
    counts = env.min_counts
    assert env.evaluate_counts(counts)["accuracy"] > plain.evaluate_counts(counts)["accuracy"] + 0.2
    env.reset(seed=0)
    done = False
    while not done:
        _, reward, done, _, info = env.step(env.action_space.sample())
    assert info["flops_ratio"] <= 0.2 + 1e-9 and reward == -info["loss"]
    with pytest.raises(ValueError, match="supernet_epochs"):
        LayerPruningEnv(model=model, dataset=splits, supernet_epochs=-1)
    with pytest.raises(ValueError, match="supernet_extremes.*-1"):
        LayerPruningEnv(model=model, dataset=splits, supernet_epochs=1, supernet_extremes=-1)


def test_layer_env_trains_its_supernet_with_extremes(digits):
    """``supernet_extremes`` reaches the supernet's training: at 0 the same supernet as without it, at 1
    only the narrowest and widest widths are trained, a different supernet."""
    from prunegym.envs import LayerPruningEnv

    splits, model = digits
    envs = [LayerPruningEnv(model=model, dataset=splits, flops_target=0.3, supernet_epochs=1, **kwargs)
            for kwargs in ({}, {"supernet_extremes": 0.0}, {"supernet_extremes": 1.0})]
    weights = [torch.cat([p.flatten() for p in env.model.parameters()]) for env in envs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_layer_env_trains_its_supernet_at_its_budget(digits):
    """``supernet_sampling="budget"`` trains the supernet on the candidates at the env's FLOPs target:
    another supernet than the uniform one; it needs the target, a supernet and no extremes."""
    from prunegym.envs import LayerPruningEnv

    splits, model = digits
    uniform = LayerPruningEnv(model=model, dataset=splits, flops_target=0.3, supernet_epochs=1)
    budget = LayerPruningEnv(model=model, dataset=splits, flops_target=0.3, supernet_epochs=1,
                             supernet_sampling="budget")
    assert budget.supernet_sampling == "budget" and uniform.supernet_sampling == "uniform"
    assert not torch.equal(budget.model.features[0].weight, uniform.model.features[0].weight)
    assert [r.tolist() for r in budget.ranking] == [list(range(n)) for n in budget.graph.num_channels]
    for kwargs, match in (({"flops_target": None, "supernet_epochs": 1}, "needs flops_target.*None"),
                          ({"flops_target": 0.3, "supernet_epochs": 0}, "supernet_epochs > 0"),
                          ({"flops_target": 0.3, "supernet_epochs": 1, "supernet_extremes": 0.5},
                           "no supernet_extremes.*0.5")):
        with pytest.raises(ValueError, match=match):
            LayerPruningEnv(model=model, dataset=splits, supernet_sampling="budget", **kwargs)
    with pytest.raises(ValueError, match="supernet_sampling must be one of.*'layers'"):
        LayerPruningEnv(model=model, dataset=splits, supernet_epochs=1, supernet_sampling="layers")


def test_layer_env_can_score_supernet_candidates_on_the_dense_model(digits):
    from prunegym.compression.channels import prune_channels
    from prunegym.envs import LayerPruningEnv

    splits, model = digits
    plain = LayerPruningEnv(model=model, dataset=splits, flops_target=0.3)
    env = LayerPruningEnv(model=model, dataset=splits, flops_target=0.3, supernet_epochs=1, reward_model="dense")
    counts = np.array([a[len(a) // 2] for a in env.allowed])
    # The reward is the dense model's, soft-masked (AMC's), exactly as without a supernet ...
    assert env.evaluate_counts(counts)["loss"] == pytest.approx(plain.evaluate_counts(counts)["loss"], abs=1e-6)
    # ... and the winner is cut from the supernet: its prefixes, the same channels as the dense model's ranking.
    assert [k.tolist() for k in env.kept_channels(counts)] == [list(range(int(c))) for c in counts]
    pruned = prune_channels(env.model, env.graph, env.kept_channels(counts))
    assert [int(c) for c in ChannelGraph(pruned, splits.train.x[:1]).num_channels] == counts.tolist()
    plain.close(), env.close()
    with pytest.raises(ValueError, match="reward_model"):
        LayerPruningEnv(model=model, dataset=splits, supernet_epochs=1, reward_model="teacher")
    with pytest.raises(ValueError, match="supernet_epochs > 0"):
        LayerPruningEnv(model=model, dataset=splits, reward_model="dense")
