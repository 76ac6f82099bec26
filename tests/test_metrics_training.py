"""Tests for prunegym.compression.metrics and .training: costs, latency plumbing, devices, training, cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunegym.compression import training
from prunegym.compression.data import Split, load_dataset
from prunegym.compression.metrics import (
    count_flops,
    count_layer_flops,
    count_params,
    measure_latency,
    model_bytes,
    num_threads,
)
from prunegym.compression.models import DigitsCNN, build_model
from prunegym.compression.training import (
    base_model,
    cache_dir,
    evaluate,
    resolve_device,
    train_classifier,
)


# ---- FLOPs, parameters, bytes ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "stride", "padding", "size", "batch"),
    [(3, 5, 3, 1, 1, 8, 1), (2, 7, 1, 1, 0, 6, 3), (4, 6, 3, 2, 1, 9, 2), (1, 8, 5, 1, 0, 12, 1)],
)
def test_conv_flops_are_two_per_multiply_add(c_in, c_out, k, stride, padding, size, batch):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False)
    out = (size + 2 * padding - k) // stride + 1
    expected = 2 * c_in * c_out * k * k * out * out * batch
    assert count_flops(conv, torch.randn(batch, c_in, size, size)) == expected


def test_linear_flops():
    assert count_flops(nn.Linear(6, 4), torch.randn(5, 6)) == 2 * 6 * 4 * 5


def test_layer_flops_are_named_by_module_and_sum_to_the_total():
    for name, in_channels in (("digits_cnn", 1), ("resnet20", 3)):
        model = build_model(name, in_channels, 10)
        x = torch.randn(2, in_channels, 8, 8)
        layers = count_layer_flops(model, x)
        modules = dict(model.named_modules())
        assert layers and set(layers) <= set(modules)
        assert all(isinstance(modules[n], nn.Conv2d | nn.Linear) for n in layers)
        assert all(isinstance(v, int) and v > 0 for v in layers.values())
        assert sum(layers.values()) == count_flops(model, x)
    assert count_layer_flops(nn.Sequential(nn.Conv2d(3, 5, 3)), torch.randn(1, 3, 8, 8)) == {"0": 2 * 3 * 5 * 9 * 36}


def test_layer_flops_of_a_single_layer_model():
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(1, 3, 8, 8)
    assert sum(count_layer_flops(conv, x).values()) == count_flops(conv, x)


def test_flop_counting_keeps_the_train_flag():
    model = DigitsCNN().train()
    count_flops(model, torch.randn(2, 1, 8, 8))
    count_layer_flops(model, torch.randn(2, 1, 8, 8))
    assert model.training


def test_count_params():
    assert count_params(nn.Linear(3, 4)) == 3 * 4 + 4
    assert count_params(nn.Conv2d(2, 5, 3, bias=False)) == 2 * 5 * 9
    assert count_params(nn.BatchNorm2d(7)) == 14  # running statistics are buffers, not parameters
    model = build_model("resnet20", 3, 10)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_model_bytes_grows_with_the_model():
    sizes = [model_bytes(DigitsCNN(widths=w)) for w in ((4, 4, 4, 4), (8, 8, 8, 8), (16, 32, 32, 64))]
    assert 0 < sizes[0] < sizes[1] < sizes[2]
    # float32 weights dominate: at least four bytes per parameter.
    assert sizes[2] >= 4 * count_params(DigitsCNN(widths=(16, 32, 32, 64)))


# ---- latency plumbing (values are never asserted, only their type) ----------------------------
def test_measure_latency_returns_a_positive_float():
    model = DigitsCNN(widths=(4, 4, 4, 4)).train()
    latency = measure_latency(model, torch.randn(1, 1, 8, 8), repeats=3, warmup=1, threads=1)
    assert isinstance(latency, float) and latency > 0
    assert model.training  # the flag comes back


class _Timed(nn.Module):
    """A model that advances a fake clock by ``cost`` per input (times its first value, if ``scaled``)."""

    def __init__(self, name: str, cost: float, clock: list[float], calls: list[str], scaled: bool = False):
        super().__init__()
        self.name, self.cost, self.clock, self.calls, self.scaled = name, cost, clock, calls, scaled

    def forward(self, x):
        self.calls.append(self.name)
        self.clock[0] += self.cost * (float(x.reshape(-1)[0]) if self.scaled else x.shape[0])
        return x


def test_latency_rounds_interleave_the_models_call_by_call(monkeypatch):
    """Every call of one model is followed by one of the other, the order rotating; a model's round
    result is its median per input, averaged over the inputs; the rounds' median is the latency."""
    import types

    import prunegym.compression.metrics as metrics

    clock, calls = [0.0], []
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    a, b = _Timed("a", 2.0, clock, calls), _Timed("b", 5.0, clock, calls)
    assert metrics.latency_rounds([a, b], torch.ones(1, 2), rounds=2, repeats=3, warmup=1) == [[2.0, 2.0], [5.0, 5.0]]
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"] * 2
    assert metrics.measure_latency_rounds([a, b], torch.ones(1, 2), rounds=3, repeats=2, warmup=0) == [2.0, 5.0]
    inputs = torch.tensor([[1.0], [3.0]])  # per input: each alone; a scaled model costs cost * its value
    c = _Timed("c", 1.0, clock, calls, scaled=True)
    assert metrics.latency_rounds([c, a], inputs, rounds=1, repeats=2, warmup=0, per_input=True) == [[2.0], [2.0]]
    assert metrics.measure_input_latency(c, inputs, repeats=1, warmup=0) == 2.0
    with pytest.raises(ValueError, match="rounds"):
        metrics.latency_rounds([a], torch.ones(1, 2), rounds=0)
    with pytest.raises(ValueError, match="repeats=0"):
        metrics.latency_rounds([a], torch.ones(1, 2), repeats=0)
    assert a.training  # the mode each came in


