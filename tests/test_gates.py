"""Tests for the gate baseline (compression/gates.py: ChannelGate, GateDecider, train_dynamic, train_gates,
dynamic_inference), the per-input observation (prunegym.compression.deciders.Observation) and the per-input latency
(compression/metrics.py: measure_input_latency)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from prunegym.compression import base_model, build_model, load_dataset
from prunegym.compression.deciders import FEATURE_CLIP, Observation
from prunegym.compression.dynamic import DynamicNetwork, build_dynamic, evaluate_dynamic
from prunegym.compression.gates import ChannelGate, GateDecider, dynamic_inference, train_dynamic, train_gates
from prunegym.compression.metrics import measure_input_latency

GROUPS = 4
BATCH = 8
TARGETS = (0.3, 0.9)  # a low and a high target density for train_gates
GATE_EPOCHS = 3


def _inputs(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _dynamic(model: nn.Module | None = None):
    """(unfolded network, reordered model, spec) of a digits CNN (random weights unless ``model`` is given)."""
    if model is None:
        torch.manual_seed(0)
        model = build_model("digits_cnn", 1, 10).eval()
    return build_dynamic(model, _inputs(1), groups=GROUPS, fold_bn=False)


def _features(channels: int, batch: int = BATCH, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, channels, 4, 4, generator=gen) + torch.randn(1, channels, 1, 1, generator=gen)


def _mixed_gates(decider: GateDecider, seed: int = 1) -> GateDecider:
    """Random gate weights without the opening bias, so the inputs of a batch decide differently."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in decider.gates:
            for layer in (gate.fc1, gate.fc2):
                layer.weight.copy_(3.0 * torch.randn(layer.weight.shape, generator=gen))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    return decider


def _leading_ones(mask: torch.Tensor) -> list[int]:
    counts = []
    for row in mask.detach().round().tolist():  # 0/1 up to float rounding
        n = 0
        while n < len(row) and row[n] == 1.0:
            n += 1
        counts.append(n)
    return counts


# ---- GateDecider ---------------------------------------------------------------------------------
@pytest.fixture()
def gated():
    net, reordered, spec = _dynamic()
    return net, reordered, spec, _mixed_gates(GateDecider(spec))


def test_train_mode_gives_a_prefix_mask_that_keeps_the_first_group(gated):
    _, _, spec, decider = gated
    decider.train()
    mixed = False
    for g, layer in enumerate(spec.layers):
        mask = decider(g, _features(layer.in_channels, seed=g), 0.0)
        assert mask.shape == (BATCH, GROUPS)
        assert mask.dtype.is_floating_point
        # 0/1 up to float rounding (exactly 0/1: test_train_mode_mask_is_exactly_zero_or_one)
        torch.testing.assert_close(mask.detach(), mask.detach().round(), atol=1e-6, rtol=0)
        assert torch.equal(mask[:, 0], torch.ones(BATCH))
        assert bool((mask[:, 1:] <= mask[:, :-1]).all()), mask  # non-increasing along the groups: a prefix
        mixed |= len(set(_leading_ones(mask))) > 1
    assert mixed  # the inputs really decided differently somewhere


def test_train_mode_mask_is_exactly_zero_or_one(gated):
    _, _, spec, decider = gated
    decider.train()
    for g, layer in enumerate(spec.layers):
        mask = decider(g, _features(layer.in_channels, seed=g), 0.0).detach()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}, mask


def test_the_straight_through_estimator_passes_gradients_to_the_gate(gated):
    _, _, spec, decider = gated
    decider.train()
    g = 1
    mask = decider(g, _features(spec.layers[g].in_channels, seed=3), 0.0)
    assert mask.requires_grad
    weights = torch.arange(1.0, GROUPS + 1.0)
    (mask * weights).sum().backward()
    grad = decider.gates[g].fc2.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert decider.gates[g].fc1.weight.grad.abs().sum() > 0
    for other, gate in enumerate(decider.gates):  # only the gate that decided gets a gradient
        if other != g:
            assert gate.fc2.weight.grad is None


