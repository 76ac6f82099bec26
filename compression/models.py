"""The model zoo: small CNNs for the digits default, CIFAR-style ResNets, a small VGG, user models.

Every builder takes the keywords ``in_channels`` and ``num_classes`` and ends in global average
pooling, so any square input of 8 px or more works. A user model is named ``package.module:factory``
and its factory is called with the same two keywords.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "DigitsCNN", "ResNet", "VGGSmall", "build_model", "resolve_factory"]


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers and a linear classifier: the embedded default, sized for 8x8 digits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 32, 64)):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            *_conv_bn(in_channels, c1),
            *_conv_bn(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn(c2, c3),
            *_conv_bn(c3, c4),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """He et al.'s CIFAR basic block; the shortcut is a 1x1 conv + BN when the shape changes (option B)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2): three stages of n basic blocks at widths 16, 32, 64."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1, got depth={depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        width_in = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(width_in, width, stride if i == 0 else 1))
                width_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGGSmall(nn.Module):
    """A small VGG with BatchNorm: three stages of two 3x3 convs, max-pooling between stages."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += _conv_bn(c_in, width) + _conv_bn(width, width)
            c_in = width
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _resnet20(in_channels: int, num_classes: int) -> nn.Module:
    return ResNet(20, in_channels, num_classes)


def _resnet56(in_channels: int, num_classes: int) -> nn.Module:
    return ResNet(56, in_channels, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet20": _resnet20,
    "resnet56": _resnet56,
    "vgg_small": VGGSmall,
}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """Return the builder for a zoo name or a ``package.module:factory`` import path."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a zoo name {sorted(MODELS)} or 'package.module:factory', got {name!r}")
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)} or 'package.module:factory'")
    module_name, _, attr = name.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise ValueError(f"model {name!r}: expected an absolute import path 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {module_name!r} has no callable {attr!r}")
    return factory


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """Build a dense, untrained model by zoo name or import path."""
    if in_channels < 1 or num_classes < 2:
        raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}")
    factory = resolve_factory(name)
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes)
    except Exception as err:  # a user's factory can fail in any way; say whose code failed
        raise ValueError(f"model factory {name!r} failed when called with in_channels={in_channels}, "
                         f"num_classes={num_classes}: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