def test_relative_latency_times_blocks_of_four_calls(monkeypatch):
    """model, reference, reference, model in every block; the median of the blocks' ratios; more
    blocks while they fill the seconds asked for; each model's mode as it came in."""
    import types

    import prunegym.compression.metrics as metrics

    clock, calls = [0.0], []
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    a, b = _Timed("a", 2.0, clock, calls), _Timed("b", 5.0, clock, calls)
    assert metrics.relative_latency(a, b, torch.ones(1, 2), blocks=2, warmup=1) == pytest.approx(0.4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2
    calls.clear()  # a block takes 14 s: 30 s fill three blocks, 1000 s stop at max_blocks
    metrics.relative_latency(a, b, torch.ones(1, 2), blocks=1, warmup=0, fill_seconds=30.0, max_blocks=100)
    assert len(calls) == 3 * 4
    calls.clear()
    metrics.relative_latency(a, b, torch.ones(1, 2), blocks=1, warmup=0, fill_seconds=1000.0, max_blocks=5)
    assert len(calls) == 5 * 4
    c = _Timed("c", 1.0, clock, calls, scaled=True)  # a reference input of its own
    assert metrics.relative_latency(a, c, torch.ones(1, 2), reference_input=torch.full((1, 1), 8.0),
                                    blocks=1, warmup=0) == pytest.approx(0.25)
    assert a.training and b.training
    with pytest.raises(ValueError, match="blocks=0"):
        metrics.relative_latency(a, b, torch.ones(1, 2), blocks=0)


def test_static_latency_is_the_first_models_times_each_ratio_to_it(monkeypatch):
    import prunegym.agents.job as job

    monkeypatch.setattr(job, "measure_latency", lambda model, x, **kwargs: 0.002 * len(x))
    monkeypatch.setattr(job, "relative_latency", lambda model, reference, x, **kwargs: model.weight.shape[0] / 4)
    models = [nn.Linear(2, 4), nn.Linear(2, 2), nn.Linear(2, 1)]
    timed = job.static_latency(models, torch.randn(10, 1, 2, 2), threads=1)
    assert [t["latency_b1_ms"] for t in timed] == pytest.approx([2.0, 1.0, 0.5])
    assert [t["latency_b64_ms"] for t in timed] == pytest.approx([128.0, 64.0, 32.0])


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 1), (-1, 0), (3, -1)])
def test_measure_latency_rejects_bad_counts(repeats, warmup):
    with pytest.raises(ValueError, match=f"repeats={repeats}, warmup={warmup}"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), repeats=repeats, warmup=warmup)


def test_num_threads_restores_the_thread_count():
    old = torch.get_num_threads()
    target = 1 if old != 1 else 2
    with num_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == old
    with pytest.raises(RuntimeError, match="inside"), num_threads(target):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == old
    with num_threads(None):
        assert torch.get_num_threads() == old
    with pytest.raises(ValueError, match="got 0"), num_threads(0):
        pass
    assert torch.get_num_threads() == old


# ---- devices -----------------------------------------------------------------------------------
def test_resolve_device():
    assert isinstance(resolve_device("auto"), torch.device)
    assert isinstance(resolve_device(), torch.device)
    assert resolve_device("cpu") == torch.device("cpu")
    device = torch.device("cpu")
    assert resolve_device(device) is device