def test_eval_mode_gives_the_action_of_the_train_mode_mask(gated):
    _, _, spec, decider = gated
    for g, layer in enumerate(spec.layers):
        features = _features(layer.in_channels, seed=10 + g)
        with torch.no_grad():
            mask = decider.train()(g, features, 0.0)
            actions = decider.eval()(g, features, 0.0)
            single = decider(g, features[:1], 0.0)
        assert isinstance(actions, torch.Tensor)
        assert actions.dtype == torch.long and actions.shape == (BATCH,)
        assert actions.tolist() == [n - 1 for n in _leading_ones(mask)]
        assert type(single) is int
        assert single == actions[0].item()
        assert 0 <= actions.min() and actions.max() <= GROUPS - 1
        # a single input decides through a PooledMLP: the same for every input, and every input's
        # features are not the same width as the gate's input (the dropped channels are zeros)
        with torch.no_grad():
            assert [decider(g, features[i:i + 1], 0.0) for i in range(BATCH)] == actions.tolist()
            narrow = features[:, : max(1, layer.in_channels // 2)]
            assert [decider(g, narrow[i:i + 1], 0.0) for i in range(BATCH)] == decider(g, narrow, 0.0).tolist()


def test_single_input_decisions_follow_weights_changed_in_training(gated):
    _, _, spec, decider = gated
    features = _features(spec.layers[0].in_channels, seed=3)[:1]
    decider.eval()
    with torch.no_grad():
        decider(0, features, 0.0)
        decider.gates[0].fc2.bias.fill_(-50.0)  # every gate shut
        decider.train().eval()  # as train_dynamic leaves it
        assert decider(0, features, 0.0) == 0


def test_a_new_gate_keeps_every_group():
    _, _, spec = _dynamic()
    decider = GateDecider(spec).eval()
    for g, layer in enumerate(spec.layers):
        # fc2's bias (sigmoid(1) > 0.5) opens every gate while fc2's weights are small
        with torch.no_grad():
            decider.gates[g].fc2.weight.zero_()
        assert decider(g, _features(layer.in_channels, seed=g), 0.0).tolist() == [GROUPS - 1] * BATCH


def test_channel_gate_reads_dropped_channels_as_zeros():
    gate = ChannelGate(16, GROUPS)
    features = _features(16, seed=4)
    kept = features[:, :6]
    padded = torch.cat([kept, torch.zeros(BATCH, 10, 4, 4)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(gate(kept), gate(padded), atol=0, rtol=0)
        assert gate(features).shape == (BATCH, GROUPS - 1)


class _Recording(nn.Module):
    """A decider wrapper that records the width of the features each call receives."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[int, int]] = []

    def forward(self, gate, features, spent=None):
        self.seen.append((gate, features.shape[1]))
        return self.inner(gate, features, spent)


def test_the_gate_reads_the_features_entering_its_layer(gated):
    net, reordered, spec, decider = gated
    recording = _Recording(decider)
    net.decider = recording
    net.train()  # mask mode: every channel is computed, each gate sees its layer's whole input
    out = net(_inputs(BATCH, seed=5))
    assert out.shape == (BATCH, 10)
    assert recording.seen == [(g, layer.in_channels) for g, layer in enumerate(spec.layers)]
    assert [layer.in_channels for layer in spec.layers] == [1, 16, 32, 32]

    # slice mode at batch 1: each gate of the plain chain reads the channels the previous one kept
    inference = dynamic_inference(reordered, spec, _Recording(decider))
    narrowed = False
    for seed in range(6):
        inference.decider.seen.clear()
        with torch.no_grad():
            inference(_inputs(1, seed=20 + seed))
        actions = inference.last_actions
        expected = [1] + [spec.layers[g].counts[actions[g]] for g in range(len(spec.layers) - 1)]
        assert inference.decider.seen == list(enumerate(expected))
        narrowed |= expected != [layer.in_channels for layer in spec.layers]
    assert narrowed  # some gate read fewer channels than its layer's full input


# ---- train_gates on the trained digits model -----------------------------------------------------
@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", 0)


@pytest.fixture(scope="module")
def base(prunegym_cache, splits):
    return base_model("digits_cnn", splits, 0, epochs=2)


@pytest.fixture(scope="module")
def trained(base, splits):
    """target density -> (inference network, trained model, spec, summary, test evaluation)."""
    before = copy.deepcopy(base.state_dict())
    results = {}
    for target in TARGETS:
        inference, model, spec, summary = train_gates(base, splits, target_density=target, groups=GROUPS,
                                                      epochs=GATE_EPOCHS, seed=0)
        results[target] = (inference, model, spec, summary,
                           evaluate_dynamic(inference, splits.test.x, splits.test.y))
    for key, value in base.state_dict().items():  # the base model is left as it was
        assert torch.equal(value, before[key]), key
    return results


def test_a_lower_target_density_keeps_less(trained):
    low, high = (trained[t][4]["density_mean"] for t in TARGETS)
    assert 0 < low < high <= 1
    assert high - low > 0.2, (low, high)
    for target in TARGETS:
        summary = trained[target][3]
        assert len(summary["history"]) == GATE_EPOCHS
        assert 0 < summary["reward_density_mean"] <= 1 and 0 <= summary["reward_accuracy"] <= 1


def test_densities_differ_across_inputs(trained):
    stds = [trained[t][4]["density_std"] for t in TARGETS]
    assert max(stds) > 0, stds
    spread = TARGETS[int(np.argmax(stds))]
    densities = trained[spread][4]["densities"]
    assert densities.shape == (len(trained[spread][4]["actions"]),)
    assert len(np.unique(np.round(densities, 9))) > 1


def test_summary_matches_the_reward_split(trained, splits):
    inference, _, _, summary, _ = trained[TARGETS[0]]
    result = evaluate_dynamic(inference, splits.reward.x, splits.reward.y)
    assert summary["reward_accuracy"] == pytest.approx(result["accuracy"], abs=1e-12)
    assert summary["reward_density_mean"] == pytest.approx(result["density_mean"], abs=1e-9)


@pytest.mark.parametrize("target", TARGETS)
def test_the_inference_network_runs_folded_in_slice_mode(trained, splits, target):
    inference, model, spec, _, _ = trained[target]
    assert isinstance(inference, DynamicNetwork)
    assert not inference.training
    assert not inference.decider.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in inference.modules())  # BN folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the trained model is not
    assert len(spec.layers) == 4 and spec.groups == GROUPS
    x = splits.test.x[:64]
    with torch.no_grad():
        batch = inference(x)  # eval mode: the slice path
        batch_actions = [torch.as_tensor(a) for a in inference.last_actions]
        loop = inference(x, mode="loop")
        loop_actions = inference.last_actions
    assert batch.shape == (64, 10)
    torch.testing.assert_close(batch, loop, atol=1e-4, rtol=0)
    for a, b in zip(batch_actions, loop_actions, strict=True):
        assert torch.equal(a.expand(64), b)


def test_the_inference_network_equals_the_trained_model_in_mask_mode(trained, splits):
    inference, model, spec, _, _ = trained[TARGETS[0]]
    unfolded = DynamicNetwork(copy.deepcopy(model).eval(), spec, copy.deepcopy(inference.decider))
    x = splits.test.x[:32]
    with torch.no_grad():
        expected = inference(x)
        actions = [torch.as_tensor(a) for a in inference.last_actions]
        out = unfolded(x, actions, mode="mask")
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# ---- bad arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "match"), [(0, "got 0"), (1.5, "got 1.5"), (math.nan, "got nan"),
                                               (-0.2, "got -0.2")])
def test_train_gates_rejects_a_bad_target_density(base, splits, target, match):
    with pytest.raises(ValueError, match=f"target_density.*{match}"):
        train_gates(base, splits, target_density=target, epochs=1)


def test_train_gates_accepts_a_numpy_float32_target(base, splits):
    _, _, _, summary = train_gates(base, splits, target_density=np.float32(0.5), epochs=0)
    assert summary["history"] == []


@pytest.mark.parametrize(("target", "match"), [(0, "got 0"), (1.5, "got 1.5"), (math.nan, "got nan")])
def test_train_dynamic_rejects_a_bad_target_density(splits, target, match):
    net, _, spec = _dynamic()
    net.decider = GateDecider(spec)
    with pytest.raises(ValueError, match=f"target_density.*{match}"):
        train_dynamic(net, splits.train, epochs=1, target_density=target)


def test_bad_epochs_raise_naming_them(base, splits):
    net, _, spec = _dynamic()
    net.decider = GateDecider(spec)
    with pytest.raises(ValueError, match="epochs.*got -1"):
        train_dynamic(net, splits.train, epochs=-1)
    with pytest.raises(ValueError, match="epochs.*got -1"):
        train_gates(base, splits, target_density=0.5, epochs=-1)


# ---- train_dynamic -------------------------------------------------------------------------------
def test_a_frozen_decider_stays_as_it_is_while_the_network_trains(base, splits):
    net, reordered, spec = _dynamic(copy.deepcopy(base).eval())
    decider = _mixed_gates(GateDecider(spec), seed=7)
    decider.requires_grad_(False)
    net.decider = decider
    decider_before = copy.deepcopy(decider.state_dict())
    network_before = {k: v.clone() for k, v in reordered.state_dict().items()}
    history = train_dynamic(net, splits.train, epochs=1, lr=1e-3, seed=0)
    assert not net.training
    assert len(history) == 1 and set(history[0]) == {"loss", "cross_entropy", "density"}
    assert 0 < history[0]["density"] <= 1
    for key, value in decider.state_dict().items():
        assert torch.equal(value, decider_before[key]), key
    changed = [k for k, v in reordered.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, network_before[k])]
    assert any(k.endswith("weight") for k in changed), changed


def test_a_trainable_decider_moves_towards_the_target(base, splits):
    net, _, spec = _dynamic(copy.deepcopy(base).eval())
    decider = GateDecider(spec)
    net.decider = decider
    before = copy.deepcopy(decider.state_dict())
    history = train_dynamic(net, splits.train, epochs=1, seed=0, target_density=0.2, density_weight=20.0)
    assert any(not torch.equal(v, before[k]) for k, v in decider.state_dict().items())
    assert history[0]["density"] < 1.0  # the gates started fully open; the penalty closed some


# ---- Observation ---------------------------------------------------------------------------------
LAYERS, WIDTH = 3, 6


@pytest.fixture()
def observation():
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(LAYERS, WIDTH, generator=gen)
    std = 0.05 + torch.rand(LAYERS, WIDTH, generator=gen)
    return Observation(mean, std), mean, std


def _pooled_standard(features, mean, std):
    return ((features.mean(dim=(2, 3)) - mean) / std).clamp(-FEATURE_CLIP, FEATURE_CLIP)


@pytest.mark.parametrize("gate", range(LAYERS))
def test_observation_layout(observation, gate):
    obs_module, mean, std = observation
    features = _features(WIDTH, batch=5, seed=gate, scale=2.0)
    obs = obs_module(gate, features, 0.25)
    assert obs.shape == (5, WIDTH + LAYERS + 1)
    assert obs.dtype == torch.float32
    torch.testing.assert_close(obs[:, :WIDTH], _pooled_standard(features, mean[gate], std[gate]))
    one_hot = torch.zeros(LAYERS)
    one_hot[gate] = 1.0
    assert torch.equal(obs[:, WIDTH:WIDTH + LAYERS], one_hot.expand(5, LAYERS))
    assert torch.equal(obs[:, -1], torch.full((5,), 0.25))


def test_observation_spent_as_a_tensor(observation):
    obs_module, _, _ = observation
    features = _features(WIDTH, batch=4, seed=1)
    spent = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    obs = obs_module(1, features, spent)
    assert obs.dtype == torch.float32
    torch.testing.assert_close(obs[:, -1], spent.float())
    scalar = obs_module(1, features, torch.tensor(0.75))
    assert torch.equal(scalar[:, -1], torch.full((4,), 0.75))
    torch.testing.assert_close(scalar[:, :-1], obs[:, :-1], atol=0, rtol=0)


def test_observation_clips_standardised_features(observation):
    obs_module, _, _ = observation
    features = _features(WIDTH, batch=4, seed=2, scale=0.0) * 0
    features[0] += 1e4
    features[1] -= 1e4
    obs = obs_module(0, features, 0.0)
    assert torch.equal(obs[0, :WIDTH], torch.full((WIDTH,), FEATURE_CLIP))
    assert torch.equal(obs[1, :WIDTH], torch.full((WIDTH,), -FEATURE_CLIP))
    assert obs[:, :WIDTH].abs().max() <= FEATURE_CLIP


@pytest.mark.parametrize("channels", [1, 4, WIDTH])
def test_fewer_channels_read_as_zero_padding(observation, channels):
    obs_module, _, _ = observation
    features = _features(channels, batch=3, seed=channels)
    padded = torch.cat([features, torch.zeros(3, WIDTH - channels, 4, 4)], dim=1)
    for gate in range(LAYERS):
        torch.testing.assert_close(obs_module(gate, features, 0.3), obs_module(gate, padded, 0.3),
                                   atol=1e-6, rtol=1e-6)


# ---- measure_input_latency -----------------------------------------------------------------------
def test_measure_input_latency_is_a_positive_float():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10).train()
    seconds = measure_input_latency(model, _inputs(3), repeats=2, warmup=1, threads=1)
    assert isinstance(seconds, float)
    assert seconds > 0
    assert model.training  # the mode it came in


@pytest.mark.parametrize(("kwargs", "match"), [({"repeats": 0}, "repeats=0"), ({"warmup": -1}, "warmup=-1"),
                                               ({"inputs": torch.empty(0, 1, 8, 8)}, "0 inputs")])
def test_measure_input_latency_rejects_bad_arguments(kwargs, match):
    model = build_model("digits_cnn", 1, 10)
    arguments = {"inputs": _inputs(2), **kwargs}
    with pytest.raises(ValueError, match=match):
        measure_input_latency(model, **arguments)
