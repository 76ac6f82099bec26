"""Tests for prunegym.compression.sparsity: the static sparsity baselines (uniform and global keep counts,
random channels, network slimming's penalty, torch-pruning's magnitude pruner) and unstructured gradual
magnitude pruning (agp_sparsity, MagnitudePruner, weight_sparsity, sparse_bytes)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import randomize_bn, trained_digits_cnn
from torch import nn

from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.data import Split, load_dataset
from prunegym.compression.importance import BNScaleImportance, L1Importance, L2Importance
from prunegym.compression.metrics import count_flops, model_bytes
from prunegym.compression.models import build_model
from prunegym.compression.sparsity import (
    MagnitudePruner,
    agp_sparsity,
    global_keep_counts,
    random_kept,
    slimming_penalty,
    sparse_bytes,
    torch_pruning_magnitude,
    uniform_keep_counts,
    weight_sparsity,
)
from prunegym.compression.training import evaluate, train_classifier

SIZE = 8
ZOO = {"digits_cnn": 1, "resnet20": 3, "vgg_small": 3}  # name -> in_channels
BUDGETS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)


def _zoo_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model(name, ZOO[name], 10), seed).eval()


def _example(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, ZOO[name], SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zoo():
    """name -> (model, graph) of randomly initialised zoo models (random BN, so every channel matters)."""
    return {name: (model := _zoo_model(name), ChannelGraph(model, _example(name))) for name in ZOO}


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", 0)


@pytest.fixture(scope="module")
def trained(splits):
    """A digits CNN trained briefly on digits (well above chance), and its channel graph."""
    model = trained_digits_cnn(splits.train)
    return model, ChannelGraph(model, splits.train.x[:1])


def _normalised_scores(graph: ChannelGraph, importance, model: nn.Module | None = None) -> list[np.ndarray]:
    model = graph.model if model is None else model
    out = []
    for group in graph.groups:
        s = importance(model, group).double()
        out.append((s / s.max()).numpy())
    return out


# ---- uniform_keep_counts -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_uniform_counts_fit_the_budget_and_grow_with_it(zoo, name):
    _, graph = zoo[name]
    previous = None
    for budget in BUDGETS:
        counts = uniform_keep_counts(graph, budget)
        assert counts.shape == (len(graph.groups),) and counts.dtype == np.int64
        assert np.all(counts >= 1) and np.all(counts <= graph.num_channels)
        assert graph.flops(counts) <= budget * graph.dense_flops * (1 + 1e-9)
        if previous is not None:
            assert np.all(counts >= previous), (budget, counts, previous)  # monotone in the budget
        previous = counts
    np.testing.assert_array_equal(uniform_keep_counts(graph, 1.0), graph.num_channels)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_uniform_counts_share_one_keep_ratio(zoo, name, budget):
    _, graph = zoo[name]
    counts = uniform_keep_counts(graph, budget)
    ratios = counts / graph.num_channels
    # Each count is the nearest to r·n for one ratio r: ratios differ by at most half a channel each side.
    slack = 0.5 / graph.num_channels
    assert ratios.max() - ratios.min() <= slack[ratios.argmax()] + slack[ratios.argmin()] + 1e-12, ratios
    # ... and the ratio is the largest that fits, so the FLOPs use most of the budget.
    assert graph.flops(counts) >= 0.8 * budget * graph.dense_flops


def test_uniform_counts_respect_the_multiple(zoo):
    _, graph = zoo["resnet20"]
    counts = uniform_keep_counts(graph, 0.5, multiple=8)
    assert all(c % 8 == 0 or c == n for c, n in zip(counts, graph.num_channels, strict=True)), counts
    assert graph.flops(counts) <= 0.5 * graph.dense_flops * (1 + 1e-9)


def test_uniform_counts_keep_one_channel_when_nothing_fits(zoo):
    _, graph = zoo["digits_cnn"]
    counts = uniform_keep_counts(graph, 1e-6)
    np.testing.assert_array_equal(counts, np.ones(len(graph.groups)))


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, math.nan])
def test_uniform_counts_reject_a_bad_budget(zoo, bad):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError, match=f"flops_ratio must be in \\(0, 1\\], got {bad}"):
        uniform_keep_counts(graph, bad)


# ---- global_keep_counts --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("normalize", [True, False])
def test_global_counts_fit_the_budget_and_grow_with_it(zoo, name, normalize):
    _, graph = zoo[name]
    previous = None
    for budget in BUDGETS:
        counts = global_keep_counts(graph, L1Importance(), budget, normalize=normalize)
        assert counts.shape == (len(graph.groups),) and counts.dtype == np.int64
        assert np.all(counts >= 1) and np.all(counts <= graph.num_channels)
        assert graph.flops(counts) <= budget * graph.dense_flops * (1 + 1e-9)
        if previous is not None:
            assert np.all(counts >= previous), (budget, counts, previous)  # one threshold: it only moves down
        previous = counts
    np.testing.assert_array_equal(previous, graph.num_channels)  # budget 1: everything stays


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_global_counts_are_one_threshold_and_the_lowest_that_fits(zoo, budget):
    _, graph = zoo["resnet20"]
    counts = global_keep_counts(graph, L2Importance(), budget)
    scores = [np.sort(s)[::-1] for s in _normalised_scores(graph, L2Importance())]
    kept = np.concatenate([s[:c] for s, c in zip(scores, counts, strict=True)])
    dropped = np.concatenate([s[c:] for s, c in zip(scores, counts, strict=True)])
    assert dropped.size > 0
    assert kept.min() >= dropped.max()  # every channel kept outscores every channel dropped, across layers
    # The next lower threshold (keeping the best dropped channel too) would break the budget.
    looser = np.array([int((s >= dropped.max()).sum()) for s in scores])
    assert graph.flops(looser) > budget * graph.dense_flops


def test_normalisation_can_change_the_counts(trained):
    model, graph = trained
    normalised = global_keep_counts(graph, L1Importance(), 0.5, normalize=True)
    raw = global_keep_counts(graph, L1Importance(), 0.5, normalize=False)
    assert not np.array_equal(normalised, raw)


def test_normalisation_makes_the_counts_blind_to_one_layers_scale(zoo):
    model, graph = zoo["digits_cnn"]
    scaled = copy.deepcopy(model)
    loud = 3  # the widest group: raw scores prune it hardest
    layer = graph.groups[loud].producers[0]
    with torch.no_grad():
        dict(scaled.named_modules())[layer].weight.mul_(64.0)  # a power of two: the scores scale exactly
    scaled_graph = ChannelGraph(scaled, _example("digits_cnn"))
    for budget in (0.3, 0.6):
        before = global_keep_counts(graph, L1Importance(), budget)
        after = global_keep_counts(scaled_graph, L1Importance(), budget)
        np.testing.assert_array_equal(after, before)  # normalised: the scale changes nothing
        raw_before = global_keep_counts(graph, L1Importance(), budget, normalize=False)
        raw_after = global_keep_counts(scaled_graph, L1Importance(), budget, normalize=False)
        assert raw_after[loud] == graph.num_channels[loud]  # raw: the loud layer keeps everything ...
        assert raw_after[loud] > raw_before[loud]
        others = [g for g in range(len(graph.groups)) if g != loud]
        assert np.all(raw_after[others] <= raw_before[others])  # ... and the others pay for it
        assert raw_after[others].sum() < raw_before[others].sum()


def test_global_counts_score_the_model_given(zoo):
    model, graph = zoo["digits_cnn"]
    other = randomize_bn(copy.deepcopy(model), seed=7)
    other_graph = ChannelGraph(other, _example("digits_cnn"))
    importance = BNScaleImportance()
    via_model = global_keep_counts(graph, importance, 0.4, normalize=False, model=other)
    np.testing.assert_array_equal(via_model, global_keep_counts(other_graph, importance, 0.4, normalize=False))
    assert not np.array_equal(via_model, global_keep_counts(graph, importance, 0.4, normalize=False))


def test_global_counts_prune_to_the_counted_flops(trained, splits):
    model, graph = trained
    x = splits.test.x[:1]
    for budget in (0.3, 0.6):
        counts = global_keep_counts(graph, L1Importance(), budget)
        pruned = prune_channels(model, graph, graph.kept_channels(L1Importance(), counts)).eval()
        with torch.no_grad():
            out = pruned(splits.test.x[:5])
        assert out.shape == (5, 10) and torch.isfinite(out).all()
        assert graph.flops(counts) == pytest.approx(count_flops(pruned, x), rel=1e-9)
        assert count_flops(pruned, x) <= budget * graph.dense_flops * (1 + 1e-9)


def test_global_counts_return_one_channel_a_group_when_nothing_fits(zoo):
    _, graph = zoo["vgg_small"]
    counts = global_keep_counts(graph, L1Importance(), 1e-6)
    assert np.all(counts >= 1)
    assert counts.sum() <= len(graph.groups) + 1  # as small as it goes (ties may keep one more)


@pytest.mark.parametrize("bad", [0, -1, 1.01, math.nan])
def test_global_counts_reject_a_bad_budget(zoo, bad):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError, match=f"flops_ratio must be in \\(0, 1\\], got {bad}"):
        global_keep_counts(graph, L1Importance(), bad)


# ---- random_kept ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_random_kept_gives_the_counts_ascending_and_distinct(zoo, name):
    _, graph = zoo[name]
    counts = uniform_keep_counts(graph, 0.4)
    kept = random_kept(graph, counts, seed=3)
    assert len(kept) == len(graph.groups)
    for idx, k, n in zip(kept, counts, graph.num_channels, strict=True):
        assert idx.dtype == torch.long and idx.shape == (k,)
        assert bool((idx[1:] > idx[:-1]).all())  # strictly ascending: distinct
        assert 0 <= int(idx.min()) and int(idx.max()) < n


def test_random_kept_is_seeded(zoo):
    _, graph = zoo["resnet20"]
    counts = uniform_keep_counts(graph, 0.5)
    a, b, c = random_kept(graph, counts, seed=1), random_kept(graph, counts, seed=1), random_kept(graph, counts, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, z) for x, z in zip(a, c, strict=True))
    # it does not touch the global generator
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    random_kept(graph, counts, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_random_kept_channels_prune_to_the_counted_flops(zoo):
    model, graph = zoo["vgg_small"]
    counts = uniform_keep_counts(graph, 0.3)
    pruned = prune_channels(model, graph, random_kept(graph, counts, seed=0))
    x = _example("vgg_small")
    assert graph.flops(counts) == pytest.approx(count_flops(pruned, x), rel=1e-9)


@pytest.mark.parametrize("bad", [0, 17, -2])
def test_random_kept_rejects_a_bad_count(zoo, bad):
    _, graph = zoo["digits_cnn"]
    counts = graph.num_channels.copy()
    counts[0] = bad
    with pytest.raises(ValueError, match=f"16 channels, cannot keep {bad}"):
        random_kept(graph, counts)


# ---- slimming_penalty ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_slimming_penalty_is_strength_times_the_l1_of_bn_scales(zoo, name):
    model, _ = zoo[name]
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = 0.01 * sum(float(g.detach().abs().sum()) for g in gammas)
    value = slimming_penalty(0.01)(model)
    assert value.dim() == 0 and value.requires_grad
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(slimming_penalty(0.0)(model).detach()) == 0.0


def test_slimming_penalty_reaches_every_bn_scale_and_nothing_else():
    torch.manual_seed(0)
    model = randomize_bn(build_model("digits_cnn", 1, 10), 1)
    slimming_penalty(0.5)(model).backward()
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            torch.testing.assert_close(module.weight.grad, 0.5 * torch.sign(module.weight.detach()))
            assert module.bias.grad is None
        elif isinstance(module, nn.Conv2d | nn.Linear):
            assert module.weight.grad is None, name


def test_slimming_penalty_needs_a_batch_norm():
    penalty = slimming_penalty(1e-3)
    with pytest.raises(ValueError, match="Sequential has no batch norm"):
        penalty(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="no batch norm with a scale"):
        penalty(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False)))


@pytest.mark.parametrize("bad", [-1, -1e-9, math.nan])
def test_slimming_penalty_rejects_a_negative_strength(bad):
    with pytest.raises(ValueError, match=f"strength must be >= 0, got {bad}"):
        slimming_penalty(bad)


# ---- agp_sparsity --------------------------------------------------------------------------------
@pytest.mark.parametrize(("initial", "final", "ramp"), [(0.0, 0.9, 0.75), (0.2, 0.5, 1.0), (0.0, 0.0, 0.5)])
def test_agp_goes_from_initial_to_final_and_stays(initial, final, ramp):
    total = 200
    end = round(ramp * total)
    values = [agp_sparsity(t, total, final, initial, ramp) for t in range(total + 1)]
    assert values[0] == pytest.approx(initial)
    assert values[end] == pytest.approx(final)
    assert all(v == pytest.approx(final) for v in values[end:])
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))  # non-decreasing
    assert all(initial - 1e-12 <= v <= final + 1e-12 for v in values)
    if final > initial:  # cubic: most of the pruning early
        assert values[end // 2] - initial > 0.5 * (final - initial)


def test_agp_matches_the_cubic_formula():
    total, final, initial, ramp = 100, 0.8, 0.1, 0.5
    for t in (0, 10, 25, 49, 50, 80):
        n = 50
        expected = final + (initial - final) * (1 - min(1.0, t / n)) ** 3
        assert agp_sparsity(t, total, final, initial, ramp) == pytest.approx(expected)
    assert agp_sparsity(-5, total, final, initial, ramp) == pytest.approx(initial)  # before the start


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"final": 1.0}, "initial <= final < 1, got initial=0.0, final=1.0"),
    ({"final": 0.5, "initial": 0.6}, "got initial=0.6, final=0.5"),
    ({"final": 0.5, "initial": -0.1}, "got initial=-0.1"),
    ({"final": 0.5, "ramp": 0.0}, "ramp must be in \\(0, 1\\], got 0.0"),
    ({"final": 0.5, "ramp": 1.5}, "ramp must be in \\(0, 1\\], got 1.5"),
])
def test_agp_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        agp_sparsity(3, 10, **kwargs)


# ---- MagnitudePruner -----------------------------------------------------------------------------
def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_update_zeroes_at_least_the_target_and_the_smallest_first(target):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    before = [w.detach().clone() for w in _weights(model)]
    total = sum(w.numel() for w in before)
    pruner = MagnitudePruner(model)
    pruner.update(target)
    assert pruner.sparsity == target
    sparsity = weight_sparsity(model)
    assert target - 0.5 / total <= sparsity <= target + 1e-3
    zeroed = torch.cat([b[w == 0].abs() for b, w in zip(before, _weights(model), strict=True)])
    kept = torch.cat([b[w != 0].abs() for b, w in zip(before, _weights(model), strict=True)])
    if target > 0:
        assert zeroed.max() <= kept.min()  # one global threshold: the smallest weights go first
    for b, w, mask in zip(before, _weights(model), pruner.masks, strict=True):
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(w.detach(), b * mask)  # the kept weights are untouched


def test_update_leaves_bn_and_biases_alone():
    torch.manual_seed(0)
    model = randomize_bn(build_model("digits_cnn", 1, 10), 0)
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    others = {k: v.clone() for k, v in model.state_dict().items() if k not in weights}
    MagnitudePruner(model).update(0.9)
    state = model.state_dict()
    for key, value in others.items():
        assert torch.equal(state[key], value), key


def test_update_zeroes_at_least_the_fraction_asked_for_even_on_few_weights():
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    MagnitudePruner(layer).update(0.4)  # 0.4 of 3 weights: 1.2, so at least 2 must go
    assert weight_sparsity(layer) >= 0.4


def test_sparsity_only_grows_across_updates():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    pruner = MagnitudePruner(model)
    previous_mask = None
    for target in (0.2, 0.5, 0.8):
        pruner.update(target)
        mask = torch.cat([m.flatten() for m in pruner.masks])
        if previous_mask is not None:
            assert not bool((mask & ~previous_mask).any())  # a pruned weight (now zero) stays pruned
        previous_mask = mask


def test_apply_re_zeroes_the_pruned_weights_after_a_change():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    pruner = MagnitudePruner(model)
    pruner.update(0.6)
    with torch.no_grad():
        for w in _weights(model):
            w.add_(1.0)  # what an optimiser step does to pruned weights
    assert weight_sparsity(model) < 0.01
    changed = [w.detach().clone() for w in _weights(model)]
    pruner.apply()
    assert weight_sparsity(model) == pytest.approx(0.6, abs=1e-3)
    for w, c, mask in zip(_weights(model), changed, pruner.masks, strict=True):
        assert torch.equal(w.detach(), c * mask)


def test_magnitude_pruner_rejects_bad_input():
    with pytest.raises(ValueError, match="Sequential has no conv or linear weight"):
        MagnitudePruner(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))
    pruner = MagnitudePruner(nn.Linear(4, 2))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"sparsity must be in \\[0, 1\\), got {bad}"):
            pruner.update(bad)
    with pytest.raises(ValueError, match="final sparsity must be in \\[0, 1\\), got 1.0"):
        pruner.hook(1.0)


def test_the_hook_prunes_gradually_through_training(trained, splits):
    model = copy.deepcopy(trained[0])
    _, dense_accuracy = evaluate(model, splits.test)
    pruner = MagnitudePruner(model)
    final = 0.8
    hook = pruner.hook(final, updates=10)
    trajectory, masked_nonzero = [], []

    def after_step(step: int, total: int) -> None:
        hook(step, total)
        trajectory.append(weight_sparsity(model))
        masked_nonzero.append(sum(int((w[~m] != 0).sum()) for w, m in zip(_weights(model), pruner.masks,
                                                                          strict=True)))

    train_classifier(model, splits.train, epochs=2, lr=1e-3, seed=0, after_step=after_step)
    total = sum(w.numel() for w in _weights(model))
    assert len(trajectory) == 2 * math.ceil(len(splits.train) / 64)
    assert all(b >= a for a, b in zip(trajectory, trajectory[1:], strict=False)), trajectory  # monotone
    assert trajectory[0] < 0.5 * final  # gradual: it starts well below the final sparsity ...
    assert any(0 < s < 0.9 * final for s in trajectory)
    assert pruner.sparsity == pytest.approx(final)  # ... and gets there at the end of the ramp
    assert weight_sparsity(model) >= final - 0.5 / total
    assert len(set(trajectory)) >= 5  # several updates along the ramp
    assert masked_nonzero == [0] * len(masked_nonzero)  # the masks hold after every optimiser step
    _, accuracy = evaluate(model, splits.test)
    assert accuracy > 0.5 * dense_accuracy  # fine-tuning between updates keeps the network working


# ---- weight_sparsity, sparse_bytes ----------------------------------------------------------------
def test_weight_sparsity_counts_conv_and_linear_zeros_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # 8 weights
        model[0].weight[0].zero_()  # 4 zeros
        model[1].weight.zero_()  # BN scales do not count
        model[3].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # 4 weights, 1 zero
        model[3].bias.zero_()  # biases do not count
    assert weight_sparsity(model) == pytest.approx(5 / 12)
    assert weight_sparsity(nn.Sequential(nn.ReLU())) == 0.0


def test_sparse_bytes_fall_with_sparsity():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    dense = model_bytes(model)
    sizes = [sparse_bytes(model)]
    assert sizes[0] == pytest.approx(dense, rel=0.1)  # dense: about the same (values plus a bitmask)
    assert sizes[0] >= dense * 0.98
    pruner = MagnitudePruner(model)
    for target in (0.5, 0.9):
        pruner.update(target)
        sizes.append(sparse_bytes(model))
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 0.3 * dense  # 90% sparse: a tenth of the values and one bit per weight
    assert model_bytes(model) == pytest.approx(dense, rel=0.01)  # the dense format saves nothing


# ---- torch_pruning_magnitude ---------------------------------------------------------------------
@pytest.mark.parametrize(("name", "budget"), [("digits_cnn", 0.5), ("digits_cnn", 0.2), ("resnet20", 0.4)])
def test_torch_pruning_fits_the_budget_and_keeps_the_model(zoo, name, budget):
    model, graph = zoo[name]
    before = copy.deepcopy(model.state_dict())
    x = _example(name, batch=4)
    pruned = torch_pruning_magnitude(model, x[:1], budget)
    flops = count_flops(pruned, x[:1])
    assert flops <= budget * graph.dense_flops * (1 + 1e-9)
    assert flops >= 0.5 * budget * graph.dense_flops  # the largest ratio that fits: not far below
    with torch.no_grad():
        out = pruned.eval()(x)
    assert out.shape == (4, 10)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key]), key
    assert count_flops(model, x[:1]) == graph.dense_flops
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_torch_pruning_at_the_full_budget_changes_nothing(zoo):
    model, _ = zoo["digits_cnn"]
    x = _example("digits_cnn", batch=3)
    same = torch_pruning_magnitude(model, x[:1], 1.0)
    assert same is not model
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), model(x))


@pytest.mark.parametrize("bad", [0, 1.5, -0.2])
def test_torch_pruning_rejects_a_bad_budget(zoo, bad):
    model, _ = zoo["digits_cnn"]
    with pytest.raises(ValueError, match=f"flops_ratio must be in \\(0, 1\\], got {bad}"):
        torch_pruning_magnitude(model, _example("digits_cnn"), bad)


def test_the_hook_reaches_its_target_when_some_steps_are_skipped():
    """A split of 65 images in batches of 64: every second step holds one image and train_classifier skips it."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randn(65, 1, SIZE, SIZE, generator=gen), torch.randint(0, 10, (65,), generator=gen))
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    pruner = MagnitudePruner(model)
    hook = pruner.hook(0.5, updates=2, ramp=0.5)  # the ramp ends half-way: 4 of 8 steps
    seen = []

    def after_step(step: int, total: int) -> None:
        seen.append((step, total))
        hook(step, total)

    train_classifier(model, split, epochs=4, seed=0, after_step=after_step)
    assert seen == [(1, 8), (3, 8), (5, 8), (7, 8)]  # steps 2, 4, 6 and 8 hold one image each
    assert pruner.sparsity == pytest.approx(0.5)  # the ramp ended at step 4, training went on to step 8
    assert weight_sparsity(model) >= 0.5 - 1e-4
