"""Backbones for lth_ref: CIFAR ResNet-20/32/44/56/110, ResNet-18, VGG-16 (BN), WRN-32-2, MobileNet-v1,
and ResNet-50 (ImageNet stem, or the 3x3 stem of the paper's RN-50(+) for Tiny-ImageNet).

Built from a few pieces: BasicBlock + ResNet, a VGG builder from a config list, depthwise-separable
blocks + MobileNetV1, Bottleneck + BottleneckResNet. `MODELS` maps an `--arch` name to a constructor
`fn(num_classes) -> nn.Module`. Importing this file builds nothing.

The last section turns a channel-wise ticket into a smaller dense network: `slim_model` (dead channels
removed, from `channel_links`), `slim_state` / `load_slim` (export without masks), `count_macs`.

Conventions the rest of lth_ref relies on:
- the first nn.Conv2d in `model.named_modules()` is the stem conv (3 input channels; never pruned),
  and it is the only conv that reads the image;
- the classifier is a single nn.Linear and the last module; every conv has bias=False; no dropout;
- init: convs kaiming-normal (fan_out, relu gain), BN weight 1 and bias 0, Linear PyTorch default, as the
  official ResNet-18/50 (its VGG and ResNet-20/56 differ: README, Differences); deterministic given
  torch.manual_seed;
- MobileNet-v1's 3x3 depthwise convs have groups = channels. lth_ref prunes only convs with
  groups == 1 (its prunable weights): depthwise weights are 1.40% of MobileNet-v1's non-stem conv
  weights, a (C, 1, 3, 3) weight has no (O, K) matrix with rows to refill or regroup, and the grouped
  GEMM (kernels.RegroupedConv2d) refuses groups != 1. The official pruning_utils.pruning_model prunes
  every nn.Conv2d but the stem, depthwise ones included.

Parameter counts (count_params; paper numbers from Chen et al. 2022, Sec. 3.1 and Table 1):
    resnet20     269,722  (He et al.: 0.27M)     resnet18      11,173,962  (paper 11.22M = 100 classes)
    resnet32     464,154  (0.46M)                vgg16         14,724,042  (paper 14.72M, 10 classes)
    resnet44     658,586  (0.66M)                wrn32_2        1,860,522  (paper 1.86M, 10 classes)
    resnet56     853,018  (0.85M)                mobilenet_v1   3,217,226  (10 classes; paper 3.21M =
    resnet110  1,727,962  (1.7M)                                3,206,976 without the classifier)
    resnet50          25,557,032 at 1000 classes (paper 25.56M); 23,528,522 at 10
    resnet50_3x3stem  23,910,152 at 200 classes (Tiny-ImageNet); 25,549,352 at 1000; 23,520,842 at 10
(272,474 for resnet20 is the 1x1-conv "option B" variant; option A adds no shortcut parameters.)
"""

import copy
import dataclasses
from typing import Callable

import torch
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


# ---- MobileNet-v1 (CIFAR) ----

# (output channels, stride) of the 13 depthwise-separable blocks (Howard et al. 2017, Table 1), with
# the CIFAR change of the official Structure-LTH models/mobilenet.py (kuangliu): the stem has stride 1,
# so a 32x32 image reaches the last blocks at 2x2 (ImageNet: stem stride 2, 224 -> 7x7).
MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x)))))): 3x3 depthwise conv (groups = channels, stride s), then
    1x1 pointwise conv. The depthwise conv has groups > 1: not prunable (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1,
                               groups=in_channels, bias=False)  # weight (C_in, 1, 3, 3)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)  # weight (C_out, C_in, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class MobileNetV1(nn.Module):
    """CIFAR MobileNet-v1: 3x3 stem 3->32 (stride 1), 13 depthwise-separable blocks, avg pool, Linear."""

    def __init__(self, config, num_classes: int, stem_width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)  # the stem
        self.bn1 = nn.BatchNorm2d(stem_width)
        blocks, in_channels = [], stem_width
        for width, stride in config:
            blocks.append(DepthwiseSeparable(in_channels, width, stride))
            in_channels = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x):  # (B, 3, 32, 32)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 32, 32, 32)
        x = self.layers(x)  # (B, 1024, 2, 2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 1024)
        return self.fc(x)  # (B, num_classes)


