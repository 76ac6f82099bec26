"""Tests for prunegym.compression.checkpoint: self-describing checkpoints, safe loading, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.checkpoint import (
    atomic_path,
    build_from_architecture,
    describe_architecture,
    interrupts_held,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from prunegym.compression.importance import L1Importance
from prunegym.compression.models import build_model

SIZE = 8


@pytest.fixture(scope="module")
def pruned_resnet20():
    """A hard-pruned ResNet-20 with random BN statistics, in eval mode, and its architecture description."""
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    model.eval()
    graph = ChannelGraph(model, torch.randn(1, 3, SIZE, SIZE))
    ratios = np.random.default_rng(0).uniform(0.2, 0.9, len(graph.groups))
    pruned = prune_channels(model, graph, graph.kept_channels(L1Importance(), graph.keep_counts(ratios))).eval()
    return pruned, describe_architecture(pruned, "resnet20", 3, 10, SIZE)


def _outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


# ---- architecture ------------------------------------------------------------------------------
def test_describe_architecture_records_the_pruned_shapes(pruned_resnet20):
    pruned, arch = pruned_resnet20
    assert {k: arch[k] for k in ("model", "in_channels", "num_classes", "image_size")} == {
        "model": "resnet20", "in_channels": 3, "num_classes": 10, "image_size": SIZE}
    layers = arch["layers"]
    assert layers["conv1"]["type"] == "conv2d" and layers["fc"]["type"] == "linear"
    assert layers["bn1"] == {"type": "batchnorm", "num_features": pruned.bn1.num_features}
    assert layers["layer2.1.conv1"]["out_channels"] == pruned.layer2[1].conv1.out_channels
    assert layers["fc"]["in_features"] == pruned.fc.in_features < 64  # really pruned
    assert json.loads(json.dumps(arch)) == arch  # JSON-able as it stands


def test_build_from_architecture_round_trip(pruned_resnet20):
    pruned, arch = pruned_resnet20
    rebuilt = build_from_architecture(arch)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    assert describe_architecture(rebuilt, "resnet20", 3, 10, SIZE) == arch
    torch.testing.assert_close(_outputs(rebuilt), _outputs(pruned), atol=0, rtol=0)


def test_build_from_architecture_after_json(pruned_resnet20, tmp_path):
    pruned, arch = pruned_resnet20
    write_json(tmp_path / "arch.json", arch)
    rebuilt = build_from_architecture(read_json(tmp_path / "arch.json"))
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(_outputs(rebuilt), _outputs(pruned), atol=0, rtol=0)


def test_dense_architecture_builds_the_dense_model():
    model = build_model("vgg_small", 1, 4)
    rebuilt = build_from_architecture(describe_architecture(model, "vgg_small", 1, 4, 16))
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_architecture_naming_a_missing_layer(pruned_resnet20):
    _, arch = pruned_resnet20
    bad = {**arch, "layers": {**arch["layers"], "layer4.0.conv1": arch["layers"]["conv1"]}}
    with pytest.raises(ValueError, match="'layer4.0.conv1'"):
        build_from_architecture(bad)


def test_architecture_with_the_wrong_layer_type(pruned_resnet20):
    _, arch = pruned_resnet20
    bad = {**arch, "layers": {**arch["layers"], "bn1": arch["layers"]["conv1"]}}
    with pytest.raises(ValueError, match="'bn1'"):
        build_from_architecture(bad)


@pytest.mark.parametrize("key", ["model", "in_channels", "num_classes", "image_size", "layers"])
def test_architecture_missing_a_key(pruned_resnet20, key):
    _, arch = pruned_resnet20
    with pytest.raises(ValueError, match=key):
        build_from_architecture({k: v for k, v in arch.items() if k != key})


# ---- checkpoints -------------------------------------------------------------------------------
def test_save_and_load_checkpoint(pruned_resnet20, tmp_path):
    pruned, arch = pruned_resnet20
    path = tmp_path / "runs" / "model.pt"  # the folder does not exist yet
    save_checkpoint(path, pruned, arch, {"seed": 3, "note": "pruned"})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left beside it
    model, loaded_arch, metadata = load_checkpoint(path)
    assert loaded_arch == arch
    assert metadata == {"seed": 3, "note": "pruned"}
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.testing.assert_close(_outputs(model), _outputs(pruned), atol=0, rtol=0)


def test_checkpoint_without_metadata(tmp_path):
    model = build_model("digits_cnn", 1, 10)
    save_checkpoint(tmp_path / "m.pt", model, describe_architecture(model, "digits_cnn", 1, 10, SIZE))
    assert load_checkpoint(tmp_path / "m.pt")[2] == {}


def test_a_user_model_checkpoint_is_built_only_when_its_factory_is_trusted(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "from torch import nn\n"
        "def make(in_channels, num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = {"model": "userpkg.nets:make", "in_channels": 1, "num_classes": 3, "image_size": 8, "layers": {}}
    with pytest.raises(ValueError, match="trust_factory"):
        build_from_architecture(arch)
    assert isinstance(build_from_architecture(arch, trust_factory=True), torch.nn.Module)


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint either


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", bytes(range(256)) * 4])
def test_load_checkpoint_garbage(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable prunegym checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("payload", [{"state_dict": {}}, {"architecture": {}}, [1, 2, 3], torch.zeros(3)])
def test_load_checkpoint_wrong_payload(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="not a prunegym checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def _touch(path: str) -> str:
    Path(path).write_text("code ran")
    return path


class _Payload:
    """Unpickling this object would call _touch: a checkpoint that runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return _touch, (self.path,)


