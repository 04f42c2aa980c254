"""A small ResNet for image classification (He et al., the CIFAR form with basic blocks).

    conv1 (C -> w0, 3x3) -> bn1 -> relu
    -> layer1 .. layerS: one BasicBlock per stage, widths ``hidden`` = (w0, w1, ...); every stage after
       the first halves the resolution with a stride-2 first convolution and a 1x1 stride-2
       projection shortcut (conv + BatchNorm); the last stage's second convolution is dilated 2
    -> global average pool -> fc (w_last -> classes)

The convolutions and fc are the layers a plan can code (stride, padding and dilation are kept);
BatchNorm, ReLU and pooling stay on the master.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from sazd.models.task import CLASSIFICATION


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(c_out)),
            ]))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    task = CLASSIFICATION

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c_in = widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            block = BasicBlock(c_in, width, stride=1 if i == 0 else 2, dilation=2 if last and i > 0 else 1)
            self.add_module(f"layer{i + 1}", block)
            c_in = width
        self.stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.pool(x)))
