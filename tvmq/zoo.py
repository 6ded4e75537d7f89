"""Built-in models. There is no CPU torchvision here, so the zoo defines its own.

- ``digits``: a small residual CNN for scikit-learn's 8x8 handwritten digits (the default
  model: trains offline in about a minute).
- ``resnet18``: the ImageNet ResNet-18 (1x3x224x224), for latency.
- ``resnet20``: the CIFAR-style ResNet-20 (1x3x32x32).
"""
from __future__ import annotations

from torch import nn


def conv_bn(cin, cout, k=3, stride=1):
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 downsample, add, ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
        self.downsample = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, stem: nn.Module, widths, blocks, num_classes):
        super().__init__()
        self.stem = stem
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def resnet18(num_classes: int = 1000) -> ResNet:
    stem = nn.Sequential(*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    return ResNet(stem, (64, 128, 256, 512), (2, 2, 2, 2), num_classes)


def resnet20(num_classes: int = 10) -> ResNet:
    stem = nn.Sequential(*conv_bn(3, 16, 3, 1), nn.ReLU())
    return ResNet(stem, (16, 32, 64), (3, 3, 3), num_classes)


def digits_net(num_classes: int = 10) -> ResNet:
    """1x8x8 digits: stem conv 1->16, a residual block, a strided block 16->32, pool, fc."""
    stem = nn.Sequential(*conv_bn(1, 16, 3, 1), nn.ReLU())
    return ResNet(stem, (16, 32), (1, 1), num_classes)


ZOO = {
    "digits": (digits_net, (1, 1, 8, 8)),
    "resnet18": (resnet18, (1, 3, 224, 224)),
    "resnet20": (resnet20, (1, 3, 32, 32)),
}
