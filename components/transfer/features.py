"""What a readout reads: frozen features of a source encoder (or of raw pixels) per image.

Every feature source maps float RGB in [0, 1], (B, 3, S, S), to a representation-shaped tensor
(B, C, S/d, S/d), so a readout and its decoder are the same whatever the source:
- a Stage I task network's encoder + representation, loaded from its checkpoint;
- `random`: the same architecture, randomly initialised from a fixed seed and frozen;
- `pixels`: the image itself, pixel-unshuffled to (3 d^2, S/d, S/d): no learned encoder at all.

The encoder sees the *target's* view of the image (noisy for denoising, masked for inpainting):
the readout must solve the target's problem from the target's input, as its `self` network does.
The noise of that view depends only on the image id (and `NOISE_SEED`), so every encoder, every
batching and every run sees the same noisy image, and a cached view never depends on settings.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.models import ModelConfig, TaskNetwork, channels_last
from components.models.network import build_encoder
from components.storage import location
from components.tasks import InputTransform, view_input
from components.vocabulary import ReadoutKind

FEATURE_DTYPE = np.float16  # halves the cache; readouts compute in float32
_RGB_MEAN, _RGB_STD = 0.5, 0.25  # the task networks' own input normalisation


class FeatureKind(str, Enum):
    ENCODER = "encoder"  # a trained Stage I encoder
    RANDOM = ReadoutKind.RANDOM.value
    PIXELS = ReadoutKind.PIXELS.value


@dataclass(frozen=True)
class FeatureSource:
    """A named feature source; `key` identifies its weights (the checkpoint's hash for ENCODER)."""

    name: str
    kind: FeatureKind
    key: str
    checkpoint: str = ""  # ENCODER: URI of the task network's state dict (local path or s3://...)
    seed: int = 0  # RANDOM: the seed of its initialisation (a network replicate's own, `feature_sources`)


class PixelFeatures(nn.Module):
    """Raw RGB rearranged to the representation's spatial size: (B, 3, S, S) -> (B, 3 d^2, S/d, S/d)."""

    def __init__(self, downsample: int):
        super().__init__()
        self.downsample = downsample

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle((rgb - _RGB_MEAN) / _RGB_STD, self.downsample)


def feature_channels(kind: FeatureKind, model: ModelConfig) -> int:
    return 3 * model.downsample**2 if kind is FeatureKind.PIXELS else model.representation_channels


def random_encoder(model: ModelConfig, seed: int) -> nn.Module:
    """The `random` baseline: a fresh encoder from a given seed, so a rerun builds the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, representation = build_encoder(model)
    return _frozen(channels_last(TaskNetwork(encoder, representation, nn.Identity())))


def trained_encoder(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> nn.Module:
    """The encoder + representation of a Stage I task network (its decoder's weights are dropped)."""
    encoder, representation = build_encoder(model)
    net = channels_last(TaskNetwork(encoder, representation, nn.Identity()))
    keep = {k: v for k, v in state_dict.items() if k.startswith(("encoder.", "representation."))}
    net.load_state_dict(keep)
    return _frozen(net)


def build_feature_module(source: FeatureSource, model: ModelConfig) -> nn.Module:
    """A frozen module: float RGB (B, 3, S, S) in [0, 1] -> features (B, C, S/d, S/d)."""
    if source.kind is FeatureKind.PIXELS:
        return _frozen(PixelFeatures(model.downsample))
    if source.kind is FeatureKind.RANDOM:
        return random_encoder(model, source.seed)
    return trained_encoder(load_state_dict(source.checkpoint), model)


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A stored state dict, weights only (nothing unpickled), from local or object storage."""
    return torch.load(io.BytesIO(location(uri).read_bytes()), map_location="cpu", weights_only=True)


@torch.no_grad()
def encode_batch(
    modules: Mapping[str, nn.Module],
    rgb: np.ndarray,
    image_ids: Sequence[str],
    view: InputTransform,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """uint8 RGB (B, 3, S, S) -> {source name: (B, C, S/d, S/d) float16 features}.

    The image is decoded and viewed once and passed through every module: one read of the data
    serves every encoder that still needs it.
    """
    x = torch.from_numpy(np.array(rgb, copy=True)).to(device).float() / 255.0  # Ray's batches are read-only
    x = view_input(x, view, image_ids)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # contiguous: a channels-last encoder's output is NHWC in memory; the cache stores NCHW.
        return {
            name: m(x).float().contiguous().cpu().numpy().astype(FEATURE_DTYPE) for name, m in modules.items()
        }


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
