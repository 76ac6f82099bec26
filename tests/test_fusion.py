"""Folding batch norm into convs: same outputs, no BN left, shapes survive a checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunegym.compression import L1Importance, build_model, count_flops, prune_channels
from prunegym.compression.channels import ChannelGraph
from prunegym.compression.checkpoint import build_from_architecture, describe_architecture
from prunegym.compression.fusion import conv_bn_pairs, fold_batchnorm, inference_form


def _randomized(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 3, 10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize(("name", "pairs"), [("digits_cnn", 4), ("resnet20", 21), ("vgg_small", 6)])
def test_folding_keeps_outputs_and_flops_and_removes_every_bn(name, pairs):
    model = _randomized(name)
    x = torch.randn(3, 3, 16, 16)
    assert len(conv_bn_pairs(model)) == pairs
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert count_flops(folded, x[:1]) == count_flops(model, x[:1])


def test_a_pruned_folded_model_rebuilds_from_its_architecture():
    model = _randomized("resnet20")
    x = torch.randn(2, 3, 16, 16)
    graph = ChannelGraph(model, x[:1])
    counts = graph.keep_counts(np.full(len(graph.groups), 0.5))
    folded = fold_batchnorm(prune_channels(model, graph, graph.kept_channels(L1Importance(), counts)))
    rebuilt = build_from_architecture(describe_architecture(folded, "resnet20", 3, 10, 16))
    rebuilt.load_state_dict(folded.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), folded(x))


def test_inference_form_says_why_it_could_not_fold():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    model, note = inference_form(Branchy())
    assert "not folded" in note and "trace" in note
    assert isinstance(model.bn, nn.BatchNorm2d)
    folded, note = inference_form(_randomized("digits_cnn"))
    assert note == "BN folded into convs"
