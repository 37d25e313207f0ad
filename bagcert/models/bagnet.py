"""BagNet-9 / 17 / 33 (Brendel & Bethge, ICLR 2019), re-implemented from the paper's description.

ResNet-50 bottleneck stages [3, 4, 6, 3] with widths 64/128/256/512 (x4 expansion) and strides
[2, 2, 2, 1], no max-pool, all convolutions unpadded. Stem: 1x1 conv 3->64, 3x3 conv 64->64, BN, ReLU.
Only the first block of a stage may keep a 3x3 kernel; where the residual and the main path differ
in size the residual is cropped at the bottom/right. Receptive field 9 / 17 / 33, stride 8.
The classifier is applied per location (a 1x1 convolution), giving the local logits.
``width`` scales every channel count (``width=0.25`` gives a CPU-sized variant).

At width 1 the modules, their names and every weight shape are those of the original implementation
(``bagnets/pytorchnet.py`` of wielandbrendel/bag-of-local-features-models), except that its classifier
``fc`` is an ``nn.Linear`` [classes, 2048] where this one is the same matrix as a 1x1 convolution
[classes, 2048, 1, 1]; :func:`bagcert.models.convert.load_bagnet_state_dict` loads the public ImageNet
weights. One difference does not touch the weights: the original's stem BatchNorm (``bn1``) updates its
running statistics with momentum 0.001, this one with PyTorch's default 0.1 (only training changes them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry import Geometry
from ..geometry_inference import mark_built
from .base import IMAGENET_MEAN, IMAGENET_STD, BagModel

_KERNEL3 = {9: (1, 1, 0, 0), 17: (1, 1, 1, 0), 33: (1, 1, 1, 1)}
_LAYERS = (3, 4, 6, 3)
_STRIDES = (2, 2, 2, 1)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, kernel_size: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, stride=stride, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if residual.shape[-2:] != y.shape[-2:]:
            # crop at the bottom/right: the kept residual pixels lie inside the main path's window
            residual = residual[:, :, : y.shape[-2], : y.shape[-1]]
        return self.relu(y + residual)


class BagNet(BagModel):
    def __init__(
        self,
        receptive_field: int = 17,
        num_classes: int = 1000,
        width: float = 1.0,
        aggregation: str = "votes",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        super().__init__(num_classes, mean, std, aggregation)
        if receptive_field not in _KERNEL3:
            raise ValueError(f"BagNet receptive field must be one of {sorted(_KERNEL3)}, got {receptive_field}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        k3 = _KERNEL3[receptive_field]
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731
        stem = c(64)
        self.conv1 = nn.Conv2d(3, stem, 1, bias=False)
        self.conv2 = nn.Conv2d(stem, stem, 3, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], stem
        chain = [(1, 1, 0), (3, 1, 0)]
        for planes, blocks, stride, n3 in zip((64, 128, 256, 512), _LAYERS, _STRIDES, k3):
            planes = c(planes)
            stage = []
            for b in range(blocks):
                k = 3 if b < n3 else 1
                s = stride if b == 0 else 1
                stage.append(Bottleneck(inplanes, planes, s, k))
                chain.append((k, s, 0))
                inplanes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Conv2d(inplanes, num_classes, 1)  # the linear classifier, applied per location
        self.geometry = Geometry.from_layers(chain)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        mark_built(self)  # the geometry above is derived from the layers built here: trusted by verify_geometry

    def features_to_logits(self, x):
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x)