# ---- ResNet-50 (bottleneck; ImageNet stem or 3x3 stem) ----


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride s), 1x1 expand to 4x; BN after each, ReLU after the sum.

    The stride sits on the 3x3 conv ("ResNet v1.5", torchvision and the official models/resnet.py).
    Shortcut: identity, or 1x1 conv (stride s) + BN where the shape changes.
    """
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):  # (B, C_in, H, W) -> (B, 4*width, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """ResNet-50/101/152 body: a stem, 4 stages of Bottlenecks (widths 64..512, x4 out), avg pool, Linear.

    stem "imagenet": 7x7 conv stride 2 + 3x3 max-pool stride 2 (He et al. 2016; 224 -> 56 -> 7);
    stem "3x3": 3x3 conv stride 1, no max-pool (the paper's RN-50(+), Appendix A2; the official
    models/resnet.py always builds this one), for 64x64 Tiny-ImageNet images (64 -> 64 -> 8).
    """

    def __init__(self, depths, num_classes: int, stem: str, stem_width: int = 64):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)  # the stem
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "3x3":
            self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)  # the stem
            self.pool = nn.Identity()
        else:
            raise ValueError(f"unknown stem {stem!r}, expected 'imagenet' or '3x3'")
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_channels = stem_width
        for i, depth in enumerate(depths):
            width = 64 * 2 ** i
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(in_channels, width, 2 if (i > 0 and j == 0) else 1))
                in_channels = width * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))  # layer1, layer2, ...
        self.num_stages = len(depths)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x):  # (B, 3, H, W): 224x224 ("imagenet" stem) or 64x64 ("3x3" stem)
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4) or (B, 64, H, W)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # (B, 256 * 2^i, ..)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)
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


def mobilenet_v1(num_classes: int = 10) -> MobileNetV1:
    """The paper's MBNet-v1 (3.21M): CIFAR MobileNet-v1 of the official models/mobilenet.py.

    3,217,226 params at 10 classes; 3,206,976 without the classifier, which is the paper's 3.21M
    (3.22M with the 10-class head, 3.31M with the 100-class one). Depthwise weights: 44,640 of the
    3,184,224 non-stem conv weights (1.40%). Official init: PyTorch's default (kaiming-uniform,
    a=sqrt(5)); ours is the kaiming-normal fan_out of every other model here.
    """
    return MobileNetV1(MOBILENET_V1, num_classes)


def resnet50(num_classes: int = 1000) -> BottleneckResNet:
    """ImageNet ResNet-50 (He et al. 2016, torchvision layout): 7x7/2 stem + max-pool, 3+4+6+3 bottlenecks.

    25,557,032 params at 1000 classes (the paper's 25.56M, Table 1 and Fig. 3).
    """
    return BottleneckResNet([3, 4, 6, 3], num_classes, stem="imagenet")


def resnet50_3x3stem(num_classes: int = 200) -> BottleneckResNet:
    """The paper's RN-50(+) for Tiny-ImageNet: ResNet-50 with a 3x3 stride-1 stem and no max-pool.

    Paper: Appendix A2 "RN-50(+)": first conv kernel 3, padding 1, stride 1 (Table A7). Official:
    models/resnet.py builds this stem for every ResNet (`if True:`), max-pool replaced by Identity;
    its GPU profiling of ResNet-50 uses (64, 64, 64, 64) inputs to layer1, i.e. 64x64 images without
    the max-pool. 25,549,352 params at 1000 classes, 23,910,152 at Tiny-ImageNet's 200.
    """
    return BottleneckResNet([3, 4, 6, 3], num_classes, stem="3x3")


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "wrn32_2": wrn32_2,
    "mobilenet_v1": mobilenet_v1,
    "resnet50": resnet50,
    "resnet50_3x3stem": resnet50_3x3stem,
}


# ---- slim: channel-wise tickets as smaller dense networks ----
# A channel-wise (refill) ticket keeps whole output channels. A channel whose conv row is pruned AND whose
# BN scale and shift are 0 outputs relu(bn(0)) = 0 exactly, so removing it from its conv and BN, and from
# the input side of every layer that reads it, leaves the network's function unchanged: the ticket runs
# as a smaller dense network on stock kernels. `channel_links` says which modules share a set of
# channels, built from one small rule per model or block type (LINK_RULES); a new block type (Bottleneck,
# a depthwise-separable block) is one more rule.


@dataclasses.dataclass
class ChannelLink:
    """One set of channels: the convs that produce it, the BNs that normalize it, the layers that read it.

    producers: (conv, bn) module names; the conv's output channels are this set and the bn normalizes
        them. A residual stream has one producer per branch of every add into it (conv2/bn2 of each
        block, 1x1 shortcut conv/bn); a depthwise conv (groups = channels) is a producer that also reads
        the set (it is listed in readers too), its channel c depending on input channel c only.
    readers: module names that read the set on their input side: convs (in_channels) and the Linear
        classifier (in_features).
    fixed: a module that cannot be resized touches the set (the parameter-free option-A pad shortcut
        shifts channels by a fixed offset): every channel stays.
    """

    producers: list = dataclasses.field(default_factory=list)
    readers: list = dataclasses.field(default_factory=list)
    fixed: bool = False


def _residual_add(shortcut, name, stream, branch, links):
    """out = relu(branch + shortcut(stream)): the channel set of the block's output.

    Identity: the output is the input stream, one more producer. 1x1 conv + BN: a new set produced by
    the branch and the shortcut conv (which reads the input stream). Pad (option A): a new set, and both
    sets stay whole (the pad's fixed channel offset cannot be resized); the pad is an alive producer.
    branch: (conv, bn) names of the last conv of the block's residual branch.
    """
    if isinstance(shortcut, nn.Identity):
        stream.producers.append(branch)
        return stream
    if isinstance(shortcut, PadShortcut):
        stream.fixed = True
        out = ChannelLink([branch], fixed=True)
    elif isinstance(shortcut, nn.Sequential) and len(shortcut) == 2 and isinstance(shortcut[0], nn.Conv2d) \
            and isinstance(shortcut[1], nn.BatchNorm2d):
        stream.readers.append(f"{name}.0")
        out = ChannelLink([branch, (f"{name}.0", f"{name}.1")])
    else:
        raise ValueError(f"{name}: no channel-link rule for shortcut {type(shortcut).__name__}: "
                         "extend _residual_add (identity, PadShortcut and 1x1 conv + BN are known)")
    links.append(out)
    return out


def _basic_block_links(block, prefix, stream, links):
    """BasicBlock: conv1 -> bn1 is the block's inner set (read by conv2 only); conv2 -> bn2 adds to the
    shortcut. Reads `stream` (conv1, and a conv shortcut); returns the link of the block's output."""
    stream.readers.append(prefix + "conv1")
    links.append(ChannelLink([(prefix + "conv1", prefix + "bn1")], [prefix + "conv2"]))
    return _residual_add(block.shortcut, prefix + "shortcut", stream, (prefix + "conv2", prefix + "bn2"),
                         links)


def _resnet_links(model, links):
    """ResNet: the stem starts the first stream (an alive producer: it has no mask); each block reads
    the current stream and hands on its output's; the classifier reads the last stream."""
    stream = ChannelLink([("conv1", "bn1")])
    links.append(stream)
    for i in range(model.num_stages):
        for j, block in enumerate(getattr(model, f"layer{i + 1}")):
            stream = _link_rule(block)(block, f"layer{i + 1}.{j}.", stream, links)
    stream.readers.append("fc")


def _vgg_links(model, links):
    """VGG: each conv -> BN is one set, read by the next conv (through ReLU and max-pool, which act per
    channel) or, for the last conv, by the classifier (global avg pool keeps channel order)."""
    stream, layers = None, list(model.features.named_children())
    for (name, m), (bn_name, bn) in zip(layers, layers[1:]):
        if isinstance(m, nn.Conv2d):
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError(f"features.{name}: a VGG conv must be followed by its BatchNorm2d")
            if stream is not None:
                stream.readers.append(f"features.{name}")
            stream = ChannelLink([(f"features.{name}", f"features.{bn_name}")])
            links.append(stream)
    stream.readers.append("fc")


def _bottleneck_links(block, prefix, stream, links):
    """Bottleneck: conv1 -> bn1 and conv2 -> bn2 are the block's inner sets (read by conv2 and conv3);
    conv3 -> bn3 adds to the shortcut. Reads `stream`; returns the link of the block's output."""
    stream.readers.append(prefix + "conv1")
    links.append(ChannelLink([(prefix + "conv1", prefix + "bn1")], [prefix + "conv2"]))
    links.append(ChannelLink([(prefix + "conv2", prefix + "bn2")], [prefix + "conv3"]))
    return _residual_add(block.shortcut, prefix + "shortcut", stream, (prefix + "conv3", prefix + "bn3"),
                         links)


def _mobilenet_links(model, links):
    """MobileNet-v1: a block's depthwise conv reads and produces its input set (channel c from channel c
    only: a producer and a reader of that set), its pointwise conv reads it and starts the next set; the
    stem starts the first, the classifier reads the last."""
    stream = ChannelLink([("conv1", "bn1")])
    links.append(stream)
    for j in range(len(model.layers)):
        p = f"layers.{j}."
        stream.producers.append((p + "conv1", p + "bn1"))
        stream.readers += [p + "conv1", p + "conv2"]
        stream = ChannelLink([(p + "conv2", p + "bn2")])
        links.append(stream)
    stream.readers.append("fc")


# Model rules: fn(model, links) appends the model's ChannelLinks. Block rules (called by a model rule):
# fn(block, prefix, stream, links) -> the link of the block's output; `stream` is the link of its input.
LINK_RULES: dict[type, Callable] = {ResNet: _resnet_links, BottleneckResNet: _resnet_links, VGG: _vgg_links,
                                    MobileNetV1: _mobilenet_links, BasicBlock: _basic_block_links,
                                    Bottleneck: _bottleneck_links}


def _link_rule(module):
    """The LINK_RULES entry of a module's exact type, or a ValueError that says how to add one."""
    rule = LINK_RULES.get(type(module))
    if rule is None:
        raise ValueError(f"no channel-link rule for {type(module).__name__}: add one to models.LINK_RULES "
                         "(see _basic_block_links for a block, _vgg_links for a model)")
    return rule


def _check_links(model, links):
    """Every conv produces exactly one set; every conv but the stem and the classifier read exactly one."""
    modules = dict(model.named_modules())
    produced = [conv for link in links for conv, _ in link.producers]
    read = [name for link in links for name in link.readers]
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    bns = [bn for link in links for _, bn in link.producers]
    if sorted(produced) != sorted(convs) or sorted(read) != sorted(convs[1:] + linears) or \
            not all(isinstance(modules.get(bn), nn.BatchNorm2d) for bn in bns):
        raise ValueError(f"the channel-link rules of {type(model).__name__} do not cover every conv, BN and "
                         "Linear exactly once: fix its entry in models.LINK_RULES")


def channel_links(model: nn.Module) -> list:
    """The model's channel sets as ChannelLinks (producers, readers, fixed), from LINK_RULES.

    Paper: A2, "Refill and Refill+ trim down the input and output channels": which input channels a
    removed output channel takes with it. Official: models/resnet_cfg.py builds a ResNet whose inner
    block widths come from a cfg list (residual streams full width); here the widths follow the mask,
    and a residual stream also shrinks where every branch of every add into it drops a channel.
    """
    links = []
    _link_rule(model)(model, links)
    _check_links(model, links)
    return links


def conv_bn_pairs(model: nn.Module) -> dict:
    """{conv weight name: BatchNorm module name} for every prunable conv (groups 1, not the stem): the
    BN whose scale and shift must be masked with the conv's output channels."""
    stem = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    modules = dict(model.named_modules())
    return {f"{conv}.weight": bn for link in channel_links(model) for conv, bn in link.producers
            if conv != stem and modules[conv].groups == 1}


def _dead_rows(modules, link, masks):
    """{producer conv: bool (C,)}: True where the conv's output channel is zero for every input.

    A conv with a mask: rows whose mask is all 0 (and bias 0). A depthwise conv that reads its own set:
    where every other producer's row is dead (its channel c reads only input channel c). A conv with no
    mask (the stem): none.
    """
    rows = {}
    for conv, _ in link.producers:
        m, name = modules[conv], f"{conv}.weight"
        rows[conv] = torch.zeros(m.out_channels, dtype=torch.bool, device=m.weight.device)
        if name in masks:
            rows[conv] = masks[name].reshape(m.out_channels, -1).sum(1).to(m.weight.device) == 0
            if m.bias is not None:
                rows[conv] &= m.bias.detach() == 0
    for conv, _ in link.producers:
        others = [rows[c] for c, _ in link.producers if c != conv and c not in link.readers]
        if conv in link.readers and others:
            rows[conv] = torch.stack(others).all(0)
    return rows


def dead_channels(model: nn.Module, link: ChannelLink, masks: dict) -> torch.Tensor:
    """Bool (C,): channels of `link` that are exactly 0 after every producer (and so removable).

    Paper: A2 (refill trims channels). A channel is dead when, for every producer (conv, bn), the conv's
    row is dead (_dead_rows) and the BN's scale and shift are 0 (then bn(0) = 0 whatever the running
    statistics, and relu(0 + 0) = 0 at a residual add). A fixed link has no dead channel.
    masks: {conv weight name: 0/1 tensor of the weight's shape} (convs without a mask count as alive).
    """
    modules = dict(model.named_modules())
    rows = _dead_rows(modules, link, masks)
    dead = torch.stack([rows[conv] & (modules[bn].weight.detach() == 0) & (modules[bn].bias.detach() == 0)
                        for conv, bn in link.producers]).all(0)
    return dead & (not link.fixed)


def bn_masks(model: nn.Module, masks: dict) -> dict:
    """{BN parameter name: 0/1 float (C,)} that is 0 exactly on the output channels whose conv row is
    dead, for the BN of every masked conv (and of a depthwise conv that reads a dead channel).

    Paper: none (the paper leaves BN unmasked); needed so that dead channels are exactly 0 and a
    channel-wise ticket equals its slim network. Official: no BN masking. Apply like the conv masks:
    multiply the BN weight and bias after every optimizer step.
    """
    modules, out = dict(model.named_modules()), {}
    for link in channel_links(model):
        rows = _dead_rows(modules, link, masks)
        for conv, bn in link.producers:
            if f"{conv}.weight" in masks or conv in link.readers:
                keep = (~rows[conv]).float()
                out[f"{bn}.weight"], out[f"{bn}.bias"] = keep, keep.clone()
    return out


def _take(module, attr, dim, keep):
    """module.attr <- module.attr.index_select(dim, keep), kept as a Parameter or a buffer."""
    t = getattr(module, attr)
    if t is None:
        return
    new = t.detach().index_select(dim, keep.to(t.device)).clone()
    setattr(module, attr,
            nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)


def resize_link(model: nn.Module, link: ChannelLink, keep: torch.Tensor) -> None:
    """Keep only channels `keep` (sorted int64 indices) of one set, in place: producer convs' output
    rows (and bias), their BNs (scale, shift, running stats), readers' input columns."""
    modules, n = dict(model.named_modules()), len(keep)
    for conv, bn in link.producers:
        _take(modules[conv], "weight", 0, keep)
        _take(modules[conv], "bias", 0, keep)
        modules[conv].out_channels = n
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _take(modules[bn], attr, 0, keep)
        modules[bn].num_features = n
    for name in link.readers:
        m = modules[name]
        if isinstance(m, nn.Linear):
            _take(m, "weight", 1, keep)
            m.in_features = n
        elif m.groups == 1:
            _take(m, "weight", 1, keep)
            m.in_channels = n
        elif m.groups == m.in_channels and name in [c for c, _ in link.producers]:
            m.in_channels = m.groups = n  # depthwise: its weight rows were taken as a producer
        else:
            raise ValueError(f"{name}: grouped conv (groups={m.groups}) that is not depthwise "
                             "cannot be resized")


@torch.no_grad()
def slim_model(model: nn.Module, masks: dict) -> nn.Module:
    """A smaller dense copy of a masked model: every dead channel (dead_channels) removed from its convs
    and BNs and from the input side of every conv and Linear that reads it.

    Paper: A2 (channel-wise tickets trim input and output channels; FLOPs counted that way).
    Official: no equivalent (channel-wise tickets run as masked dense networks).
    masks: {conv weight name: 0/1 tensor of the weight's shape}, any structure (refill, refill+,
    regroup: rows in no block are dead rows; unstructured: little or nothing to remove). The copy has
    weight * mask and is eval-equivalent to the masked model when the BN scale and shift of dead rows
    are 0 (bn_masks); a channel whose BN shift is not 0 stays. The model is not changed.
    """
    slim = copy.deepcopy(model)
    params = dict(slim.named_parameters())
    for name, mask in masks.items():
        if name not in params or tuple(params[name].shape) != tuple(mask.shape):
            raise ValueError(f"mask {name!r} does not fit the model (no such weight, or another shape): "
                             "pass the masks made for this architecture")
        params[name].mul_(mask.to(params[name]))
    links = channel_links(slim)
    deads = [dead_channels(slim, link, masks) for link in links]  # all before any resize
    for link, dead in zip(links, deads):
        keep = torch.nonzero(~dead).flatten().cpu()
        if len(keep) == 0:  # a 0-channel conv is not a valid nn.Conv2d: keep channel 0 (exact zeros)
            keep = torch.zeros(1, dtype=torch.int64)
        if len(keep) < len(dead):
            resize_link(slim, link, keep)
    return slim


def slim_state(slim: nn.Module, arch: str, num_classes: int) -> dict:
    """A slim network as plain data (loads with torch.load(weights_only=True), no lth_ref needed):
    {"arch", "num_classes", "channels": {conv name: output channels}, "state_dict"} (CPU tensors)."""
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(MODELS)}")
    channels = {n: m.out_channels for n, m in slim.named_modules() if isinstance(m, nn.Conv2d)}
    state = {k: v.detach().cpu().clone() for k, v in slim.state_dict().items()}
    return {"arch": arch, "num_classes": int(num_classes), "channels": channels, "state_dict": state}


def _link_width(model, link):
    """Current number of channels of a link (its first producer conv's out_channels)."""
    return model.get_submodule(link.producers[0][0]).out_channels


def load_slim(state: dict) -> nn.Module:
    """Rebuild a slim network from slim_state's dict: MODELS[arch](num_classes), every channel set cut
    to the saved width, then the saved weights (strict). No masks are involved."""
    arch = state.get("arch")
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r} in the slim state; expected one of {sorted(MODELS)}")
    model = MODELS[arch](state["num_classes"])
    for link in channel_links(model):
        widths = {state["channels"].get(conv) for conv, _ in link.producers}
        if len(widths) != 1 or None in widths:
            raise ValueError(f"slim state: convs {[c for c, _ in link.producers]} share their output "
                             f"channels but have widths {sorted(widths, key=str)}: was it saved by "
                             f"slim_state for {arch}?")
        width = widths.pop()
        if width != _link_width(model, link):
            resize_link(model, link, torch.arange(width))
    model.load_state_dict(state["state_dict"])
    return model


@torch.no_grad()
def count_macs(model: nn.Module, input_shape=(3, 32, 32), nonzero: bool = False) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image (forward hooks, eval mode).

    Conv: output elements x (in_channels / groups) x kh x kw; Linear: out_features x in_features.
    nonzero: count only the MACs of nonzero weights (what a kernel that skips pruned weights does):
    conv output pixels x nonzero weights, Linear nonzero weights. BN, ReLU, pooling and adds are not
    counted (the paper counts conv and FC FLOPs).
    """
    total = [0]

    def conv_hook(m, inputs, out):
        if nonzero:
            total[0] += out[0][0].numel() * int(torch.count_nonzero(m.weight))
        else:
            total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inputs, out):
        total[0] += int(torch.count_nonzero(m.weight)) if nonzero else out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]
