"""Tests for prunegym.compression.dynamic: gated layers, the three execution modes, exactness against
physical pruning, the FLOPs density, stepping, deciders, kernel tuning, the spec's JSON form, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn

from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.deciders import PooledMLP
from prunegym.compression.dynamic import EXECUTION_MODES, DynamicNetwork, build_dynamic
from prunegym.compression.fusion import fold_batchnorm
from prunegym.compression.gated_layers import DynamicSpec, dynamic_spec, gated_layers, group_counts
from prunegym.compression.models import build_model

ZOO = {"digits_cnn": (1, 8), "resnet20": (3, 16), "vgg_small": (3, 16)}  # name -> (in_channels, input size)
BATCH = 6


def _zoo_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model(name, ZOO[name][0], 10), seed).eval()


def _inputs(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    channels, size = ZOO[name]
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _build(name: str, **kwargs):
    """(original model, network, reordered model, spec): a fresh network, so tests may change it."""
    model = _zoo_model(name)
    net, reordered, spec = build_dynamic(model, _inputs(name, 1), **kwargs)
    return model, net, reordered, spec


@pytest.fixture(scope="module")
def zoo():
    """name -> (original model, network, reordered model, spec), for tests that leave the network as is."""
    return {name: _build(name) for name in ZOO}


def _mixed_actions(spec: DynamicSpec, batch: int, seed: int) -> torch.Tensor:
    """A ``[B, L]`` batch of actions whose inputs choose differently at every layer but the first,
    where they all agree (the batch-wide slice path)."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, spec.groups, size=(batch, len(spec.layers)))
    actions[:, 0] = 1
    actions[0, 1:], actions[1, 1:] = 0, spec.groups - 1  # every other column really is mixed
    return torch.from_numpy(actions)


def _walk(net: DynamicNetwork, x: torch.Tensor, actions, mode: str = "slice"):
    """Run ``net.steps``, sending ``actions[gate]``; returns the logits and the (gate, features, spent) seen."""
    run = net.steps(x, mode)
    seen = []
    try:
        gate, features, spent = next(run)
        while True:
            seen.append((gate, features, spent))
            gate, features, spent = run.send(actions[gate])
    except StopIteration as stop:
        return stop.value, seen


# ---- gated layers and group counts -------------------------------------------------------------
def test_group_counts():
    assert group_counts(16, 4) == [4, 8, 12, 16]
    assert group_counts(10, 4) == [3, 5, 8, 10]  # ceil((a + 1) * 10 / 4)
    assert group_counts(5, 5) == [1, 2, 3, 4, 5]
    assert group_counts(7, 1) == [7]


@pytest.mark.parametrize(("channels", "groups", "match"), [
    (16, 17, "groups=17"), (4, 5, "groups=5"), (16, 0, "got 0"), (16, -2, "got -2"), (16, 2.0, "got 2.0")])
def test_group_counts_reject_bad_groups(channels, groups, match):
    with pytest.raises(ValueError, match=match):
        group_counts(channels, groups)


