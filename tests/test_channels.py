"""Tests for prunegym.compression.channels: groups, the cost model, soft vs hard pruning, importance, BN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize_bn
from torch import nn

from prunegym.compression.channels import (
    ChannelGraph,
    SoftMask,
    bn_state,
    load_bn_state,
    prune_channels,
    recalibrate_bn,
    reorder_channels,
)
from prunegym.compression.importance import (
    IMPORTANCES,
    BNScaleImportance,
    GroupL1Importance,
    L1Importance,
    L2Importance,
    make_importance,
)
from prunegym.compression.metrics import count_flops, count_params
from prunegym.compression.models import build_model

SIZE = 8
ZOO = {"digits_cnn": 1, "resnet20": 3, "vgg_small": 3}  # name -> in_channels


def _zoo_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model(name, ZOO[name], 10), seed).eval()


@pytest.fixture(scope="module")
def zoo():
    """name -> (model, graph), built once: tracing the dependency graph is the slow part."""
    out = {}
    for name, in_channels in ZOO.items():
        model = _zoo_model(name)
        out[name] = (model, ChannelGraph(model, torch.randn(1, in_channels, SIZE, SIZE)))
    return out


def _random_counts(graph: ChannelGraph, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(1, graph.num_channels + 1)


def _random_kept(graph: ChannelGraph, counts: np.ndarray, rng: np.random.Generator) -> list[torch.Tensor]:
    """Random (not importance-ordered) channel subsets: soft/hard equality must hold for any choice."""
    return [torch.as_tensor(np.sort(rng.choice(n, size=k, replace=False))) for n, k in zip(
        graph.num_channels, counts, strict=True)]


# ---- groups ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "num_groups"), [("digits_cnn", 4), ("resnet20", 12), ("vgg_small", 6)])
def test_group_counts(zoo, name, num_groups):
    model, graph = zoo[name]
    assert len(graph.groups) == num_groups
    assert [g.index for g in graph.groups] == list(range(num_groups))
    assert graph.num_channels.tolist() == [g.num_channels for g in graph.groups]
    modules = dict(model.named_modules())
    for group in graph.groups:
        for producer in group.producers:
            out = modules[producer].out_channels if isinstance(modules[producer], nn.Conv2d) else None
            assert out == group.num_channels
        for norm in group.norms:
            assert modules[norm].num_features == group.num_channels
        assert group.consumers, f"group {group.name} reaches no layer"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_classifier_is_never_a_group(zoo, name):
    model, graph = zoo[name]
    classifier = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    for group in graph.groups:
        assert classifier not in group.producers
    # ...but it consumes exactly one group, whose channels it reads.
    assert sum(classifier in [c.name for c in g.consumers] for g in graph.groups) == 1


def test_resnet20_groups(zoo):
    _, graph = zoo["resnet20"]
    by_name = {g.name: g for g in graph.groups}
    stage_groups = [g for g in graph.groups if len(g.producers) > 1]
    internal = [g for g in graph.groups if len(g.producers) == 1]
    assert len(stage_groups) == 3 and len(internal) == 9
    assert sorted(g.name for g in internal) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))

    stage1 = by_name["conv1"]
    assert stage1.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    assert stage1.num_channels == 16
    assert set(stage1.norms) == {"bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"}
    assert {c.name for c in stage1.consumers} == {
        "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"}
    for stage, width in ((2, 32), (3, 64)):
        group = by_name[f"layer{stage}.0.conv2"]
        assert group.num_channels == width
        assert set(group.producers) == {f"layer{stage}.{b}.conv2" for b in range(3)} | {
            f"layer{stage}.0.shortcut.0"}
    assert "fc" in [c.name for c in by_name["layer3.0.conv2"].consumers]
    block = by_name["layer2.1.conv1"]
    assert block.norms == ("layer2.1.bn1",) and [c.name for c in block.consumers] == ["layer2.1.conv2"]
    assert (block.in_channels, block.kernel_size, block.stride) == (32, 3, 1)
    assert (by_name["layer2.0.conv1"].in_channels, by_name["layer2.0.conv1"].stride) == (16, 2)


def test_dense_costs_match_the_counters(zoo):
    for name, (model, graph) in zoo.items():
        x = torch.randn(1, ZOO[name], SIZE, SIZE)
        assert graph.dense_flops == count_flops(model, x)
        assert graph.dense_params == count_params(model)
        assert graph.flops(graph.num_channels) == pytest.approx(graph.dense_flops)
        assert graph.params(graph.num_channels) == pytest.approx(graph.dense_params)


# ---- cost model vs the pruned model ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_cost_model_equals_counted_costs_of_pruned_model(zoo, name):
    model, graph = zoo[name]
    x = torch.randn(1, ZOO[name], SIZE, SIZE)
    rng = np.random.default_rng(1)
    for counts in (_random_counts(graph, rng), _random_counts(graph, rng), np.ones_like(graph.num_channels)):
        pruned = prune_channels(model, graph, graph.kept_channels(L1Importance(), counts))
        assert graph.flops(counts) == pytest.approx(count_flops(pruned, x), rel=1e-9)
        assert graph.params(counts) == pytest.approx(count_params(pruned), rel=1e-9)
        assert count_params(pruned) < count_params(model)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_flops_non_decreasing_in_each_group(zoo, name):
    _, graph = zoo[name]
    rng = np.random.default_rng(2)
    for _ in range(3):
        base = rng.integers(1, graph.num_channels)  # strictly below full, so every group can grow
        flops = graph.flops(base)
        for g in range(len(graph.groups)):
            more = base.copy()
            more[g] += 1
            assert graph.flops(more) >= flops
            assert graph.params(more) >= graph.params(base)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_batched_keep_counts_give_one_value_per_row(zoo, name):
    _, graph = zoo[name]
    rng = np.random.default_rng(3)
    rows = np.stack([_random_counts(graph, rng) for _ in range(5)])
    flops, params = graph.flops(rows), graph.params(rows)
    assert flops.shape == params.shape == (5,)
    np.testing.assert_allclose(flops, [graph.flops(r) for r in rows], rtol=1e-12)
    np.testing.assert_allclose(params, [graph.params(r) for r in rows], rtol=1e-12)


def test_cost_model_rejects_wrong_number_of_counts(zoo):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError, match="one keep count per group"):
        graph.flops([4, 4, 4])
    with pytest.raises(ValueError, match="one keep count per group"):
        graph.params(np.ones((2, 5)))


# ---- soft masks vs hard pruning ----------------------------------------------------------------
def test_hard_pruning_equals_soft_masking_on_resnet20(zoo):
    model, graph = zoo["resnet20"]
    assert not model.training
    x = torch.randn(8, 3, SIZE, SIZE)
    mask = SoftMask(model, graph)
    rng = np.random.default_rng(4)
    try:
        cases = [
            graph.kept_channels(L1Importance(), _random_counts(graph, rng)),
            _random_kept(graph, _random_counts(graph, rng), rng),
            _random_kept(graph, _random_counts(graph, rng), rng),
            _random_kept(graph, np.ones_like(graph.num_channels), rng),
        ]
        with torch.no_grad():
            dense = model(x)
        for kept in cases:
            # The hard output is taken while the mask is off: a copy made by prune_channels carries the
            # mask's hooks (see test_pruned_copy_ignores_a_soft_mask_on_the_original).
            mask.set(None)
            pruned = prune_channels(model, graph, kept).eval()  # traces with autograd: not under no_grad
            with torch.no_grad():
                hard = pruned(x)
                mask.set(kept)
                soft = model(x)
            torch.testing.assert_close(hard, soft, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(soft, dense, atol=1e-3)  # the pruning really changed something
    finally:
        mask.remove()


@pytest.mark.parametrize("name", ["digits_cnn", "vgg_small"])
def test_hard_pruning_equals_soft_masking_on_plain_cnns(zoo, name):
    model, graph = zoo[name]
    x = torch.randn(4, ZOO[name], SIZE, SIZE)
    rng = np.random.default_rng(5)
    mask = SoftMask(model, graph)
    try:
        kept = _random_kept(graph, _random_counts(graph, rng), rng)
        pruned = prune_channels(model, graph, kept)
        with torch.no_grad():
            hard = pruned(x)
            mask.set(kept)
            torch.testing.assert_close(hard, model(x), atol=1e-5, rtol=1e-5)
    finally:
        mask.remove()


def test_soft_mask_none_restores_dense_output_exactly(zoo):
    model, graph = zoo["resnet20"]
    x = torch.randn(4, 3, SIZE, SIZE)
    mask = SoftMask(model, graph)
    try:
        with torch.no_grad():
            dense = model(x)
            assert torch.equal(model(x), dense)  # attached but never set: inactive
            mask.set(graph.kept_channels(L1Importance(), graph.keep_counts(np.full(len(graph.groups), 0.5))))
            assert mask.active
            assert not torch.equal(model(x), dense)
            mask.set(None)
            assert not mask.active
            assert torch.equal(model(x), dense)
    finally:
        mask.remove()


def test_soft_mask_set_replaces_the_previous_mask(zoo):
    model, graph = zoo["digits_cnn"]
    x = torch.randn(4, 1, SIZE, SIZE)
    rng = np.random.default_rng(6)
    first = _random_kept(graph, _random_counts(graph, rng), rng)
    second = _random_kept(graph, _random_counts(graph, rng), rng)
    mask = SoftMask(model, graph)
    try:
        with torch.no_grad():
            mask.set(second)
            expected = model(x)
            mask.set(first)
            mask.set(second)
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
            with pytest.raises(ValueError, match="kept channels for 4 groups"):
                mask.set(second[:2])
    finally:
        mask.remove()


def test_soft_mask_remove_detaches_hooks(zoo):
    model, graph = zoo["digits_cnn"]
    hooks_before = {n: len(m._forward_pre_hooks) for n, m in model.named_modules()}
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        dense = model(x)
        mask = SoftMask(model, graph)
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) > sum(hooks_before.values())
        mask.set([torch.arange(1)] * len(graph.groups))
        mask.remove()
        assert {n: len(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks_before
        assert not mask.active
        assert torch.equal(model(x), dense)
        mask.set([torch.arange(1)] * len(graph.groups))  # no hooks left to apply it
        assert torch.equal(model(x), dense)


def test_prune_channels_leaves_the_original_alone(zoo):
    model, graph = zoo["vgg_small"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = graph.keep_counts(np.full(len(graph.groups), 0.25))
    pruned = prune_channels(model, graph, graph.kept_channels(L1Importance(), counts))
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == counts.tolist()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not pruned.training
    with pytest.raises(ValueError, match="kept channels for 6 groups"):
        prune_channels(model, graph, [torch.arange(2)])


# ---- importance --------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", [L1Importance(), L2Importance(), GroupL1Importance(), BNScaleImportance()])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_importance_scores_one_value_per_channel(zoo, name, criterion):
    model, graph = zoo[name]
    for group in graph.groups:
        score = criterion(model, group)
        assert score.shape == (group.num_channels,)
        assert torch.isfinite(score).all() and (score >= 0).all()


@pytest.mark.parametrize("criterion", [L1Importance(), L2Importance()])
@pytest.mark.parametrize("group_name", ["layer1.1.conv1", "conv1", "layer3.0.conv2"])
def test_norm_ranking_puts_a_scaled_filter_first(zoo, criterion, group_name):
    model, graph = zoo["resnet20"]
    group = next(g for g in graph.groups if g.name == group_name)
    producer = dict(model.named_modules())[group.producers[0]]
    target = group.num_channels // 2 + 1
    original = producer.weight.detach().clone()
    try:
        with torch.no_grad():
            producer.weight[target] *= 1000.0
        score = criterion(model, group)
        assert int(torch.argmax(score)) == target
        counts = graph.num_channels.copy()
        counts[group.index] = 1
        kept = graph.kept_channels(criterion, counts)
        assert kept[group.index].tolist() == [target]
    finally:
        with torch.no_grad():
            producer.weight.copy_(original)


def test_l1_importance_is_the_filter_norm(zoo):
    model, graph = zoo["digits_cnn"]
    group = graph.groups[1]
    weight = dict(model.named_modules())[group.name].weight.detach().flatten(1)
    torch.testing.assert_close(L1Importance()(model, group), weight.abs().sum(1) / weight.shape[1])
    torch.testing.assert_close(L2Importance()(model, group), weight.norm(dim=1) / weight.shape[1])
    bn = dict(model.named_modules())[group.norms[0]]
    torch.testing.assert_close(BNScaleImportance()(model, group), bn.weight.detach().abs())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_group_l1_equals_torch_pruning_group_magnitude(zoo, name):
    """Every group's scores are torch-pruning's MagnitudeImportance(p=1) (mean over the group's layers,
    no normalisation) on the same group, residual groups and the flatten into the classifier included."""
    import torch_pruning as tp

    model, graph = zoo[name]
    dependencies = tp.DependencyGraph().build_dependency(model, example_inputs=graph.example_input)
    model.eval()
    reference = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    modules = dict(model.named_modules())
    for group in graph.groups:
        producer = modules[group.producers[0]]
        prune = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
        tp_group = dependencies.get_pruning_group(producer, prune, idxs=list(range(group.num_channels)))
        torch.testing.assert_close(GroupL1Importance()(model, group), reference(tp_group).float())


def test_group_l1_ranks_a_channel_nothing_reads_last():
    """A channel with the largest filter whose outputs the next layer ignores ranks below the others
    by group L1, first by filter L1; a grouped consumer reads each channel through its own group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].weight[1] = 0.2  # the largest filter
        model[1].weight.fill_(1.0)
        model[3].weight.normal_()
        model[3].weight[:4, 1] = 0.0  # outputs 0-3 (group 0) read input 1 at in-group index 1: nobody reads it now
    graph = ChannelGraph(model, torch.randn(1, 1, SIZE, SIZE))
    group = graph.groups[0]
    assert int(torch.argmax(L1Importance()(model, group))) == 1
    score = GroupL1Importance()(model, group)
    filters = model[0].weight.detach().abs().flatten(1).sum(1)
    read = torch.stack([model[3].weight.detach()[4 * (c // 2):4 * (c // 2) + 4, c % 2].abs().sum() for c in range(4)])
    torch.testing.assert_close(score, (filters + model[1].weight.detach().abs() + read) / 3)
    assert read[1] == 0 and int(torch.argmin(score)) == 1


def test_group_l1_leaves_out_a_batch_norm_without_scales():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    graph = ChannelGraph(model, torch.randn(1, 1, SIZE, SIZE))
    group = graph.groups[0]
    assert group.norms == ("1",)
    filters = model[0].weight.detach().abs().flatten(1).sum(1)
    read = model[3].weight.detach().abs().sum((0, 2, 3))
    torch.testing.assert_close(GroupL1Importance()(model, group), (filters + read) / 2)


def test_bn_scale_ranking_follows_gamma(zoo):
    model, graph = zoo["vgg_small"]
    group = graph.groups[2]
    gamma = dict(model.named_modules())[group.norms[0]].weight.detach().abs()
    counts = graph.num_channels.copy()
    counts[group.index] = 5
    kept = graph.kept_channels(BNScaleImportance(), counts)[group.index]
    assert kept.tolist() == sorted(torch.topk(gamma, 5).indices.tolist())


def _no_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()


def test_bn_scale_needs_a_batch_norm():
    model = _no_bn_net()
    graph = ChannelGraph(model, torch.randn(1, 1, SIZE, SIZE))
    assert len(graph.groups) == 2 and all(g.norms == () for g in graph.groups)
    assert L1Importance()(model, graph.groups[0]).shape == (4,)
    with pytest.raises(ValueError, match="'0' has no batch norm"):
        BNScaleImportance()(model, graph.groups[0])
    with pytest.raises(ValueError, match="no batch norm"):
        graph.kept_channels(BNScaleImportance(), [2, 3])


def test_cost_model_and_pruning_without_batch_norm():
    model = _no_bn_net()
    x = torch.randn(1, 1, SIZE, SIZE)
    graph = ChannelGraph(model, x)
    counts = np.array([2, 5])
    pruned = prune_channels(model, graph, graph.kept_channels(L2Importance(), counts))
    assert graph.flops(counts) == pytest.approx(count_flops(pruned, x))
    assert graph.params(counts) == pytest.approx(count_params(pruned))


def test_make_importance():
    assert set(IMPORTANCES) == {"l1", "l2", "group_l1", "bn_scale"}
    for name, cls in IMPORTANCES.items():
        criterion = make_importance(name)
        assert isinstance(criterion, cls) and criterion.name == name
    with pytest.raises(ValueError, match="'taylor'"):
        make_importance("taylor")


# ---- keep counts and kept channels -------------------------------------------------------------
def test_keep_counts_round_to_nearest(zoo):
    _, graph = zoo["digits_cnn"]  # 16, 32, 32, 64 channels
    assert graph.num_channels.tolist() == [16, 32, 32, 64]
    assert graph.keep_counts([1.0, 1.0, 1.0, 1.0]).tolist() == [16, 32, 32, 64]
    assert graph.keep_counts([0.3, 0.3, 0.7, 0.1]).tolist() == [5, 10, 22, 6]  # 4.8, 9.6, 22.4, 6.4
    assert graph.keep_counts([0.25, 0.5, 0.75, 0.5]).tolist() == [4, 16, 24, 32]
    counts = graph.keep_counts(np.array([0.3, 0.3, 0.7, 0.1]))
    assert counts.dtype == np.int64


def test_keep_counts_keep_at_least_min_channels(zoo):
    _, graph = zoo["digits_cnn"]
    assert graph.keep_counts([0.0, 0.0, 0.0, 0.01]).tolist() == [1, 1, 1, 1]
    assert graph.keep_counts([0.0, 0.1, 1.0, 0.0], min_channels=4).tolist() == [4, 4, 32, 4]
    assert graph.keep_counts([0.0] * 4, min_channels=100).tolist() == [16, 32, 32, 64]  # capped at the width


@pytest.mark.parametrize("ratios", [[-0.1, 1, 1, 1], [1, 1, 1, 1.01], [1, 1, 1], [[1, 1, 1, 1]], [0.5] * 5])
def test_keep_counts_reject_bad_ratios(zoo, ratios):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError, match="4 keep ratios"):
        graph.keep_counts(ratios)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_keep_counts_reject_nan_ratios(zoo):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError, match="keep ratios"):
        graph.keep_counts([0.5, float("nan"), 0.5, 0.5])


def test_kept_channels_are_ascending_and_sized(zoo):
    model, graph = zoo["resnet20"]
    counts = _random_counts(graph, np.random.default_rng(8))
    kept = graph.kept_channels(L1Importance(), counts)
    assert [len(k) for k in kept] == counts.tolist()
    for k, group in zip(kept, graph.groups, strict=True):
        assert k.dtype == torch.long
        assert torch.equal(k, torch.sort(k).values) and len(set(k.tolist())) == len(k)
        assert 0 <= int(k.min()) and int(k.max()) < group.num_channels


@pytest.mark.parametrize("bad", [0, 17, -1])
def test_kept_channels_rejects_impossible_counts(zoo, bad):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError, match=f"16 channels, cannot keep {bad}"):
        graph.kept_channels(L1Importance(), [bad, 32, 32, 64])


def test_kept_channels_needs_one_count_per_group(zoo):
    _, graph = zoo["digits_cnn"]
    with pytest.raises(ValueError):
        graph.kept_channels(L1Importance(), [16, 32, 32])


# ---- batch norm --------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_recalibrate_bn_changes_stats_and_keeps_the_mode(training):
    model = _zoo_model("digits_cnn", seed=9).train(training)
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = bn_state(model)
    gen = torch.Generator().manual_seed(0)
    batch = 3.0 + 2.0 * torch.randn(32, 1, SIZE, SIZE, generator=gen)
    recalibrate_bn(model, [batch])
    after = bn_state(model)
    for key in before:
        if key.endswith(("running_mean", "running_var")):
            assert not torch.allclose(before[key], after[key]), key
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    # One batch with a cumulative average: the first BN's statistics are that batch's statistics.
    with torch.no_grad():
        conv_out = model.features[0](batch)
    torch.testing.assert_close(after["features.1.running_mean"], conv_out.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(after["features.1.running_var"], conv_out.transpose(0, 1).flatten(1).var(1))


def test_recalibrate_bn_averages_over_batches():
    model = _zoo_model("digits_cnn", seed=10)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 1, SIZE, SIZE, generator=gen) + shift for shift in (-1.0, 1.0)]
    recalibrate_bn(model, batches)
    with torch.no_grad():
        means = [model.features[0](b).mean(dim=(0, 2, 3)) for b in batches]
    torch.testing.assert_close(model.features[1].running_mean, (means[0] + means[1]) / 2)


