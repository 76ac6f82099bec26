"""Tests for prunegym.compression.distillation (Distillation, kd_loss, student_model) and the training hooks
that use it: ``train_classifier(distill=, penalty=, after_step=)`` and ``train_dynamic(distill=)``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, trained_digits_cnn
from torch import nn

from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.data import Split, load_dataset
from prunegym.compression.distillation import Distillation, kd_loss, student_model
from prunegym.compression.dynamic import build_dynamic
from prunegym.compression.gates import GateDecider, train_dynamic
from prunegym.compression.importance import L1Importance
from prunegym.compression.metrics import count_flops
from prunegym.compression.models import build_model
from prunegym.compression.sparsity import slimming_penalty, uniform_keep_counts
from prunegym.compression.training import evaluate, train_classifier

BATCH, CLASSES = 16, 10


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(seed))


def _targets(seed: int = 9) -> torch.Tensor:
    return torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(seed))


def _by_hand(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """α·T²·KL(p_t ‖ p_s) + (1-α)·CE, written out: Σ p_t (log p_t - log p_s), averaged over the batch."""
    p_t = torch.softmax(t / temperature, dim=1)
    log_p_s = torch.log_softmax(s / temperature, dim=1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(dim=1).mean()
    ce = -torch.log_softmax(s, dim=1)[torch.arange(len(y)), y].mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", 0)


@pytest.fixture(scope="module")
def teacher(splits):
    """A digits CNN trained briefly on digits (about 98% test accuracy)."""
    return trained_digits_cnn(splits.train)


@pytest.fixture(scope="module")
def graph(teacher, splits):
    return ChannelGraph(teacher, splits.train.x[:1])


def _small(split: Split, n: int) -> Split:
    return Split(split.x[:n], split.y[:n])


def _agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    was = student.training
    student.eval()
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher.eval()(x).argmax(1)).float().mean().item()
    student.train(was)
    return agree


def _bn_l1(model: nn.Module) -> float:
    return sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---- kd_loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.9), (1.0, 0.5), (2.5, 1.0), (10.0, 0.3)])
def test_kd_loss_is_the_hinton_formula(temperature, alpha):
    s, t, y = _logits(0), _logits(1), _targets()
    loss = kd_loss(s, t, y, temperature, alpha)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, _by_hand(s, t, y, temperature, alpha), rtol=1e-5, atol=1e-6)


def test_kd_loss_defaults_are_temperature_4_and_alpha_0_9():
    s, t, y = _logits(0), _logits(1), _targets()
    torch.testing.assert_close(kd_loss(s, t, y), _by_hand(s, t, y, 4.0, 0.9))
    d = Distillation(nn.Identity())
    assert (d.temperature, d.alpha) == (4.0, 0.9)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_term_vanishes_when_the_student_matches_the_teacher(temperature):
    s, y = _logits(2), _targets()
    torch.testing.assert_close(kd_loss(s, s.clone(), y, temperature, alpha=1.0), torch.tensor(0.0),
                               atol=1e-6, rtol=0)
    # with labels mixed in, only the cross-entropy part is left
    torch.testing.assert_close(kd_loss(s, s.clone(), y, temperature, alpha=0.3), 0.7 * F.cross_entropy(s, y),
                               atol=1e-6, rtol=1e-6)
    # the soft term is a divergence: any other teacher costs more
    assert kd_loss(s, _logits(3), y, temperature, alpha=1.0) > 0


def test_soft_term_ignores_a_shift_of_the_logits():
    s, t, y = _logits(4), _logits(5), _targets()
    torch.testing.assert_close(kd_loss(s, t, y, 3.0, 1.0), kd_loss(s + 7.0, t - 2.0, y, 3.0, 1.0))


def test_alpha_zero_is_the_cross_entropy():
    s, t, y = _logits(0), _logits(1), _targets()
    torch.testing.assert_close(kd_loss(s, t, y, 4.0, alpha=0.0), F.cross_entropy(s, y))


def test_gradient_reaches_the_student_not_the_teacher():
    s = _logits(0).requires_grad_(True)
    t = _logits(1).requires_grad_(True)
    kd_loss(s, t, _targets(), 4.0, 0.9).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_soft_gradient_is_the_softened_probability_gap():
    """d(T²·KL)/ds = T·(p_s - p_t)/B: it does not vanish while the student is confidently wrong."""
    temperature = 4.0
    s = (_logits(6) * 5).requires_grad_(True)
    t = _logits(7)
    kd_loss(s, t, _targets(), temperature, alpha=1.0).backward()
    expected = temperature * (torch.softmax(s.detach() / temperature, 1) - torch.softmax(t / temperature, 1)) / BATCH
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-7)


def test_kd_loss_is_not_the_nll_of_probabilities():
    """The mistake the module warns of: nll_loss on probabilities, -Σ p_t·p_s, which is no divergence."""
    s, t, y = _logits(0), _logits(1), _targets()
    temperature, alpha = 4.0, 1.0
    p_s, p_t = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
    wrong = alpha * temperature ** 2 * -(p_t * p_s).sum(1).mean()
    assert not torch.allclose(kd_loss(s, t, y, temperature, alpha), wrong, atol=1e-3)
    # the wrong one is negative and not zero when student and teacher agree; the divergence is zero
    same = -(torch.softmax(s / temperature, 1) ** 2).sum(1).mean()
    assert same < 0
    assert float(kd_loss(s, s, y, temperature, alpha)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("student", "teacher"), [((BATCH, 10), (BATCH, 5)), ((BATCH, 10), (BATCH - 1, 10))])
def test_kd_loss_rejects_mismatched_shapes(student, teacher):
    s, t = torch.zeros(student), torch.zeros(teacher)
    with pytest.raises(ValueError, match=f"student logits {tuple(student)}.*teacher logits {tuple(teacher)}".replace(
            "(", "\\(").replace(")", "\\)")):
        kd_loss(s, t, torch.zeros(student[0], dtype=torch.long))


# ---- Distillation --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_distillation_rejects_a_bad_temperature(bad):
    with pytest.raises(ValueError, match=f"temperature must be a finite number > 0, got {bad}"):
        Distillation(nn.Identity(), temperature=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_distillation_rejects_a_bad_alpha(bad):
    with pytest.raises(ValueError, match=f"alpha must be in \\[0, 1\\], got {bad}"):
        Distillation(nn.Identity(), alpha=bad)


def test_distillation_is_frozen():
    d = Distillation(nn.Identity(), temperature=2.0, alpha=0.5)
    assert (d.temperature, d.alpha) == (2.0, 0.5)
    with pytest.raises(AttributeError):
        d.alpha = 0.1  # type: ignore[misc]


# ---- student_model -------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_student_fits_the_budget_with_one_width_ratio(teacher, graph, splits, budget):
    x = splits.train.x[:1]
    student = student_model(teacher, graph, budget)
    assert student is not teacher
    assert student.training
    flops = count_flops(student, x)
    assert flops <= budget * graph.dense_flops * (1 + 1e-9)
    assert flops == pytest.approx(graph.flops(uniform_keep_counts(graph, budget)), rel=1e-9)
    with torch.no_grad():
        assert student.eval()(splits.test.x[:3]).shape == (3, 10)


def test_student_is_freshly_initialised(teacher, graph, splits):
    before = copy.deepcopy(teacher.state_dict())
    student = student_model(teacher, graph, 0.5, seed=0)
    counts = uniform_keep_counts(graph, 0.5)
    pruned = prune_channels(teacher, graph, graph.kept_channels(L1Importance(), counts))
    assert student.state_dict().keys() == pruned.state_dict().keys()
    for key, value in pruned.state_dict().items():
        assert value.shape == student.state_dict()[key].shape, key
        if key.endswith("weight") and value.dim() > 1:
            assert not torch.allclose(student.state_dict()[key], value), key  # not the trained weights
    for m in student.modules():
        if isinstance(m, nn.BatchNorm2d):  # BN as at construction
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert int(m.num_batches_tracked) == 0
    for key, value in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(value, before[key]), key
    _, accuracy = evaluate(student, splits.test)
    assert accuracy < 0.5  # it knows nothing yet


def test_student_initialisation_is_seeded(teacher, graph):
    a, b, c = (student_model(teacher, graph, 0.5, seed=s) for s in (1, 1, 2))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_student_rejects_a_bad_budget(teacher, graph):
    with pytest.raises(ValueError, match="flops_ratio must be in \\(0, 1\\], got 0"):
        student_model(teacher, graph, 0)


# ---- train_classifier(distill=) ------------------------------------------------------------------
def test_distillation_trains_the_student_towards_the_teacher(teacher, graph, splits):
    student = student_model(teacher, graph, 0.3, seed=0)
    x = splits.test.x
    untrained = _agreement(student, teacher, x)
    teacher.zero_grad(set_to_none=True)
    teacher.train()  # train_classifier runs the teacher in eval mode and gives it back as it was
    before = copy.deepcopy(teacher.state_dict())
    try:
        out = train_classifier(student, splits.train, epochs=5, lr=3e-3, seed=0, distill=Distillation(teacher))
        assert teacher.training
    finally:
        teacher.eval()
    assert out is student and not student.training
    for key, value in teacher.state_dict().items():  # BN statistics included: it ran in eval mode
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in teacher.parameters())
    trained = _agreement(student, teacher, x)
    assert trained > untrained + 0.4
    assert trained >= 0.85
    _, accuracy = evaluate(student, splits.test)
    assert accuracy >= 0.8


def test_distillation_changes_the_training(teacher, graph, splits):
    split = _small(splits.train, 256)
    plain, distilled = (student_model(teacher, graph, 0.3, seed=0) for _ in range(2))
    train_classifier(plain, split, epochs=1, seed=0)
    train_classifier(distilled, split, epochs=1, seed=0, distill=Distillation(teacher, temperature=2.0, alpha=0.7))
    assert any(not torch.equal(v, distilled.state_dict()[k]) for k, v in plain.state_dict().items())
    # alpha = 0 is plain cross-entropy: the very same training
    ce_only = student_model(teacher, graph, 0.3, seed=0)
    train_classifier(ce_only, split, epochs=1, seed=0, distill=Distillation(teacher, alpha=0.0))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ce_only.state_dict()[key], value, rtol=1e-5, atol=1e-6)


# ---- train_classifier(penalty=) ------------------------------------------------------------------
def test_penalty_is_added_to_the_loss_and_shrinks_bn_scales(splits):
    split = _small(splits.train, 512)
    torch.manual_seed(0)
    base = randomize_bn(build_model("digits_cnn", 1, 10), 0)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.abs_()
    plain, slim = copy.deepcopy(base), copy.deepcopy(base)
    train_classifier(plain, split, epochs=3, lr=1e-2, seed=0)
    calls = []
    inner = slimming_penalty(0.05)

    def penalty(model: nn.Module) -> torch.Tensor:
        calls.append(model)
        return inner(model)

    train_classifier(slim, split, epochs=3, lr=1e-2, seed=0, penalty=penalty)
    assert len(calls) == 3 * math.ceil(len(split) / 64)  # once per step
    assert all(m is slim for m in calls)
    assert _bn_l1(slim) < 0.9 * _bn_l1(plain)
    assert _bn_l1(plain) > 0.8 * _bn_l1(base)


def test_a_zero_penalty_changes_nothing(splits):
    split = _small(splits.train, 256)
    torch.manual_seed(0)
    base = build_model("digits_cnn", 1, 10)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train_classifier(a, split, epochs=1, seed=0)
    train_classifier(b, split, epochs=1, seed=0, penalty=lambda model: torch.zeros(()))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)


# ---- train_classifier(after_step=) ---------------------------------------------------------------
def test_after_step_runs_once_per_optimiser_step(splits):
    split = _small(splits.train, 300)  # 5 steps an epoch, the last of 44 images
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    calls = []
    params = [p for p in model.parameters()]
    first = params[0]

    def after_step(step: int, total: int) -> None:
        calls.append((step, total, first.detach().clone()))

    train_classifier(model, split, epochs=3, seed=0, after_step=after_step)
    assert [(s, t) for s, t, _ in calls] == [(s, 15) for s in range(1, 16)]
    # each call comes after a step: the weights it sees differ from one call to the next
    assert all(not torch.equal(a, b) for (_, _, a), (_, _, b) in zip(calls, calls[1:], strict=False))
    assert torch.equal(calls[-1][2], first.detach())


def test_after_step_skips_the_steps_that_train_nothing():
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randn(129, 1, 8, 8, generator=gen), torch.randint(0, 10, (129,), generator=gen))
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    calls = []
    train_classifier(model, split, epochs=2, seed=0, after_step=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 6), (2, 6), (4, 6), (5, 6)]  # steps 3 and 6 hold one image: batch norm cannot train
    assert all(1 <= s <= t for s, t in calls)


def test_after_step_can_edit_the_weights_between_steps(splits):
    split = _small(splits.train, 256)
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    weight = model.classifier.weight

    def zero_first_row(step: int, total: int) -> None:
        with torch.no_grad():
            weight[0].zero_()

    train_classifier(model, split, epochs=1, seed=0, after_step=zero_first_row)
    assert torch.equal(weight[0], torch.zeros_like(weight[0]))
    assert weight[1:].abs().sum() > 0


def test_no_epochs_calls_nothing(splits):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    calls = []
    train_classifier(model, splits.train, epochs=0, penalty=lambda m: calls.append("p"),
                     after_step=lambda s, t: calls.append("a"), distill=Distillation(copy.deepcopy(model)))
    assert calls == []


# ---- train_dynamic(distill=) ---------------------------------------------------------------------
def _gated(model: nn.Module, x1: torch.Tensor):
    net, reordered, spec = build_dynamic(copy.deepcopy(model).eval(), x1, groups=4, fold_bn=False)
    torch.manual_seed(0)
    net.decider = GateDecider(spec)
    return net


def test_train_dynamic_distils_from_a_teacher(teacher, splits):
    split = _small(splits.train, 256)
    x1 = splits.train.x[:1]
    before = copy.deepcopy(teacher.state_dict())
    distill = Distillation(teacher, temperature=3.0, alpha=0.8)
    net = _gated(teacher, x1)
    history = train_dynamic(net, split, epochs=1, seed=0, target_density=0.5, distill=distill)
    assert len(history) == 1 and set(history[0]) == {"loss", "cross_entropy", "density"}
    assert all(math.isfinite(v) for v in history[0].values())
    assert history[0]["loss"] >= history[0]["cross_entropy"] - 1e-6  # the density term only adds
    assert 0 < history[0]["density"] <= 1
    assert not net.training
    assert not teacher.training
    for key, value in teacher.state_dict().items():  # the teacher is read, never trained
        assert torch.equal(value, before[key]), key

    # the task loss really is the distillation loss: a different mix gives a different history
    plain = _gated(teacher, x1)
    plain_history = train_dynamic(plain, split, epochs=1, seed=0, target_density=0.5)
    assert plain_history[0]["cross_entropy"] != pytest.approx(history[0]["cross_entropy"])


def test_train_dynamic_with_alpha_zero_distillation_is_plain_training(teacher, splits):
    split = _small(splits.train, 128)
    x1 = splits.train.x[:1]
    a, b = _gated(teacher, x1), _gated(teacher, x1)
    history_a = train_dynamic(a, split, epochs=1, seed=0)
    history_b = train_dynamic(b, split, epochs=1, seed=0, distill=Distillation(teacher, alpha=0.0))
    assert history_b[0] == pytest.approx(history_a[0], rel=1e-5)
