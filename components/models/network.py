"""Encoders, decoders and the task network that joins them. No pretrained weights, ever."""

from __future__ import annotations

import math

import torch
from torch import nn

from components.models.config import EncoderKind, ModelConfig
from components.tasks import Task, TaskKind

_RGB_MEAN, _RGB_STD = 0.5, 0.25


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.skip = (
            nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class SmallEncoder(nn.Module):
    """Stem + one stride-2 residual block per halving: (B, 3, S, S) -> (B, C, S/d, S/d)."""

    def __init__(self, width: int, downsample: int):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, width)]
        cin = width
        for i in range(int(math.log2(downsample))):
            cout = width * 2 ** min(i + 1, 3)
            layers.append(_ResidualBlock(cin, cout, 2))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEncoder(nn.Module):
    """A torchvision ResNet (random init) up to the stage whose stride equals `downsample`."""

    def __init__(self, depth: int, downsample: int, small_stem: bool):
        super().__init__()
        # Imported here: torchvision pulls in torch._dynamo (about 1 s), which every Ray worker
        # would pay at start-up even when it only runs the small encoder.
        import torchvision

        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if small_stem:  # stride 1, no max-pool: keeps detail in 32-128 pixel images
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        stem_stride = 1 if small_stem else 4
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        keep = int(math.log2(downsample / stem_stride)) + 1  # layer1 keeps the stride; each next halves
        if not 1 <= keep <= 4:
            raise ValueError(f"downsample {downsample} is not reachable with small_stem={small_stem}")
        self.layers = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages[:keep])
        last_block = stages[keep - 1][-1]
        self.out_channels = getattr(last_block, "bn3", last_block.bn2).num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PixelDecoder(nn.Module):
    """Conv upsampler: representation -> (B, C_out, S, S)."""

    def __init__(self, cin: int, cout: int, width: int, upsample: int):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(cin, width * 4)]
        c = width * 4
        for i in range(int(math.log2(upsample))):
            nxt = max(width, c // 2) if i else c
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_bn(c, nxt)]
            c = nxt
        layers.append(nn.Conv2d(c, cout, 3, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VectorDecoder(nn.Module):
    """Three FC layers on the flattened representation."""

    def __init__(self, in_features: int, out_features: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_decoder(
    task: Task, rep_shape: tuple[int, int, int], config: ModelConfig, channels: int | None = None
) -> nn.Module:
    """The decoder of `task` on a representation of shape (C, h, w); Stage II reuses it."""
    out = channels or task.channels
    if task.kind is TaskKind.PIXEL:
        return PixelDecoder(rep_shape[0], out, config.width, config.downsample)
    return VectorDecoder(math.prod(rep_shape), out, config.decoder_hidden)


def representation_shape(config: ModelConfig, image_size: int) -> tuple[int, int, int]:
    if image_size % config.downsample:
        raise ValueError(f"image size {image_size} is not divisible by model.downsample {config.downsample}")
    side = image_size // config.downsample
    return (config.representation_channels, side, side)


class TaskNetwork(nn.Module):
    """encoder -> representation (the frozen, cached bottleneck of Stage II) -> decoder."""

    def __init__(self, encoder: nn.Module, representation: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.representation = representation
        self.decoder = decoder

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, C, S/d, S/d) representation."""
        return self.representation(self.encoder((rgb - _RGB_MEAN) / _RGB_STD))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(rgb))


def build_encoder(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """A fresh (encoder, representation) pair; also the `random` baseline of Stage II."""
    if config.encoder is EncoderKind.SMALL:
        encoder: nn.Module = SmallEncoder(config.width, config.downsample)
    else:
        encoder = ResNetEncoder(config.resnet_depth, config.downsample, config.small_stem)
    representation = nn.Sequential(
        nn.Conv2d(encoder.out_channels, config.representation_channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(config.representation_channels),
    )
    return encoder, representation


def build_network(
    task: Task, config: ModelConfig, image_size: int, channels: int | None = None
) -> TaskNetwork:
    encoder, representation = build_encoder(config)
    decoder = build_decoder(task, representation_shape(config, image_size), config, channels)
    return channels_last(TaskNetwork(encoder, representation, decoder))


def channels_last(module: nn.Module) -> nn.Module:
    """`module` with its conv weights stored NHWC, the layout oneDNN's CPU kernels and GPU
    tensor cores are fastest in: a CPU training step of the quickstart's networks and readouts
    takes 1.35-1.5x less time than in NCHW here. Inputs may stay NCHW (a conv follows its
    weights' layout, and outputs come back NHWC-strided with the same logical shape); state
    dicts load into either layout. Initialisation happens before the move, so seeded weights
    are the same values."""
    return module.to(memory_format=torch.channels_last)
