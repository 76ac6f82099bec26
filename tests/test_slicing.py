"""Tests for prunegym.compression.slicing: a candidate's sub-network by slicing the model's parameters,
and the proxy's use of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize_bn
from torch import nn

from prunegym.compression.channels import ChannelGraph, SoftMask, prune_channels
from prunegym.compression.data import Split
from prunegym.compression.models import build_model
from prunegym.compression.proxy import ProxyEvaluator
from prunegym.compression.slicing import ChannelSlicer, unsliceable


def _random_kept(graph: ChannelGraph, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:int(torch.randint(1, n + 1, (1,), generator=gen))]
            for n in graph.num_channels]


@pytest.mark.parametrize("name,channels,size", [("digits_cnn", 1, 8), ("resnet20", 3, 32), ("vgg_small", 3, 16)])
def test_sliced_network_is_the_pruned_network(name, channels, size):
    torch.manual_seed(0)
    model = randomize_bn(build_model(name, channels, 10), 0).eval()
    x = torch.randn(4, channels, size, size)
    graph = ChannelGraph(model, x[:1])
    slicer = ChannelSlicer(model, graph)
    for seed in range(3):  # any channels, not only prefixes
        kept = _random_kept(graph, seed)
        sliced, pruned = slicer(kept), prune_channels(model, graph, kept)
        with torch.no_grad():
            torch.testing.assert_close(sliced(x), pruned(x), rtol=0, atol=1e-6)
        for tensors in ("named_parameters", "named_buffers"):
            shapes = [[(n, t.shape) for n, t in getattr(m, tensors)()] for m in (sliced, pruned)]
            assert shapes[0] == shapes[1]
        for module in sliced.modules():
            if isinstance(module, nn.Conv2d):
                assert (module.out_channels, module.in_channels) == tuple(module.weight.shape[:2])
            if isinstance(module, nn.BatchNorm2d):
                assert module.num_features == module.weight.shape[0]


def test_sliced_network_owns_its_tensors_and_reads_the_model_as_it_is_now():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10).train()
    x = torch.randn(8, 1, 8, 8)
    graph = ChannelGraph(model, x[:1])
    mask = SoftMask(model, graph)  # a hook on the model does not reach the slices
    mask.set([torch.arange(1) for _ in graph.groups])
    slicer = ChannelSlicer(model, graph)
    kept = [torch.arange(n // 2) for n in graph.num_channels]
    sub = slicer(kept)
    assert sub.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(sub.parameters(), lr=0.5)
    sub(x).sum().backward()
    optimizer.step()  # and its BN statistics moved in train mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mask.set(None)
    model.eval()
    again = slicer(kept)
    assert not again.training
    with torch.no_grad():
        torch.testing.assert_close(again(x), prune_channels(model, graph, kept)(x), rtol=0, atol=1e-5)


class _WithPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.PReLU(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv2(self.act(self.bn1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_layers_it_cannot_slice_are_named_and_the_proxy_soft_masks_them():
    model = _WithPReLU().eval()
    assert unsliceable(model) == ["act (PReLU)"]
    assert unsliceable(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))) == ["0 (Conv2d, groups=4)"]
    assert unsliceable(build_model("resnet20", 3, 10)) == []
    x = torch.randn(1, 1, 8, 8)
    graph = ChannelGraph(model, x)
    with pytest.raises(ValueError, match=r"cannot slice the channels of _WithPReLU: act \(PReLU\)"):
        ChannelSlicer(model, graph)
    gen = torch.Generator().manual_seed(0)
    train = Split(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    proxy = ProxyEvaluator(model, graph, [torch.arange(n) for n in graph.num_channels], train,
                           recalibration_batches=0)
    counts = np.array([max(1, n // 2) for n in graph.num_channels])
    kept = [torch.arange(int(k)) for k in counts]
    expected = nn.functional.cross_entropy(prune_channels(model, graph, kept)(train.x), train.y).item()
    assert proxy(counts, train)["loss"] == pytest.approx(expected, abs=1e-5)
    proxy.close()


def test_bad_candidates_are_refused():
    model = build_model("digits_cnn", 1, 10).eval()
    graph = ChannelGraph(model, torch.randn(1, 1, 8, 8))
    slicer = ChannelSlicer(model, graph)
    with pytest.raises(ValueError, match=f"need kept channels for {len(graph.groups)} groups, got 1"):
        slicer([torch.arange(2)])
    kept = [torch.arange(2) for _ in graph.groups]
    kept[1] = torch.arange(0)
    with pytest.raises(ValueError, match=f"cannot prune every channel of group '{graph.groups[1].name}'"):
        slicer(kept)


@pytest.mark.parametrize("name,channels,size", [("digits_cnn", 1, 8), ("resnet20", 3, 16)])
def test_forward_at_a_width_has_the_soft_masked_gradients(name, channels, size):
    torch.manual_seed(0)
    model = randomize_bn(build_model(name, channels, 10), 0).train()
    x, y = torch.randn(6, channels, size, size), torch.randint(0, 10, (6,))
    graph = ChannelGraph(model, x[:1])
    kept = [torch.arange(max(1, n // 3)) for n in graph.num_channels]
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    sliced = gradients(nn.functional.cross_entropy(ChannelSlicer(model, graph).forward(kept, x), y))
    for k, v in model.state_dict().items():  # the sub-network's batch statistics stay its own
        if "running" in k:
            assert torch.equal(v, running[k]), k
    mask = SoftMask(model, graph)
    mask.set(kept)
    masked = gradients(nn.functional.cross_entropy(model(x), y))
    mask.remove()
    for (n, _), a, b in zip(model.named_parameters(), sliced, masked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for g in sliced)
