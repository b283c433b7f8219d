"""Classifiers for the unlearning experiments, in plain torch (no torchvision needed).

* :class:`ResNet18` -- the CIFAR variant used by SalUn (3x3 stem, stride 1, no max-pool).
* :class:`SmallCNN` -- a two-convolution network for 28x28 MNIST digits that trains in seconds on a CPU.

Any other ``torch.nn.Module`` mapping ``[N, C, H, W]`` images to ``[N, num_classes]`` logits works with
:mod:`salun_diffusers.classification.methods` as well.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

MODELS = ("cnn", "resnet18")


class SmallCNN(nn.Module):
    """conv(5x5, stride 2) - conv(3x3, stride 2) - fc - fc, without pooling (strided convolutions are cheap on a CPU).

    About 57k parameters with the defaults on 28x28 inputs; an epoch over 8,000 MNIST digits takes about a second on
    one CPU core.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 16,
                 hidden: int = 64):
        super().__init__()
        side = ((image_size - 5) // 2 + 1 - 3) // 2 + 1
        if side < 1:
            raise ValueError(f"SmallCNN needs images of at least 9x9 pixels, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, width, 5, stride=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2)
        self.fc1 = nn.Linear(2 * width * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem without max-pool, stages of 64/128/256/512 channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, blocks in enumerate((2, 2, 2, 2)):
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                seed: Optional[int] = None) -> nn.Module:
    """Build ``"cnn"`` or ``"resnet18"``; with ``seed`` the initial weights depend only on it (global RNG untouched)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use one of {MODELS} (or pass your own nn.Module to the Python API)")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "cnn":
            return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        return ResNet18(num_classes=num_classes, in_channels=in_channels)
