"""
CIFAR backbones for lth_ref: CIFAR ResNet-20/32/44/56/110, ResNet-18, VGG-16 (BN) and WRN-32-2.

Everything is built from three pieces: one BasicBlock, one ResNet and one VGG builder from a config
list. `MODELS` maps an `--arch` name to a constructor `fn(num_classes) -> nn.Module`. Importing this
file builds nothing.

Conventions the rest of lth_ref relies on:
- the first nn.Conv2d in `model.named_modules()` is the stem conv (3 input channels; never pruned),
  and it is the only conv that reads the image;
- the classifier is a single nn.Linear and the last module; every conv has bias=False; no dropout;
- init: convs kaiming-normal (fan_out, relu gain, as the official Structure-LTH models), BN weight 1
  and bias 0, Linear PyTorch default; deterministic given torch.manual_seed.

Parameter counts (count_params, 10 classes; paper numbers from Chen et al. 2022, Sec. 3.1):
    resnet20     269,722  (He et al.: 0.27M)     resnet18  11,173,962  (paper 11.22M = 100 classes)
    resnet32     464,154  (0.46M)                vgg16     14,724,042  (paper 14.72M, 10 classes)
    resnet44     658,586  (0.66M)                wrn32_2    1,860,522  (paper 1.86M, 10 classes)
    resnet56     853,018  (0.85M)
    resnet110  1,727,962  (1.7M)
(272,474 for resnet20 is the 1x1-conv "option B" variant; option A adds no shortcut parameters.)
"""

from typing import Callable

import torch.nn as nn
import torch.nn.functional as F

# ---- ResNets (CIFAR ResNet-6n+2, ResNet-18, WRN-32-2) ----


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut (He et al. 2016): subsample space, zero-pad channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)  # zeros before / after the input channels

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # (B, C_out, H/s, W/s)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    shortcut: what to use when the shape changes (stride 2 or more channels):
      "pad"  - option A, parameter-free (CIFAR ResNet-6n+2);
      "conv" - option B, 1x1 conv (stride s) + BN (ResNet-18, WRN-32-2).
    When the shape does not change the shortcut is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        elif shortcut == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}, expected 'pad' or 'conv'")

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (stride 1, no max-pool), stages of BasicBlocks, avg pool, Linear.

    widths[i], depths[i]: channels and number of blocks of stage i; stage 0 has stride 1, every
    later stage starts with a stride-2 block. The stem outputs widths[0] channels.
    """

    def __init__(self, widths, depths, num_classes: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)  # the stem
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_channels, width, stride, shortcut))
                in_channels = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))  # layer1, layer2, ...
        self.num_stages = len(widths)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x):  # (B, 3, 32, 32)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, widths[0], 32, 32)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # (B, widths[i], 32/2^i, 32/2^i)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, widths[-1])
        return self.fc(x)  # (B, num_classes)


def cifar_resnet(depth: int, num_classes: int, width: int = 16, shortcut: str = "pad") -> ResNet:
    """He et al. CIFAR ResNet of depth 6n+2: 3 stages of n blocks, widths width*(1, 2, 4)."""
    assert (depth - 2) % 6 == 0, f"depth must be 6n+2, got {depth}"
    n = (depth - 2) // 6
    return ResNet([width, 2 * width, 4 * width], [n, n, n], num_classes, shortcut)


# ---- VGG ----

# VGG-16 ("D"). As in the official Structure-LTH vgg16_bn, Frankle et al. and open_lth, there is no
# 5th max-pool: the last three 512-convs run at 2x2 and a global avg pool gives the 512 features.
# (The kuangliu variant adds a 5th 'M' giving 1x1; the parameter count is the same either way.)
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG(nn.Module):
    """CIFAR VGG with BN: config of channel counts and 'M' (2x2 max-pool), avg pool, one Linear."""

    def __init__(self, config, num_classes: int):
        super().__init__()
        layers, in_channels = [], 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                conv = nn.Conv2d(in_channels, v, 3, padding=1, bias=False)  # first one is the stem
                layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x):  # (B, 3, 32, 32)
        x = self.features(x)  # (B, 512, 2, 2) for VGG16
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 512)
        return self.fc(x)  # (B, num_classes)


# ---- init, helpers, the table ----


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs, BN weight 1 and bias 0; Linear: PyTorch default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (BN running stats are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-20 (n=3, widths 16/32/64, option-A shortcuts), 0.27M params."""
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-32 (n=5, widths 16/32/64, option-A shortcuts), 0.46M params."""
    return cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-44 (n=7, widths 16/32/64, option-A shortcuts), 0.66M params."""
    return cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-56 (n=9, widths 16/32/64, option-A shortcuts), 0.85M params."""
    return cifar_resnet(56, num_classes)


def resnet110(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-110 (n=18, widths 16/32/64, option-A shortcuts), 1.7M params."""
    return cifar_resnet(110, num_classes)


def resnet18(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18 (kuangliu): 3x3 stem, no max-pool, 2+2+2+2 blocks 64..512, 1x1 shortcuts."""
    # 11,173,962 params at 10 classes; the paper's 11.22M is the 100-class count (11,220,132).
    return ResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, shortcut="conv")


def vgg16(num_classes: int = 10) -> VGG:
    """CIFAR VGG-16 with BN (13 bias-free 3x3 convs, 4 max-pools, global avg pool, one Linear)."""
    return VGG(VGG16, num_classes)


def wrn32_2(num_classes: int = 10) -> ResNet:
    """The paper's WRN-32-2: CIFAR ResNet-32 (n=5), widths doubled to 32/64/128, 1x1-conv shortcuts.

    Source: official Structure-LTH, `--arch wrn32` in utils.py builds `resnet32` from
    models/resnet_grasp.py (file named after GraSP, Wang et al. 2020): 3x3 stem 3->32, 3 stages of 5
    BasicBlocks (32, 64, 128 channels), 1x1 conv + BN shortcut where the shape changes, avg pool,
    Linear(128). 1,860,522 params at 10 classes (paper: 1.86M; with option-A shortcuts it would be
    1,849,898 = 1.85M). Not a Zagoruyko WRN (depth 6n+4): "-2" is the width factor over ResNet-32.
    """
    return cifar_resnet(32, num_classes, width=32, shortcut="conv")


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "wrn32_2": wrn32_2,
}