def test_resolve_device_rejects_nonsense():
    with pytest.raises(ValueError, match="'nonsense'"):
        resolve_device("nonsense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_rejects_missing_cuda():
    with pytest.raises(ValueError, match="'cuda'"):
        resolve_device("cuda")


_HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@pytest.mark.skipif(_HAS_MPS, reason="this machine has MPS")
def test_resolve_device_rejects_missing_mps():
    with pytest.raises(ValueError, match="'mps'"):
        resolve_device("mps")


# ---- evaluation and training -------------------------------------------------------------------
def _separable(n: int = 96, seed: int = 0) -> Split:
    """Two classes told apart by the sign of the image mean: trivially learnable."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.5 + (2.0 * y - 1.0).view(-1, 1, 1, 1)
    return Split(x, y.long())


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN(in_channels=1, num_classes=2, widths=(4, 4, 4, 4))


def test_evaluate_returns_loss_and_accuracy():
    model, split = _tiny().train(), _separable()
    loss, accuracy = evaluate(model, split)
    assert isinstance(loss, float) and isinstance(accuracy, float)
    assert loss > 0 and 0.0 <= accuracy <= 1.0
    assert model.training  # evaluated in eval mode, flag restored
    model.eval()
    with torch.no_grad():
        logits = model(split.x)
    assert loss == pytest.approx(F.cross_entropy(logits, split.y).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == split.y).float().mean().item())
    assert evaluate(model, split, batch_size=7) == pytest.approx((loss, accuracy), rel=1e-5)


def test_train_classifier_lowers_the_loss():
    model, split = _tiny(), _separable()
    loss_before, _ = evaluate(model, split)
    trained = train_classifier(model, split, epochs=4, lr=1e-2, batch_size=16)
    assert trained is model and not model.training
    loss_after, accuracy_after = evaluate(model, split)
    assert loss_after < loss_before
    assert accuracy_after >= 0.9


def test_train_classifier_is_reproducible():
    split = _separable()
    a = train_classifier(_tiny(1), split, epochs=1, batch_size=16, seed=5)
    b = train_classifier(_tiny(1), split, epochs=1, batch_size=16, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_train_classifier_with_zero_epochs_changes_nothing():
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_classifier(model, _separable(), epochs=0)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_classifier_max_steps_counts_batches_across_epochs():
    """96 samples in batches of 16: 6 a epoch, so 8 steps run into a second epoch and stop there,
    the schedule spanning exactly those 8; and a prefix of a longer run is not what they give."""
    seen = []
    model = train_classifier(_tiny(1), _separable(), epochs=0, batch_size=16, seed=5, max_steps=8,
                             after_step=lambda step, total: seen.append((step, total)))
    assert seen == [(step, 8) for step in range(1, 9)]
    again = train_classifier(_tiny(1), _separable(), epochs=0, batch_size=16, seed=5, max_steps=8)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    before = {k: v.clone() for k, v in _tiny(1).state_dict().items()}
    unchanged = train_classifier(_tiny(1), _separable(), epochs=3, max_steps=0)
    assert all(torch.equal(before[k], v) for k, v in unchanged.state_dict().items())


@pytest.mark.parametrize(("kwargs", "match"), [({"epochs": -1}, "epochs"), ({"epochs": 1, "batch_size": 0}, "batch"),
                                               ({"epochs": 0, "max_steps": -1}, "max_steps")])
def test_train_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_classifier(_tiny(), _separable(), **kwargs)


# ---- base-model cache --------------------------------------------------------------------------
def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"


def test_base_model_is_trained_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path))
    splits = load_dataset("digits")
    first = base_model("digits_cnn", splits, seed=0, epochs=1)
    cached = list((tmp_path / "base").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt"
    assert "digits_cnn" in cached[0].name and "digits" in cached[0].name

    def no_training(*args, **kwargs):
        raise AssertionError("base_model trained again instead of reading its cache")

    monkeypatch.setattr(training, "train_classifier", no_training)
    second = base_model("digits_cnn", splits, seed=0, epochs=1)
    assert second is not first
    assert not second.training
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert evaluate(second, splits.test) == evaluate(first, splits.test)
    assert list((tmp_path / "base").iterdir()) == cached


def test_base_model_without_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path))
    splits = load_dataset("digits")
    model = base_model("digits_cnn", splits, seed=1, epochs=0, use_cache=False)
    assert isinstance(model, DigitsCNN)
    assert not (tmp_path / "base").exists()


def test_keep_freed_memory_takes_on_glibc():
    import platform

    from prunegym.compression.metrics import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