def test_digits_cnn_gates_every_conv(zoo):
    model, _, _, spec = zoo["digits_cnn"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [layer.name for layer in spec.layers] == convs
    assert [layer.channels for layer in spec.layers] == [16, 32, 32, 64]
    assert [layer.in_channels for layer in spec.layers] == [1, 16, 32, 32]
    assert spec.layers[0].counts == (4, 8, 12, 16)
    assert spec.groups == 4
    # each gated layer is read by the next conv (or the classifier), channel-major
    assert [[c[0] for c in layer.consumers] for layer in spec.layers] == [
        ["features.3"], ["features.7"], ["features.10"], ["classifier"]]
    assert spec.layers[0].consumers[0][1] == tuple(range(16))


def test_resnet20_gates_only_the_block_internal_convs(zoo):
    _, _, _, spec = zoo["resnet20"]
    names = [layer.name for layer in spec.layers]
    assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert "conv1" not in names and not any(n.endswith("conv2") or "shortcut" in n for n in names)
    for layer in spec.layers:
        assert [c[0] for c in layer.consumers] == [layer.name.replace("conv1", "conv2")]
        assert layer.counts == tuple(group_counts(layer.channels, 4))
    assert [layer.channels for layer in spec.layers] == [16] * 3 + [32] * 3 + [64] * 3
    assert [layer.in_channels for layer in spec.layers] == [16] * 4 + [32] * 3 + [64] * 2


def test_gated_layers_and_spec_follow_groups():
    model = _zoo_model("digits_cnn")
    graph = ChannelGraph(model, _inputs("digits_cnn", 1))
    layers = gated_layers(graph, 2)
    assert [layer.counts for layer in layers] == [(8, 16), (16, 32), (16, 32), (32, 64)]
    spec = dynamic_spec(graph, 8)
    assert spec.groups == 8 and spec.layers[0].counts == (2, 4, 6, 8, 10, 12, 14, 16)
    assert spec.dense_flops == graph.dense_flops
    with pytest.raises(ValueError, match="groups=17"):
        dynamic_spec(graph, 17)  # more than the 16 channels of the first conv


class _Tied(nn.Module):
    """Both convs feed one residual add: their channels are tied, so neither may keep a prefix alone."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv1(x)
        return self.fc(F.adaptive_avg_pool2d(y + self.conv2(F.relu(y)), 1).flatten(1))


class _InputResidual(nn.Module):
    """A conv whose output is added to the network's input: its channels are tied to the input's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(x + self.conv(x), 1).flatten(1))


def test_a_model_without_gateable_layers_raises():
    x = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph(_Tied().eval(), x)
    with pytest.raises(ValueError, match="_Tied has no gateable conv layer"):
        gated_layers(graph, 2)
    with pytest.raises(ValueError, match="no gateable conv layer"):
        build_dynamic(_Tied().eval(), x)


def test_a_conv_added_to_the_input_is_not_gated():
    model = _InputResidual().eval()
    x = torch.randn(2, 4, 8, 8)
    try:
        net, _, _ = build_dynamic(model, x[:1], groups=2)
    except ValueError:
        return  # refusing the model is right too
    with torch.no_grad():
        torch.testing.assert_close(net(x, [1]), model(x), atol=1e-5, rtol=1e-5)
        net(x, [0])  # must either work or have been refused above


# ---- the function ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_all_max_actions_equal_the_original_model(zoo, name):
    model, net, _, spec = zoo[name]
    x = _inputs(name, BATCH, seed=1)
    with torch.no_grad():
        expected = model(x)
        for mode in EXECUTION_MODES:
            out = net(x, [spec.groups - 1] * len(spec.layers), mode=mode)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            assert net.last_density == pytest.approx(1.0)


def test_a_replaced_submodule_is_the_one_that_runs():
    """Submodules are also plain attributes (a faster lookup); replacing one must still take effect."""
    model, net, _, spec = _build("resnet20")
    x = _inputs("resnet20", 2, seed=1)
    block = getattr(net.net.layer1, "0")
    assert block.__dict__["conv2"] is block._modules["conv2"]
    with torch.no_grad():
        before = net(x, [spec.groups - 1] * len(spec.layers))
        block.conv2 = nn.Identity()  # the block's conv1 output now feeds its residual add directly
        after = net(x, [spec.groups - 1] * len(spec.layers))
    assert "conv2" not in block.__dict__
    assert block.conv2 is block._modules["conv2"]
    assert not torch.allclose(before, after)
    with torch.no_grad():  # a single input runs the batch-1 program, which must see the new module too
        single = net(x[:1], [spec.groups - 1] * len(spec.layers))
    torch.testing.assert_close(single, after[:1], atol=1e-5, rtol=1e-5)


