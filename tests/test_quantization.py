"""Tests for prunegym.compression.quantization: FX post-training int8 (quantize_int8), its compact state
(int8_state, int8_bytes, save_int8, load_int8) and the mean-centred weight-only scheme
(mean_centred_quantize, mean_centred_int8; sizes by metrics.saved_bytes)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_bn, trained_digits_cnn
from torch import nn

from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.checkpoint import describe_architecture
from prunegym.compression.data import load_dataset
from prunegym.compression.fusion import inference_form
from prunegym.compression.importance import L1Importance
from prunegym.compression.metrics import model_bytes, saved_bytes
from prunegym.compression.models import build_model
from prunegym.compression.quantization import (
    int8_bytes,
    int8_state,
    load_int8,
    mean_centred_int8,
    mean_centred_quantize,
    quantize_int8,
    quantized_engine,
    save_int8,
)
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.training import evaluate

CPU = torch.device("cpu")  # a quantized model has no parameters to read the device from


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", 0)


@pytest.fixture(scope="module")
def trained(splits):
    """A digits CNN trained briefly on digits: about 98% test accuracy."""
    return trained_digits_cnn(splits.train)


@pytest.fixture(scope="module")
def calibration(splits):
    return [splits.train.x[:128], splits.train.x[128:256]]


@pytest.fixture(scope="module")
def quantized(trained, calibration):
    return quantize_int8(trained, calibration)


def _arch(model: nn.Module) -> dict:
    return describe_architecture(model, "digits_cnn", 1, 10, 8)


# ---- quantize_int8 -------------------------------------------------------------------------------
def test_quantized_engine_is_supported():
    assert quantized_engine() in torch.backends.quantized.supported_engines


def test_int8_model_is_four_times_smaller(trained, quantized):
    fp32 = model_bytes(inference_form(trained)[0])
    assert int8_bytes(quantized) <= 0.3 * fp32
    assert int8_bytes(quantized) == saved_bytes(int8_state(quantized))


def test_int8_model_keeps_the_accuracy_and_the_logits(trained, quantized, splits):
    _, fp32_accuracy = evaluate(trained, splits.test)
    _, int8_accuracy = evaluate(quantized, splits.test, device=CPU)
    assert fp32_accuracy > 0.9
    assert abs(int8_accuracy - fp32_accuracy) <= 0.01
    x = splits.test.x
    with torch.no_grad():
        fp32, int8 = trained.eval()(x), quantized(x)
    assert int8.shape == fp32.shape == (len(x), 10)
    assert int8.dtype == torch.float32  # quantized inside, float at the boundary
    assert (int8.argmax(1) == fp32.argmax(1)).float().mean() >= 0.97
    assert (int8 - fp32).abs().mean() <= 0.05 * fp32.abs().mean()


def test_int8_model_stores_int8_weights_per_channel(quantized):
    state = int8_state(quantized)
    assert state["per_channel"], "no per-channel weight stored"
    for key in state["per_channel"]:
        assert state["tensors"][key].dtype == torch.int8
        scales = state["tensors"][key + ".#scales"]
        assert scales.dtype == torch.float32 and scales.shape == (state["tensors"][key].shape[0],)
    assert state["scalars"].dtype == torch.float64
    assert len(state["scalars"]) == len(state["scalar_keys"])
    # nothing in the state is a large float tensor: only biases (one per output channel) and scales
    for key, value in state["tensors"].items():
        if value.is_floating_point():
            assert value.dim() == 1, key


def test_quantize_leaves_the_model_alone(trained, calibration):
    before = copy.deepcopy(trained.state_dict())
    trained.train()
    try:
        q = quantize_int8(trained, calibration)
        assert not q.training
        assert trained.training
        for key, value in trained.state_dict().items():
            assert torch.equal(value, before[key]), key
    finally:
        trained.eval()


def test_calibration_is_consumed_once_and_any_iterable_works(trained, splits):
    batches = (splits.train.x[i:i + 64] for i in range(0, 192, 64))  # a generator
    q = quantize_int8(trained, batches)
    with torch.no_grad():
        assert q(splits.test.x[:4]).shape == (4, 10)


def test_quantize_needs_calibration(trained):
    with pytest.raises(ValueError, match="calibration needs at least one batch"):
        quantize_int8(trained, [])


class _Branchy(nn.Module):
    """Control flow on the input's values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


