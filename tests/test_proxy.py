"""Tests for prunegym.compression.proxy (the candidate evaluations a search ranks by) and the
candidate sampler it is measured with (``sparsity.random_keep_counts``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import trained_digits_cnn

from prunegym.compression.channels import ChannelGraph, prune_channels, recalibrate_bn
from prunegym.compression.data import load_dataset
from prunegym.compression.importance import L1Importance
from prunegym.compression.proxy import RECALIBRATION_BATCH, ProxyEvaluator, classifier_of
from prunegym.compression.sparsity import random_keep_counts
from prunegym.compression.supernet import width_choices
from prunegym.compression.training import evaluate


@pytest.fixture(scope="module")
def setup():
    splits = load_dataset("digits", 0)
    model = trained_digits_cnn(splits.train)
    graph = ChannelGraph(model, splits.train.x[:1])
    return splits, model, graph, graph.rankings(L1Importance())


def _outputs(model, splits):
    with torch.no_grad():
        return model.eval()(splits.test.x[:32]).clone()


def test_soft_masked_score_is_the_hard_pruned_model_recalibrated(setup):
    splits, model, graph, ranking = setup
    proxy = ProxyEvaluator(model, graph, ranking, splits.train, recalibration_batches=3)
    counts = np.array([5, 9, 12, 20])
    before = _outputs(model, splits)
    scores = proxy(counts, splits.reward)
    torch.testing.assert_close(_outputs(model, splits), before)  # masks off, BN statistics restored
    pruned = prune_channels(model, graph, graph.kept_channels(ranking, counts))
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    b = RECALIBRATION_BATCH
    recalibrate_bn(pruned, [splits.train.x[order[i * b:(i + 1) * b]] for i in range(3)])
    loss, accuracy = evaluate(pruned, splits.reward)
    assert scores["loss"] == pytest.approx(loss, rel=1e-4) and scores["accuracy"] == pytest.approx(accuracy)
    proxy.close()


def test_a_candidate_seen_before_is_not_scored_again(setup):
    splits, model, graph, ranking = setup
    proxy = ProxyEvaluator(model, graph, ranking, splits.train, recalibration_batches=2)
    first = proxy(np.array([5, 9, 12, 20]), splits.reward)
    first["loss"] = -1.0  # the caller's copy
    again = proxy([5, 9, 12, 20], splits.reward)
    assert proxy.evaluations == 1 and again["loss"] > 0
    fresh = ProxyEvaluator(model, graph, ranking, splits.train, recalibration_batches=2)
    assert fresh([5, 9, 12, 20], splits.reward) == again  # what computing it again gives
    proxy([5, 9, 12, 20], splits.test)
    proxy([5, 9, 12, 19], splits.reward)
    assert proxy.evaluations == 3
    proxy.close()
    fresh.close()


def test_distillation_is_zero_for_the_full_model_and_grows_as_it_narrows(setup):
    splits, model, graph, ranking = setup
    unchanged = ProxyEvaluator(model, graph, ranking, splits.train, recalibration_batches=0)
    assert unchanged(graph.num_channels, splits.reward)["distillation"] == pytest.approx(0.0, abs=1e-6)
    unchanged.close()
    proxy = ProxyEvaluator(model, graph, ranking, splits.train, recalibration_batches=4)
    half = proxy(np.maximum(1, graph.num_channels // 2), splits.reward)
    quarter = proxy(np.maximum(1, graph.num_channels // 4), splits.reward)
    assert 0 < half["distillation"] < quarter["distillation"]
    proxy.close()


def test_short_finetune_trains_a_copy_and_helps_a_narrow_candidate(setup):
    splits, model, graph, ranking = setup
    counts = np.maximum(1, graph.num_channels // 4)
    before = _outputs(model, splits)
    plain = ProxyEvaluator(model, graph, ranking, splits.train, recalibration_batches=0)(counts, splits.reward)
    tuned = ProxyEvaluator(model, graph, ranking, splits.train, finetune_steps=30)(counts, splits.reward)
    torch.testing.assert_close(_outputs(model, splits), before)
    assert tuned["loss"] < plain["loss"]


@pytest.mark.parametrize("sliced", [True, False])
def test_head_refit_scores_the_features_not_the_classifier_they_came_with(setup, sliced):
    """With its classifier's classes shuffled a candidate scores near zero; with ``refit_head`` its classifier
    is fitted again to its features of the recalibration batches (a convex fit), and it scores as the
    intact model's candidate re-fitted does, above the intact one as it came, sliced or soft-masked; the
    model is left as it was."""
    splits, model, graph, ranking = setup
    counts = np.array([12, 24, 24, 48])
    intact = ProxyEvaluator(model, graph, ranking, splits.train, sliced=sliced)(counts, splits.reward)
    intact_refitted = ProxyEvaluator(model, graph, ranking, splits.train, sliced=sliced,
                                     refit_head=True)(counts, splits.reward)
    shuffled = copy.deepcopy(model)
    classifier = classifier_of(shuffled)
    with torch.no_grad():
        order = torch.roll(torch.arange(classifier.out_features), 1)
        classifier.weight.copy_(classifier.weight[order]), classifier.bias.copy_(classifier.bias[order])
    before = _outputs(shuffled, splits)
    plain = ProxyEvaluator(shuffled, graph, ranking, splits.train, sliced=sliced)(counts, splits.reward)
    proxy = ProxyEvaluator(shuffled, graph, ranking, splits.train, sliced=sliced, refit_head=True)
    refitted = proxy(counts, splits.reward)
    torch.testing.assert_close(_outputs(shuffled, splits), before)
    assert plain["accuracy"] < 0.1 < 0.8 < intact["accuracy"] <= refitted["accuracy"]
    assert refitted["accuracy"] == pytest.approx(intact_refitted["accuracy"])
    assert refitted["loss"] == pytest.approx(intact_refitted["loss"], rel=1e-3) and refitted["loss"] < intact["loss"]
    assert proxy(counts, splits.reward) == refitted  # remembered, as every score is
    proxy.close()


def test_head_refit_needs_a_classifier_and_recalibration_batches(setup):
    splits, model, graph, ranking = setup
    for kwargs, match in (({"refit_head": 1}, "refit_head must be a bool, got 1"),
                          ({"refit_head": True, "recalibration_batches": 0}, "recalibration_batches >= 1 .got 0"),
                          ({"refit_head": True, "finetune_steps": 5}, "no finetune_steps .got 5")):
        with pytest.raises(ValueError, match=match):
            ProxyEvaluator(model, graph, ranking, splits.train, **kwargs)
    convolutional = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 3), torch.nn.BatchNorm2d(10),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    conv_graph = ChannelGraph(convolutional, splits.train.x[:1])
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        ProxyEvaluator(convolutional, conv_graph, conv_graph.rankings(L1Importance()), splits.train, refit_head=True)


@pytest.mark.parametrize(("kwargs", "match"), [({"recalibration_batches": -1}, "recalibration_batches"),
                                               ({"finetune_steps": 1.5}, "finetune_steps"),
                                               ({"finetune_lr": 0.0}, "finetune_lr")])
def test_bad_settings_are_refused_by_name(setup, kwargs, match):
    splits, model, graph, ranking = setup
    with pytest.raises(ValueError, match=match):
        ProxyEvaluator(model, graph, ranking, splits.train, **kwargs)


def test_random_keep_counts_meet_the_budget_within_tolerance(setup):
    _, _, graph, _ = setup
    choices = width_choices(graph, 0.25)
    rng = np.random.default_rng(0)
    draws = [random_keep_counts(graph, 0.3, choices, rng, tolerance=0.03) for _ in range(20)]
    for counts in draws:
        ratio = graph.flops(counts) / graph.dense_flops
        assert 0.3 * 0.97 <= ratio <= 0.3 + 1e-9
        assert all(c[0] <= k <= c[-1] for c, k in zip(choices, counts, strict=True))
    assert len({tuple(c) for c in draws}) > 10  # random shapes, not one allocation
    again = [random_keep_counts(graph, 0.3, choices, np.random.default_rng(0), tolerance=0.03)]
    assert np.array_equal(again[0], draws[0])


def test_random_keep_counts_refuse_an_unreachable_budget(setup):
    _, _, graph, _ = setup
    choices = width_choices(graph, 0.5)
    with pytest.raises(ValueError, match="flops_ratio=0.05"):
        random_keep_counts(graph, 0.05, choices, np.random.default_rng(0))
    with pytest.raises(ValueError, match="groups"):
        random_keep_counts(graph, 0.5, choices[:2], np.random.default_rng(0))