def test_recalibrate_bn_without_batch_norm_is_a_no_op():
    model = _no_bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, [torch.randn(4, 1, SIZE, SIZE)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_state_round_trip():
    model = _zoo_model("resnet20", seed=11)
    saved = bn_state(model)
    assert saved and all(k in dict(model.named_buffers()) for k in saved)
    assert any(k.endswith("num_batches_tracked") for k in saved)
    reference = {k: v.clone() for k, v in saved.items()}
    recalibrate_bn(model, [torch.randn(8, 3, SIZE, SIZE)])
    assert torch.equal(saved["bn1.running_mean"], reference["bn1.running_mean"])  # a copy, not a view
    assert not torch.equal(model.bn1.running_mean, saved["bn1.running_mean"])
    load_bn_state(model, saved)
    restored = bn_state(model)
    assert restored.keys() == reference.keys()
    assert all(torch.equal(restored[k], reference[k]) for k in reference)


def test_channel_graph_leaves_the_train_flag_as_it_was():
    model = _zoo_model("digits_cnn", seed=12).train()
    ChannelGraph(model, torch.randn(2, 1, SIZE, SIZE))
    assert model.training


def test_prune_channels_works_under_no_grad(zoo):
    model, graph = zoo["digits_cnn"]
    kept = graph.kept_channels(L1Importance(), graph.keep_counts(np.full(4, 0.5)))
    with torch.no_grad():
        pruned = prune_channels(model, graph, kept)
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 16, 32]


