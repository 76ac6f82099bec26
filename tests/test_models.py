"""Tests for prunegym.compression.models: every zoo model's output shape, user factories, every error."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from prunegym.compression.models import MODELS, DigitsCNN, ResNet, VGGSmall, build_model, resolve_factory

ZOO_CASES = [
    (name, in_channels, size)
    for name in sorted(MODELS)
    for in_channels in (1, 3)
    for size in (8, 16, 32)
    if name != "resnet56" or size == 8  # ResNet-56 is slow at large inputs; 8 px still runs every block
]


def test_zoo_names_are_the_documented_ones():
    assert {"digits_cnn", "resnet20", "resnet56", "vgg_small"} <= set(MODELS)


@pytest.mark.parametrize(("name", "in_channels", "size"), ZOO_CASES)
def test_zoo_model_gives_logits_per_class(name, in_channels, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert isinstance(model, nn.Module)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_zoo_builders_are_the_classes():
    assert isinstance(build_model("digits_cnn", 1, 10), DigitsCNN)
    assert isinstance(build_model("vgg_small", 3, 10), VGGSmall)
    resnet20, resnet56 = build_model("resnet20", 3, 10), build_model("resnet56", 3, 10)
    assert isinstance(resnet20, ResNet) and isinstance(resnet56, ResNet)
    convs = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    # 6n+1 convs on the main path plus two 1x1 projection shortcuts.
    assert convs(resnet20) == 19 + 2
    assert convs(resnet56) == 55 + 2


@pytest.mark.parametrize("depth", [8, 14, 20, 32])
def test_resnet_accepts_depth_6n_plus_2(depth):
    model = ResNet(depth, in_channels=3, num_classes=4).eval()
    blocks = len(model.layer1) + len(model.layer2) + len(model.layer3)
    assert blocks == 3 * (depth - 2) // 6
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4)


@pytest.mark.parametrize("depth", [2, 7, 9, 19, 21, 0, -4])
def test_resnet_rejects_depth_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match=f"depth={depth}"):
        ResNet(depth)


# ---- user models -------------------------------------------------------------------------------
@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A fresh importable package under tmp_path; returns (package name, folder). Unloaded afterwards."""
    name = f"pg_user_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, folder
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _write_module(folder: Path, source: str) -> None:
    (folder / "nets.py").write_text(textwrap.dedent(source))


USER_NETS = """
    import torch
    from torch import nn

    CALLS = []

    def tiny(in_channels, num_classes):
        CALLS.append((in_channels, num_classes))
        return nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes),
        )

    def not_a_module(in_channels, num_classes):
        return {"in_channels": in_channels, "num_classes": num_classes}

    def raising(in_channels, num_classes):
        raise RuntimeError("no GPU here")

    NOT_CALLABLE = 3
"""


def test_user_factory_by_import_path(user_package):
    name, folder = user_package
    _write_module(folder, USER_NETS)
    model = build_model(f"{name}.nets:tiny", in_channels=2, num_classes=5)
    with torch.no_grad():
        assert model(torch.randn(3, 2, 8, 8)).shape == (3, 5)
    assert sys.modules[f"{name}.nets"].CALLS == [(2, 5)]  # called with the two keywords
    assert resolve_factory(f"{name}.nets:tiny") is sys.modules[f"{name}.nets"].tiny


def test_user_factory_returning_non_module_is_refused_by_name(user_package):
    name, folder = user_package
    _write_module(folder, USER_NETS)
    with pytest.raises(ValueError, match="not_a_module.*dict"):
        build_model(f"{name}.nets:not_a_module", 1, 10)


def test_user_factory_that_raises_is_refused_by_name(user_package):
    name, folder = user_package
    _write_module(folder, USER_NETS)
    with pytest.raises(ValueError, match=r"raising.*in_channels=1.*RuntimeError: no GPU here"):
        build_model(f"{name}.nets:raising", 1, 10)


def test_import_path_to_missing_module(user_package):
    name, _ = user_package
    spec = f"{name}.does_not_exist:tiny"
    with pytest.raises(ValueError, match="cannot import") as err:
        build_model(spec, 1, 10)
    assert spec in str(err.value)


@pytest.mark.parametrize("attr", ["missing", "NOT_CALLABLE"])
def test_import_path_to_missing_or_non_callable_attribute(user_package, attr):
    name, folder = user_package
    _write_module(folder, USER_NETS)
    with pytest.raises(ValueError, match=f"no callable '{attr}'"):
        build_model(f"{name}.nets:{attr}", 1, 10)


@pytest.mark.parametrize("spec", ["resnet18", "digits", "DIGITS_CNN", "torch.nn.Linear"])
def test_unknown_zoo_name(spec):
    with pytest.raises(ValueError, match="unknown model") as err:
        build_model(spec, 1, 10)
    assert repr(spec) in str(err.value)


@pytest.mark.parametrize("spec", ["", None, 3])
def test_model_name_must_be_a_non_empty_string(spec):
    with pytest.raises(ValueError, match="zoo name"):
        resolve_factory(spec)


@pytest.mark.parametrize(
    "spec",
    [".relative:make", ":make"],
)
def test_malformed_import_path_is_a_value_error_naming_it(spec):
    with pytest.raises(ValueError) as err:
        build_model(spec, 1, 10)
    assert repr(spec) in str(err.value)


@pytest.mark.parametrize(("in_channels", "num_classes"), [(0, 10), (-1, 10), (3, 1), (3, 0)])
def test_bad_in_channels_or_num_classes(in_channels, num_classes):
    with pytest.raises(ValueError, match=f"got {in_channels} and {num_classes}"):
        build_model("digits_cnn", in_channels, num_classes)