def test_quantize_rejects_a_model_fx_cannot_trace(splits):
    with pytest.raises(ValueError, match="cannot quantize _Branchy: torch.fx cannot trace it"):
        quantize_int8(_Branchy(), [splits.train.x[:8]])


# ---- save_int8 / load_int8 -----------------------------------------------------------------------
def test_save_and_load_round_trip_exactly(trained, quantized, splits, tmp_path):
    path = tmp_path / "model.int8.pt"
    save_int8(path, quantized, _arch(trained), {"note": "digits", "budget": 0.5})
    assert path.is_file()
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: nothing left behind
    loaded, metadata = load_int8(path)
    assert metadata == {"note": "digits", "budget": 0.5}
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(splits.test.x), quantized(splits.test.x))
    assert int8_bytes(loaded) == int8_bytes(quantized)


def test_load_reads_with_weights_only(trained, quantized, tmp_path, monkeypatch):
    path = tmp_path / "model.int8.pt"
    save_int8(path, quantized, _arch(trained))
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_int8(path)
    assert calls == [True]


class _Payload:
    """Not a tensor, dict or number: ``weights_only`` refuses to unpickle it."""


def test_load_refuses_a_pickle_that_runs_code(trained, quantized, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"architecture": _arch(trained), "int8": int8_state(quantized), "metadata": _Payload()}, path)
    with pytest.raises(ValueError, match="evil.pt: not a readable int8 checkpoint"):
        load_int8(path)


def test_load_rejects_missing_and_garbage_files(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_int8(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 8)
    with pytest.raises(ValueError, match="garbage.pt: not a readable int8 checkpoint"):
        load_int8(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="other.pt: not a prunegym int8 checkpoint.*'architecture' and 'int8'"):
        load_int8(other)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(ValueError, match="not a prunegym int8 checkpoint"):
        load_int8(listed)


# ---- prune, then quantize ------------------------------------------------------------------------
def test_a_pruned_model_quantizes_smaller(trained, quantized, calibration, splits, tmp_path):
    graph = ChannelGraph(trained, splits.train.x[:1])
    counts = uniform_keep_counts(graph, 0.4)
    pruned = prune_channels(trained, graph, graph.kept_channels(L1Importance(), counts)).eval()
    q = quantize_int8(pruned, calibration)
    x = splits.test.x[:64]
    with torch.no_grad():
        fp32, int8 = pruned(x), q(x)
    assert int8.shape == (64, 10)
    assert (int8.argmax(1) == fp32.argmax(1)).float().mean() >= 0.9
    assert int8_bytes(q) < int8_bytes(quantized)
    assert int8_bytes(q) < 0.4 * model_bytes(inference_form(pruned)[0])  # fixed overhead weighs more here
    # ... and a pruned int8 model round-trips too: the architecture carries the pruned widths
    path = tmp_path / "pruned.int8.pt"
    save_int8(path, q, _arch(pruned))
    loaded, _ = load_int8(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), int8)


# ---- mean_centred_quantize -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (10, 32), (3, 1, 1, 1)])
def test_mean_centred_quantize_is_within_half_a_step(shape):
    gen = torch.Generator().manual_seed(0)
    offsets = 3.0 * torch.randn(shape[0], generator=gen).view((-1,) + (1,) * (len(shape) - 1))
    weight = torch.randn(shape, generator=gen) * torch.rand(shape[0], generator=gen).view(offsets.shape) + offsets
    q, alpha, mu = mean_centred_quantize(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape
    assert alpha.shape == mu.shape == (shape[0],)
    assert alpha.dtype == mu.dtype == torch.float32
    assert bool((alpha > 0).all())
    view = (-1,) + (1,) * (len(shape) - 1)
    restored = q.float() * alpha.view(view) + mu.view(view)
    error = (weight - restored).abs().flatten(1).amax(dim=1)
    assert bool((error <= alpha / 2 + 1e-6).all()), (error, alpha)
    torch.testing.assert_close(mu, weight.flatten(1).mean(dim=1))
    assert int(q.abs().max()) <= 127


def test_mean_centred_quantize_uses_the_full_range():
    weight = torch.randn(6, 20, generator=torch.Generator().manual_seed(1)) + 5.0
    q, _, _ = mean_centred_quantize(weight)
    assert bool((q.flatten(1).abs().amax(dim=1) == 127).all())  # each channel's extreme maps to ±127


def test_mean_centring_beats_plain_symmetric_on_offset_channels():
    weight = 0.05 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) + 1.0  # far from zero
    q, alpha, mu = mean_centred_quantize(weight)
    centred = (weight - (q.float() * alpha[:, None] + mu[:, None])).abs().max()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    symmetric = (weight - torch.round(weight / scale) * scale).abs().max()
    assert centred < 0.25 * symmetric