def test_pruned_copy_ignores_a_soft_mask_on_the_original():
    model = _zoo_model("digits_cnn", seed=13)
    graph = ChannelGraph(model, torch.randn(1, 1, SIZE, SIZE))
    mask = SoftMask(model, graph)
    kept = graph.kept_channels(L1Importance(), graph.keep_counts(np.full(4, 0.5)))
    pruned = prune_channels(model, graph, kept)
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        expected = pruned(x)
        mask.set(kept)  # e.g. the environment evaluating its next candidate
        try:
            assert sum(len(m._forward_pre_hooks) for m in pruned.modules()) == 0
            torch.testing.assert_close(pruned(x), expected)
        finally:
            mask.remove()


def test_allowed_counts_are_multiples_or_the_whole_group(zoo):
    graph = zoo["resnet20"][1]
    stage3 = next(g.index for g in graph.groups if g.name == "layer3.0.conv1")  # 64 channels
    assert graph.allowed_counts(stage3, multiple=16).tolist() == [16, 32, 48, 64]
    assert graph.allowed_counts(stage3, multiple=16, min_channels=20).tolist() == [32, 48, 64]
    assert graph.allowed_counts(0, multiple=48).tolist() == [16]  # 16 channels: only all of them
    assert graph.allowed_counts(stage3).tolist() == list(range(1, 65))
    counts = graph.keep_counts(np.full(len(graph.groups), 0.4), multiple=16)
    assert all(c % 16 == 0 or c == n for c, n in zip(counts, graph.num_channels, strict=True))
    assert counts[stage3] == 32  # 0.4 * 64 = 25.6: 32 is the nearest multiple of 16
    with pytest.raises(ValueError, match="multiple"):
        graph.allowed_counts(0, multiple=0)


