"""The model family's settings (one per study: every task uses the same encoder architecture)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from components.errors import ConfigError


class EncoderKind(str, Enum):
    SMALL = "small"  # a few residual blocks: the CPU-friendly default
    RESNET = "resnet"  # torchvision ResNet of any depth, cut to a spatial bottleneck


RESNET_DEPTHS = (18, 34, 50, 101, 152)


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderKind = EncoderKind.SMALL
    resnet_depth: int = 50
    small_stem: bool = True  # 3x3 stride-1 stem without max-pool, for images of 32-128 pixels
    width: int = 32  # base channels of the small encoder and of the decoders
    representation_channels: int = 8  # Taskonomy: 16x16x8 for 256x256 inputs
    downsample: int = 8  # image side / representation side
    decoder_hidden: int = 256  # vector decoders: 2 hidden FC layers of this size

    def __post_init__(self) -> None:
        if self.encoder is EncoderKind.RESNET and self.resnet_depth not in RESNET_DEPTHS:
            raise ConfigError(f"model.resnet_depth must be one of {RESNET_DEPTHS}, got {self.resnet_depth}")
        if self.downsample not in (2, 4, 8, 16, 32):
            raise ConfigError(f"model.downsample must be a power of two in [2, 32], got {self.downsample}")
        for name in ("width", "representation_channels", "decoder_hidden", "resnet_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
