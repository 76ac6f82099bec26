"""Tests for prunegym.compression.dynamic_script: a per-input network as a TorchScript program gives the
Python model's logits, decisions and densities input by input, loads where prunegym cannot be imported,
and refuses what it cannot script by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn
from torch import nn

from prunegym.agents.gated import PolicyDecider
from prunegym.compression.dynamic import build_dynamic
from prunegym.compression.dynamic_script import script_dynamic
from prunegym.compression.gates import GateDecider
from prunegym.compression.models import build_model
from prunegym.envs.input_pruning import observation_stats

ZOO = {"digits_cnn": (1, 8), "resnet20": (3, 16)}  # name -> (in_channels, input size)
INPUTS = 48


def _inputs(name: str, count: int, seed: int = 1) -> torch.Tensor:
    """Random inputs at scales from 0.1 to 10: features of many sizes, so deciders choose differently."""
    channels, size = ZOO[name]
    x = torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return x * torch.logspace(-1, 1, count).view(-1, 1, 1, 1)


def _network(name: str, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(build_model(name, ZOO[name][0], 10), seed).eval()
    example = _inputs(name, 1)
    base, _, spec = build_dynamic(model, example)
    if kind == "policy":
        mean, std = observation_stats(base, _inputs(name, 32, seed=2))
        width = mean.shape[1] + len(spec.layers) + 1
        decider = PolicyDecider([nn.Linear(width, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, spec.groups)], mean, std)
    else:
        decider = GateDecider(spec)
        with torch.no_grad():
            for gate in decider.gates:  # weights large enough that the features move the gates
                gate.fc1.weight.normal_(0.0, 1.0)
                gate.fc2.weight.normal_(0.0, 1.0)
                gate.fc2.bias.normal_(0.0, 1.0)
    net, _, _ = build_dynamic(model, example, decider=decider.eval())
    return net.eval()


def _reference(net, x: torch.Tensor):
    """The Python model's logits, actions ``[B, L]`` and densities, each input run alone."""
    with torch.no_grad():
        logits = net(x, mode="loop")
    return logits, torch.stack([torch.as_tensor(a) for a in net.last_actions], dim=1), net.last_density.double()


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("kind", ["policy", "gate"])
def test_the_program_decides_and_computes_as_the_python_model(name, kind):
    net = _network(name, kind)
    x = _inputs(name, INPUTS)
    logits, actions, density = _reference(net, x)
    assert len({tuple(row) for row in actions.tolist()}) > 1, "the check needs inputs that decide differently"
    with torch.no_grad():
        got_logits, got_actions, got_density = script_dynamic(net, x[:1])(x)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_actions, actions)
    torch.testing.assert_close(got_density, density)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.save: what C++ and mobile load
def test_a_saved_program_runs_in_a_process_that_cannot_import_prunegym(tmp_path: Path):
    net = _network("digits_cnn", "policy")
    x = _inputs("digits_cnn", INPUTS)
    logits, actions, density = _reference(net, x)
    with torch.no_grad():
        torch.jit.save(script_dynamic(net, x[:1]), str(tmp_path / "model.pt"))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.modules['prunegym'] = None\n"  # any import of prunegym now fails
            "import torch\n"
            "model = torch.jit.load(sys.argv[1] + '/model.pt')\n"
            "torch.save(model(torch.load(sys.argv[1] + '/x.pt')), sys.argv[1] + '/out.pt')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got_logits, got_actions, got_density = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_actions, actions)
    torch.testing.assert_close(got_density, density)


def test_script_dynamic_refuses_what_it_cannot_script():
    net = _network("digits_cnn", "policy")
    x = _inputs("digits_cnn", 1)
    with pytest.raises(ValueError, match="needs a DynamicNetwork, got Sequential"):
        script_dynamic(nn.Sequential(), x)
    net.train()
    with pytest.raises(ValueError, match="eval mode"):
        script_dynamic(net, x)
    fixed, _, _ = build_dynamic(randomize_bn(build_model("digits_cnn", 1, 10), 0).eval(), x,
                                decider=lambda gate, features, spent: 0)
    with pytest.raises(ValueError, match="decider is function"):
        script_dynamic(fixed.eval(), x)


def test_a_policy_with_an_activation_the_program_does_not_run_is_refused_by_name():
    net = _network("digits_cnn", "policy")
    decider = net.decider
    decider.actor[1] = nn.ELU()
    decider.refresh()
    with pytest.raises(ValueError, match="activation other than"):
        script_dynamic(net, _inputs("digits_cnn", 1))