# ---- reordering by importance ------------------------------------------------------------------
class _FlattenNet(nn.Module):
    """conv -> BN -> ReLU -> flatten -> linear: the linear reads each channel at 16 positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "vgg_small", "flatten"])
def test_reordering_keeps_the_function_and_sorts_each_group(zoo, name):
    if name == "flatten":
        torch.manual_seed(0)
        model = randomize_bn(_FlattenNet(), 0).eval()
        x = torch.randn(3, 3, 4, 4)
        graph = ChannelGraph(model, x[:1])
    else:
        model, graph = zoo[name]
        x = torch.randn(3, ZOO[name], SIZE, SIZE)
    importance = L1Importance()
    reordered = reorder_channels(model, graph, importance)
    with torch.no_grad():
        torch.testing.assert_close(reordered(x), model(x), atol=1e-5, rtol=1e-5)
    for group in graph.groups:
        scores = importance(reordered, group)
        assert torch.all(scores[:-1] >= scores[1:] - 1e-7)


def test_after_reordering_the_top_k_channels_are_a_prefix(zoo):
    model, graph = zoo["resnet20"]
    importance = L1Importance()
    reordered = reorder_channels(model, graph, importance)
    counts = graph.keep_counts(np.full(len(graph.groups), 0.5))
    x = torch.randn(2, 3, SIZE, SIZE)
    top_k = prune_channels(model, graph, graph.kept_channels(importance, counts))
    prefix = prune_channels(reordered, graph, [torch.arange(int(k)) for k in counts])
    with torch.no_grad():
        torch.testing.assert_close(prefix(x), top_k(x), atol=1e-5, rtol=1e-5)