def test_mean_centred_quantize_survives_constant_channels():
    weight = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    weight[1] = 0.1  # constant, not exactly representable: w - mean is rounding noise
    weight[2] = 0.0  # all zero
    weight[3] = -2.0
    q, alpha, mu = mean_centred_quantize(weight)
    for t in (q.float(), alpha, mu):
        assert bool(torch.isfinite(t).all())
    assert bool((alpha > 0).all())
    restored = q.float() * alpha.view(-1, 1, 1, 1) + mu.view(-1, 1, 1, 1)
    torch.testing.assert_close(restored[1:], weight[1:], atol=1e-6, rtol=0)
    assert torch.equal(q[2], torch.zeros_like(q[2]))
    assert bool(torch.isfinite(restored).all())


def test_mean_centred_quantize_leaves_the_weight_alone():
    layer = nn.Linear(5, 3)
    before = layer.weight.detach().clone()
    q, _, _ = mean_centred_quantize(layer.weight)
    assert torch.equal(layer.weight, before)
    assert not q.requires_grad


# ---- mean_centred_int8 ---------------------------------------------------------------------------
def test_mean_centred_int8_keeps_the_outputs_and_stores_int8(trained, splits):
    before = copy.deepcopy(trained.state_dict())
    model, state = mean_centred_int8(trained)
    assert not model.training
    folded = inference_form(trained)[0]
    x = splits.test.x
    with torch.no_grad():
        reference, out = folded(x), model(x)
        original = trained(x)
    torch.testing.assert_close(reference, original, atol=1e-4, rtol=1e-4)  # folding BN changes nothing
    assert out.shape == reference.shape
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.98
    assert (out - reference).abs().mean() <= 0.02 * reference.abs().mean()
    _, accuracy = evaluate(model, splits.test)
    _, fp32_accuracy = evaluate(trained, splits.test)
    assert abs(accuracy - fp32_accuracy) <= 0.01
    for key, value in trained.state_dict().items():  # the original's weights are untouched
        assert torch.equal(value, before[key]), key

    weighted = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert weighted
    for name in weighted:
        assert f"{name}.weight" not in state
        q, alpha, mu = state[f"{name}.weight.q"], state[f"{name}.weight.alpha"], state[f"{name}.weight.mu"]
        weight = dict(model.named_modules())[name].weight
        assert q.dtype == torch.int8 and q.shape == weight.shape
        view = (-1,) + (1,) * (weight.dim() - 1)
        torch.testing.assert_close(q.float() * alpha.view(view) + mu.view(view), weight.detach())  # what it runs
    assert not any(v.is_floating_point() and v.dim() > 1 for v in state.values())
    assert saved_bytes(state) <= 0.35 * model_bytes(folded)
    assert saved_bytes(state) == pytest.approx(int8_bytes(quantize_int8(trained, [x[:64]])), rel=0.25)


def test_mean_centred_int8_without_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q_model, state = mean_centred_int8(model)
    with torch.no_grad():
        torch.testing.assert_close(q_model(x), model(x), atol=2e-2, rtol=0)
    assert set(state) == {"0.bias", "0.weight.q", "0.weight.alpha", "0.weight.mu",
                          "3.bias", "3.weight.q", "3.weight.alpha", "3.weight.mu"}


def test_mean_centred_int8_folds_batch_norm_first():
    torch.manual_seed(0)
    model = randomize_bn(build_model("digits_cnn", 1, 10), 0).eval()
    q_model, state = mean_centred_int8(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q_model.modules())
    assert not any("running_mean" in k for k in state)
