"""The policy decider folds the observation's constant part into the actor's first layer: it must
decide as the actor does on the observation the environment builds."""

import pytest
import torch
from torch import nn

from prunegym.agents.gated import PolicyDecider
from prunegym.compression.deciders import Observation

LAYERS, WIDTH, GROUPS = 3, 12, 4
CHANNELS = (6, 12, 9)  # features entering each gated layer


def _actor(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(WIDTH + LAYERS + 1, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, GROUPS)]


def _stats(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, WIDTH, generator=generator), 0.5 + torch.rand(LAYERS, WIDTH, generator=generator)


def _reference(decider: PolicyDecider, gate: int, features: torch.Tensor, spent) -> torch.Tensor:
    """The actor's argmax on the observation InputPruningEnv gives."""
    observation = Observation(decider.observation.mean, decider.observation.std)
    return decider.actor(observation(gate, features, spent)).argmax(dim=1)


@torch.no_grad()
@pytest.mark.parametrize("gate", range(LAYERS))
def test_decisions_equal_the_actor_on_the_env_observation(gate):
    decider = PolicyDecider(_actor(), *_stats()).eval()
    generator = torch.Generator().manual_seed(gate)
    features = 3 * torch.randn(256, CHANNELS[gate], 5, 5, generator=generator)  # some clipped at ±10
    spent = torch.rand(256, generator=generator)
    assert torch.equal(decider(gate, features, spent), _reference(decider, gate, features, spent))
    for i in range(8):  # batch of one: an int, and the density spent as a float
        action = decider(gate, features[i:i + 1], float(spent[i]))
        assert isinstance(action, int)
        assert action == int(_reference(decider, gate, features[i:i + 1], float(spent[i]))[0])


@torch.no_grad()
def test_decisions_follow_weights_changed_after_the_first_decision():
    decider = PolicyDecider(_actor(), *_stats()).eval()
    features = torch.randn(64, CHANNELS[0], 4, 4)
    assert torch.equal(decider(0, features, 0.2), _reference(decider, 0, features, 0.2))
    decider.actor[-1].bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))  # in place: refresh() picks it up
    decider.refresh()
    assert (decider(0, features, 0.2) == 2).all()
    other = PolicyDecider(_actor(seed=5), *_stats(seed=6))
    decider.load_state_dict(other.state_dict())  # loading folds again by itself
    assert torch.equal(decider(0, features, 0.2), _reference(other, 0, features, 0.2))
    double = decider.to(torch.float64)
    assert torch.equal(double(0, features.double(), 0.2), _reference(other.double(), 0, features.double(), 0.2))


def test_an_actor_that_does_not_begin_with_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match="Linear.*Tanh"):
        PolicyDecider([nn.Tanh(), nn.Linear(WIDTH + LAYERS + 1, GROUPS)], *_stats())
    with pytest.raises(ValueError, match="no layer"):
        PolicyDecider([], *_stats())


@torch.no_grad()
def test_single_input_decisions_in_every_dtype_and_with_gradients():
    """A single float32 input decides in NumPy, others in torch: all as the actor does."""
    decider = PolicyDecider(_actor(), *_stats()).eval()
    generator = torch.Generator().manual_seed(3)
    for gate in range(LAYERS):
        for _ in range(16):
            features = 3 * torch.randn(1, CHANNELS[gate], 4, 4, generator=generator)
            spent = float(torch.rand(1, generator=generator))
            expected = int(_reference(decider, gate, features, spent)[0])
            assert decider(gate, features, spent) == expected
            with torch.enable_grad():
                assert decider(gate, features.clone().requires_grad_(), spent) == expected
    double = PolicyDecider(_actor(), *_stats()).double().eval()
    features = torch.randn(1, CHANNELS[0], 4, 4, dtype=torch.float64)
    assert double(0, features, 0.5) == int(_reference(double, 0, features, 0.5)[0])


@torch.no_grad()
def test_single_input_decisions_from_several_threads_agree_with_one_thread():
    """A single-input decision writes into preallocated vectors: each thread has its own."""
    import threading

    decider = PolicyDecider(_actor(), *_stats()).eval()
    generator = torch.Generator().manual_seed(4)
    inputs = [(i % LAYERS, 3 * torch.randn(1, CHANNELS[i % LAYERS], 4, 4, generator=generator), (i % 7) / 7)
              for i in range(60)]
    expected = [decider(gate, features, spent) for gate, features, spent in inputs]
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        with torch.no_grad():
            results[k] = [decider(gate, features, spent) for _ in range(20) for gate, features, spent in inputs]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[k] == expected * 20 for k in range(3))