def test_the_pickled_object_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({"x": _Payload(marker)}))  # the control: a plain unpickler runs it
    assert marker.read_text() == "code ran"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_load_checkpoint_refuses_pickled_objects(pruned_resnet20, tmp_path, writer):
    pruned, arch = pruned_resnet20
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"architecture": arch, "state_dict": pruned.state_dict(), "metadata": {"x": _Payload(marker)}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="not a readable prunegym checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


# ---- atomic writes and JSON --------------------------------------------------------------------
def test_atomic_path_moves_the_file_into_place(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the body succeeds
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_keeps_the_old_file_when_the_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(KeyError), atomic_path(target):
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_failed_checkpoint_save_keeps_the_old_checkpoint(tmp_path):
    model = build_model("digits_cnn", 1, 10)
    arch = describe_architecture(model, "digits_cnn", 1, 10, SIZE)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, arch, {"version": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        save_checkpoint(path, model, arch, {"version": 2, "bad": lambda: None})
    assert load_checkpoint(path)[2] == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_atomic_path_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.usefixtures("python_sigint")
def test_a_ctrl_c_during_a_write_is_held_until_the_file_is_in_place(tmp_path):
    target = tmp_path / "out.txt"
    written = []
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, half-way through the write
        tmp.write_text("whole")
        written.append(True)
    assert written and target.read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.usefixtures("python_sigint")
def test_a_second_ctrl_c_stops_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        signal.raise_signal(signal.SIGINT)
        reached.append(1)
        signal.raise_signal(signal.SIGINT)
        reached.append(2)
    assert reached == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("python_sigint")
def test_a_held_ctrl_c_is_raised_when_the_body_fails_too(tmp_path):
    with pytest.raises(KeyboardInterrupt) as caught, atomic_path(tmp_path / "out.txt"):
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("disk full")
    assert isinstance(caught.value.__context__, RuntimeError)  # the failure is kept beside it
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_in_another_thread_leaves_signals_alone(tmp_path):
    """Only the main thread may set a signal handler (and only it receives SIGINT)."""
    handler = signal.getsignal(signal.SIGINT)
    errors = []

    def write() -> None:
        try:
            write_json(tmp_path / "a.json", {"a": 1})
        except Exception as err:  # noqa: BLE001 - reported to the main thread below
            errors.append(err)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert not errors and read_json(tmp_path / "a.json") == {"a": 1}
    assert signal.getsignal(signal.SIGINT) is handler


def test_json_round_trip(tmp_path):
    obj = {"name": "run", "lam": 0.5, "keep": [1, 2, 3], "nested": {"ok": True, "none": None}}
    write_json(tmp_path / "deep" / "config.json", obj)
    assert read_json(tmp_path / "deep" / "config.json") == obj
    write_json(tmp_path / "deep" / "config.json", [1])  # overwrites
    assert read_json(tmp_path / "deep" / "config.json") == [1]


def test_read_json_invalid(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"a": 1,')
    with pytest.raises(ValueError, match="not valid JSON") as err:
        read_json(path)
    assert str(path) in str(err.value)


def test_read_json_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_write_json_refuses_non_json_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