class _Pointwise(nn.Module):
    """ReLUs and adds in every spelling, some on tensors another operator reads as well: the batch-1
    program writes into a tensor only where nothing else reads it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a = self.act(self.conv1(x))
        b = self.conv2(a)
        c = F.relu(b) + b.relu()  # b is read twice: neither ReLU may write into it
        d = torch.add(self.conv3(c), 1.0).relu()  # a scalar add
        e = torch.relu(self.conv4(d)) + d  # d is read twice
        return self.fc(e.mean((2, 3)))


@pytest.mark.parametrize("name", [*sorted(ZOO), "pointwise"])
def test_a_single_input_runs_like_the_general_path(name):
    """At batch 1 the slice path runs as generated straight-line code; it must give what the general
    path (mask mode) gives, decide the same, and leave the input and every tensor a decider saw as
    they were."""
    if name == "pointwise":
        torch.manual_seed(0)
        model, x = _Pointwise().eval(), torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    else:
        model, x = _zoo_model(name), _inputs(name, 4, seed=21)
    seen = []
    rng = np.random.default_rng(0)

    def decider(gate, features, spent):
        seen.append((features, features.clone()))
        return int(rng.integers(0, 4))

    net, _, spec = build_dynamic(model, x[:1], decider=decider)
    net.eval()
    with torch.no_grad():
        for i in range(len(x)):
            single = x[i:i + 1].clone()
            out = net(single)
            actions, density = list(net.last_actions), float(net.last_density)
            assert all(isinstance(a, int) for a in actions)
            torch.testing.assert_close(single, x[i:i + 1], atol=0, rtol=0)
            for features, copy in seen:
                torch.testing.assert_close(features, copy, atol=0, rtol=0)
            seen.clear()
            expected = net(x[i:i + 1], actions, mode="mask")
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            assert density == pytest.approx(float(spec.density(np.array(actions))))


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_slice_loop_and_mask_modes_agree_on_a_mixed_batch(zoo, name):
    model, net, _, spec = zoo[name]
    x = _inputs(name, BATCH, seed=2)
    actions = _mixed_actions(spec, BATCH, seed=3)
    expected_density = spec.density(actions.numpy())
    outs = {}
    with torch.no_grad():
        dense = model(x)
        for mode in EXECUTION_MODES:
            outs[mode] = net(x, actions, mode=mode)
            assert outs[mode].shape == (BATCH, 10)
            np.testing.assert_allclose(np.asarray(net.last_density), expected_density, rtol=1e-5, atol=1e-6)
            decided = torch.stack([torch.as_tensor(a).expand(BATCH) for a in net.last_actions], dim=1)
            assert torch.equal(decided, actions)
        rows = torch.cat([net(x[i: i + 1], actions[i].tolist()) for i in range(BATCH)])
    torch.testing.assert_close(outs["loop"], outs["slice"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["mask"], outs["slice"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows, outs["slice"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["slice"], dense, atol=1e-3)  # the actions really pruned something
    assert len(set(expected_density.round(9))) > 1  # ...and differently per input


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_a_mixed_batch_runs_in_groups_that_chose_alike_and_equals_each_input_alone(name, monkeypatch):
    """64 inputs whose decider picks by their features: each layer computes every group of inputs with
    the same (output, input) actions once, at that group's weight slice, and the outputs, actions
    and densities are those of running each input alone."""
    from prunegym.compression.dynamic_layer import DynamicLayer

    def decider(gate, features, spent):  # from each input's own features; zero channels add nothing
        level = features.flatten(1).sum(dim=1) / features[0, 0].numel()
        return (level.abs() * 10).long() % 4

    model = _zoo_model(name)
    net, _, spec = build_dynamic(model, _inputs(name, 1), decider=decider)
    net.eval()
    x = _inputs(name, 64, seed=4) * torch.linspace(0.2, 3.0, 64).view(-1, 1, 1, 1)
    calls = []
    compute = DynamicLayer.compute

    def recorded(self, xs, key):
        calls.append((self, key, xs.shape[0]))
        return compute(self, xs, key)

    with torch.no_grad():
        rows, expected_actions, expected_density = [], [], []
        for i in range(64):
            rows.append(net(x[i:i + 1]))
            expected_actions.append([int(a) for a in net.last_actions])
            expected_density.append(float(net.last_density))
        monkeypatch.setattr(DynamicLayer, "compute", recorded)
        out = net(x)
    actions = torch.stack([torch.as_tensor(a).expand(64) for a in net.last_actions], dim=1)
    torch.testing.assert_close(out, torch.cat(rows), atol=1e-5, rtol=1e-5)
    assert actions.tolist() == expected_actions
    np.testing.assert_allclose(np.asarray(net.last_density), expected_density, rtol=1e-6)
    mixed = [g for g in range(len(spec.layers)) if len(set(actions[:, g].tolist())) > 1]
    assert mixed, "the decider must split the batch somewhere"
    for layer in {call[0] for call in calls}:
        keys = [(key, n) for owner, key, n in calls if owner is layer]
        a_out = actions[:, layer.gate_out] if layer.gate_out >= 0 else torch.zeros(64, dtype=torch.long)
        a_in = actions[:, layer.gate_in] if layer.gate_in >= 0 else torch.zeros(64, dtype=torch.long)
        pairs = list(zip(a_out.tolist(), a_in.tolist(), strict=True))
        expected_groups = {pair: pairs.count(pair) for pair in set(pairs)}
        assert dict(keys) == expected_groups and len(keys) == len(expected_groups)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "vgg_small"])
def test_slice_output_equals_the_physically_pruned_model(zoo, name):
    _, net, reordered, spec = zoo[name]
    assert not reordered.training
    x = _inputs(name, 1, seed=4)
    graph = ChannelGraph(reordered, x)
    rng = np.random.default_rng(5)
    for actions in (rng.integers(0, spec.groups, len(spec.layers)), np.zeros(len(spec.layers), dtype=np.int64)):
        keep = {layer.name: layer.counts[a] for layer, a in zip(spec.layers, actions, strict=True)}
        counts = [keep.get(group.name, group.num_channels) for group in graph.groups]
        assert sum(group.name in keep for group in graph.groups) == len(spec.layers)
        pruned = prune_channels(reordered, graph, [torch.arange(k) for k in counts]).eval()
        with torch.no_grad():
            expected = pruned(x)
            out = net(x, actions.tolist())
            dense = reordered(x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(out, dense, atol=1e-3)
        # the spec's density is the pruned model's FLOPs over the dense model's
        assert net.last_density == pytest.approx(graph.flops(np.array(counts)) / graph.dense_flops, rel=1e-9)
        assert spec.density(actions) == pytest.approx(net.last_density, rel=1e-9)


def test_unfolded_network_in_mask_mode_equals_the_folded_one():
    """``fold_bn=False`` keeps the BNs (to train further): mask mode computes every channel, so it
    runs them in eval mode and agrees with the folded network's slice path."""
    _, folded, _, spec = _build("digits_cnn")
    _, unfolded, _, _ = _build("digits_cnn", fold_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = _inputs("digits_cnn", BATCH, seed=6)
    actions = _mixed_actions(spec, BATCH, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(unfolded(x, actions, mode="mask"), folded(x, actions), atol=1e-5, rtol=1e-5)


# ---- density -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_density_increases_with_the_action(zoo, name):
    _, net, _, spec = zoo[name]
    layers = len(spec.layers)
    uniform = [float(spec.density(np.full(layers, a))) for a in range(spec.groups)]
    assert all(lo < hi for lo, hi in zip(uniform, uniform[1:], strict=False)), uniform
    assert uniform[-1] == pytest.approx(1.0)
    assert 0.0 < uniform[0] < 1.0
    x = _inputs(name, 2)
    with torch.no_grad():
        for a in range(spec.groups):
            net(x, [a] * layers)
            assert net.last_density == pytest.approx(uniform[a], rel=1e-9)
    # raising one layer's action never lowers the density; batched rows give one value each
    rows = np.random.default_rng(8).integers(0, spec.groups - 1, size=(5, layers))
    base = spec.density(rows)
    assert base.shape == (5,)
    for g in range(layers):
        more = rows.copy()
        more[:, g] += 1
        assert np.all(spec.density(more) > base)


# ---- stepping and deciders ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["slice", "mask"])
@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_steps_gives_the_forward_logits(zoo, name, mode):
    _, net, _, spec = zoo[name]
    x = _inputs(name, BATCH, seed=9)
    actions = _mixed_actions(spec, BATCH, seed=10)
    with torch.no_grad():
        expected = net(x, actions, mode=mode)
        density = net.last_density.clone()
        logits, seen = _walk(net, x, actions.unbind(1), mode)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(net.last_density, density)
    assert [gate for gate, _, _ in seen] == list(range(len(spec.layers)))
    spent = torch.stack([torch.as_tensor(s, dtype=torch.float32).expand(BATCH) for _, _, s in seen])
    assert (spent[1:] >= spent[:-1]).all()
    assert (spent[0] < 1).all() and (spent[-1] <= density + 1e-6).all()
    assert all(features.shape[0] == BATCH for _, features, _ in seen)


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the conv and linear layers in the order a forward pass calls them."""
    order, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


@pytest.mark.parametrize("name", ["digits_cnn", "vgg_small", "resnet20"])
def test_spent_is_the_density_of_the_layers_already_run(zoo, name):
    """``spent`` at a gated layer: the FLOPs of every layer run before it, over the dense FLOPs."""
    model, net, _, spec = zoo[name]
    x = _inputs(name, 2, seed=23)
    actions = _mixed_actions(spec, 2, seed=24)
    with torch.no_grad():
        _, seen = _walk(net, x, actions.unbind(1))
    fractions = np.array([[layer.counts[a] / layer.channels for layer, a in zip(spec.layers, row, strict=True)]
                          for row in actions.tolist()])  # [B, L]
    order = _execution_order(model, x[:1])
    costs = {c[0]: c for c in spec.costs}
    for gate, _, spent in seen:
        before = order[: order.index(spec.layers[gate].name)]
        expected = np.zeros(2)
        for layer in before:
            _, flops, g_in, g_out = costs[layer]
            f_in = fractions[:, g_in] if g_in >= 0 else 1.0
            f_out = fractions[:, g_out] if g_out >= 0 else 1.0
            expected += flops * f_in * f_out / spec.dense_flops
        np.testing.assert_allclose(np.broadcast_to(np.asarray(spent), (2,)), expected, rtol=1e-5, atol=1e-7,
                                   err_msg=f"gate {gate} ({spec.layers[gate].name})")


def test_steps_with_int_actions_and_a_single_input(zoo):
    _, net, _, spec = zoo["vgg_small"]
    x = _inputs("vgg_small", 1, seed=11)
    actions = [3, 0, 2, 1, 0, 3]
    with torch.no_grad():
        expected = net(x, actions)
        logits, seen = _walk(net, x, actions)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    assert net.last_density == pytest.approx(float(spec.density(np.array(actions))))
    assert [float(s) for _, _, s in seen] == sorted(float(s) for _, _, s in seen)


@pytest.mark.parametrize(("name", "action"), [("digits_cnn", 3), ("digits_cnn", 0), ("resnet20", 0)])
def test_decider_sees_each_layers_input(name, action):
    _, _, _, spec = _build(name)
    calls = []

    def decider(gate, features, spent):
        calls.append((gate, features.shape[1], float(spent)))
        return action

    _, net, _, _ = _build(name, decider=decider)
    x = _inputs(name, 2, seed=12)
    with torch.no_grad():
        out = net(x)
        expected = net(x, [action] * len(spec.layers))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert [c[0] for c in calls] == list(range(len(spec.layers)))  # once per gated layer, in order
    widths = [c[1] for c in calls]
    if name == "digits_cnn" and action < spec.groups - 1:
        # a plain chain: each gated layer reads only what the previous one kept
        assert widths == [1] + [layer.counts[action] for layer in spec.layers[:-1]]
    else:
        assert widths == [layer.in_channels for layer in spec.layers]
    assert [c[2] for c in calls] == sorted(c[2] for c in calls)


def test_decider_may_return_one_action_per_input():
    _, _, _, spec = _build("digits_cnn")
    actions = _mixed_actions(spec, BATCH, seed=13)
    _, net, _, _ = _build("digits_cnn", decider=lambda gate, features, spent: actions[:, gate].clone())
    x = _inputs("digits_cnn", BATCH, seed=14)
    with torch.no_grad():
        out = net(x)
        decided = torch.stack(net.last_actions, dim=1)
        density = net.last_density
        expected = net(x, actions)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert torch.equal(decided, actions)
    np.testing.assert_allclose(np.asarray(density), spec.density(actions.numpy()), rtol=1e-5)


def test_fixed_actions_with_gaps_are_filled_by_the_decider():
    calls = []

    def decider(gate, features, spent):
        calls.append(gate)
        return 1

    _, net, _, _ = _build("digits_cnn", decider=decider)
    x = _inputs("digits_cnn", 2, seed=15)
    with torch.no_grad():
        out = net(x, [3, None, 0, None])
        expected = net(x, [3, 1, 0, 1])
    assert calls == [1, 3]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_no_action_and_no_decider_raises(zoo):
    _, net, _, _ = zoo["digits_cnn"]
    with pytest.raises(ValueError, match="no action for gated layer 0 and no decider"):
        net(_inputs("digits_cnn", 1))
    with pytest.raises(ValueError, match="no action for gated layer 2"):
        net(_inputs("digits_cnn", 1), [1, 1, None, 1])


# ---- mask mode: training through the keep mask -------------------------------------------------
def test_mask_mode_passes_gradients_to_a_soft_prefix_mask():
    _, net, _, spec = _build("digits_cnn")
    net.train()
    x = _inputs("digits_cnn", 3, seed=16)
    groups = spec.groups
    sources = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
               for _ in spec.layers]
    assert sources[0].shape == (3, groups)
    net.decider = lambda gate, features, spent: sources[gate]
    assert net.training  # mask mode by default
    out = net(x)
    loss = F.cross_entropy(out, torch.tensor([0, 1, 2])) + net.last_density.sum()
    loss.backward()
    for source in sources:
        assert source.grad is not None
        assert source.grad.abs().sum() > 0
    # a 0/1 prefix mask computes what the matching integer actions do
    net.eval()
    with torch.no_grad():
        expected = net(x, torch.tensor([[1, 3, 0]] * len(spec.layers)).T)
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)


def test_a_keep_mask_needs_mask_mode(zoo):
    _, net, _, spec = zoo["digits_cnn"]
    mask = torch.ones(2, spec.groups)
    with pytest.raises(ValueError, match="needs mask mode"):
        net(_inputs("digits_cnn", 2), [mask] * len(spec.layers))


# ---- kernels -----------------------------------------------------------------------------------
def test_tune_keeps_the_outputs():
    _, net, _, spec = _build("resnet20")
    _, reference, _, _ = _build("resnet20")
    x = _inputs("resnet20", 1, seed=17)
    choices = net.tune(x, repeats=2)
    assert isinstance(choices, dict)
    assert json.loads(json.dumps(choices)) == choices
    assert net.kernels() == choices
    rng = np.random.default_rng(18)
    with torch.no_grad():
        for actions in (rng.integers(0, 4, len(spec.layers)), [0] * 9, [3] * 9):
            actions = [int(a) for a in actions]
            torch.testing.assert_close(net(x, actions), reference(x, actions), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built into this torch")
def test_set_kernels_round_trips_and_keeps_the_outputs():
    _, net, _, spec = _build("digits_cnn")
    _, reference, _, _ = _build("digits_cnn")
    all_slices = [f"{o},{i}" for o in range(4) for i in range(4)]
    choices = {"features.3": dict.fromkeys(all_slices, "onednn"), "features.0": {"1,0": "onednn"}}
    if torch._nnpack_available():
        choices["features.7"] = dict.fromkeys(all_slices, "nnpack")
    net.set_kernels(choices)
    assert net.kernels() == choices
    x = _inputs("digits_cnn", 1, seed=19)
    xb = _inputs("digits_cnn", 3, seed=20)
    with torch.no_grad():
        for actions in ([1, 2, 0, 3], [3, 3, 3, 3], [0, 1, 2, 0]):
            torch.testing.assert_close(net(x, actions), reference(x, actions), atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(net(xb, actions), reference(xb, actions), atol=1e-5, rtol=1e-5)
    net.set_kernels({})
    assert net.kernels() == {}


@pytest.mark.parametrize(("choices", "match"), [
    ({"nonexistent.conv": {"0,0": "aten"}}, "nonexistent.conv"),
    ({"features.3": {"0,0": "cudnn"}}, "cudnn"),
    ({"features.3": {"9,9": "aten"}}, "9,9"),
    ({"classifier": {"0,0": "onednn"}}, "onednn"),  # a linear layer runs ATen only
])
def test_set_kernels_rejects_unknown_choices(choices, match):
    _, net, _, _ = _build("digits_cnn")
    with pytest.raises(ValueError, match=match):
        net.set_kernels(choices)


# ---- the spec as JSON --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_spec_round_trips_through_json(zoo, name):
    _, net, reordered, spec = zoo[name]
    text = json.dumps(spec.to_dict())
    loaded = DynamicSpec.from_dict(json.loads(text))
    assert loaded == spec
    assert loaded.groups == spec.groups
    rebuilt = DynamicNetwork(fold_batchnorm(reordered), loaded).eval()
    x = _inputs(name, BATCH, seed=21)
    actions = _mixed_actions(spec, BATCH, seed=22)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, actions), net(x, actions), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(loaded.density(actions.numpy()), spec.density(actions.numpy()))


# ---- bad input ---------------------------------------------------------------------------------
def test_wrong_number_of_actions_raises(zoo):
    _, net, _, _ = zoo["digits_cnn"]
    x = _inputs("digits_cnn", 2)
    with pytest.raises(ValueError, match=r"one action per gated layer \(4\), got 3"):
        net(x, [1, 1, 1])
    with pytest.raises(ValueError, match=r"\(4\), got 5"):
        net(x, torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize(("actions", "mode"), [
    ([4, 3, 3, 3], "slice"),
    ([-1, 3, 3, 3], "slice"),
    ([-1, 3, 3, 3], "mask"),
    (torch.tensor([[4, 3, 3, 3], [4, 3, 3, 3]]), "slice"),
    (torch.tensor([[-1, 3, 3, 3], [0, 3, 3, 3]]), "slice"),
    (torch.tensor([[-1, 3, 3, 3], [-1, 3, 3, 3]]), "mask"),
])
def test_action_out_of_range_raises(zoo, actions, mode):
    _, net, _, _ = zoo["digits_cnn"]
    bad = int(actions[0][0]) if isinstance(actions, torch.Tensor) else actions[0]
    with torch.no_grad(), pytest.raises(ValueError, match=rf"action {bad}\b.*'features\.0'"):
        net(_inputs("digits_cnn", 2), actions, mode=mode)


def test_unknown_mode_raises(zoo):
    _, net, _, _ = zoo["digits_cnn"]
    with pytest.raises(ValueError, match="'fast'"):
        net(_inputs("digits_cnn", 1), [3, 3, 3, 3], mode="fast")


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it (torch-pruning, which runs it, can)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv1(x)
        if x.sum() > 0:
            x = F.relu(x)
        return self.fc(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


def test_a_depthwise_conv_leaves_its_group_ungated_and_is_refused_by_name_in_reordering():
    from prunegym.compression.channels import reorder_channels
    from prunegym.compression.importance import L1Importance

    class _Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(torch.relu(self.dw(x)).mean((2, 3)))

    torch.manual_seed(0)
    model, x = _Depthwise().eval(), torch.randn(3, 3, 6, 6)
    net, _, spec = build_dynamic(model, x[:1])
    assert [layer.name for layer in spec.layers] == ["conv1"]  # conv2's channels are read by the depthwise conv
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, [spec.groups - 1]), model(x), atol=1e-5, rtol=1e-5)
        assert net(x[:1], [0]).shape == (1, 3)
    with pytest.raises(ValueError, match="'dw' has groups=8"):
        reorder_channels(model, ChannelGraph(model, x[:1]), L1Importance())


def test_a_model_fx_cannot_trace_raises():
    model = _Branchy().eval()
    x = torch.randn(1, 1, 8, 8)
    spec = dynamic_spec(ChannelGraph(model, x), 4)
    assert [layer.name for layer in spec.layers] == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="torch.fx-traceable model; _Branchy"):
        DynamicNetwork(model, spec)
    with pytest.raises(ValueError):
        build_dynamic(model, x)


def test_a_spec_for_another_model_raises(zoo):
    _, _, _, spec = zoo["vgg_small"]
    with pytest.raises(ValueError, match="features.14"):
        DynamicNetwork(fold_batchnorm(_zoo_model("digits_cnn")), spec)


# ---- PooledMLP --------------------------------------------------------------------------------------
def _pooled_mlp(seed: int = 0):
    """A PooledMLP over 6 channels with one extra, clipped, and the torch MLP it stands for."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(6 + 1 + 1, 5, generator=gen)
    second = torch.randn(5 + 1, 3, generator=gen)
    low, high = torch.full((8,), -2.0), torch.full((8,), 2.0)
    low[-2:], high[-2:] = -torch.inf, torch.inf

    def reference(features: torch.Tensor, extra: float) -> torch.Tensor:
        x = torch.cat([features.sum((2, 3))[0], torch.tensor([extra, 1.0])]).clamp(low, high)
        h = torch.tanh(x @ first)
        return torch.cat([h, torch.ones(1)]) @ second

    return PooledMLP(6, first, [nn.Tanh(), second], low, high), reference


def test_pooled_mlp_equals_the_torch_mlp_clip_included():
    mlp, reference = _pooled_mlp()
    gen = torch.Generator().manual_seed(1)
    for i in range(20):
        features = torch.randn(1, 6, 3, 3, generator=gen) * (0.1 if i % 2 else 1.0)  # some sums clipped
        out = mlp(features, i / 20)
        np.testing.assert_allclose(out, reference(features, i / 20).numpy(), rtol=1e-5, atol=1e-5)


def test_a_copied_pooled_mlp_has_vectors_of_its_own():
    import copy

    mlp, reference = _pooled_mlp()
    features = torch.randn(1, 6, 3, 3)
    mlp(features, 0.5)
    twin = copy.deepcopy(mlp)
    np.testing.assert_allclose(twin(2 * features, 0.1), reference(2 * features, 0.1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mlp(features, 0.5), reference(features, 0.5).numpy(), rtol=1e-5, atol=1e-5)


def test_pooled_mlp_refuses_an_activation_it_does_not_run():
    with pytest.raises(ValueError, match="GELU"):
        PooledMLP(6, torch.zeros(8, 5), [nn.GELU(), torch.zeros(6, 3)])
