"""Task networks ("model families"): encoder -> representation -> task decoder.

The three parts are separate modules so Stage II can freeze `encoder` + `representation` of a
source network, cache their output, and train new readouts on it.
"""

from components.models.config import EncoderKind, ModelConfig
from components.models.network import TaskNetwork, build_network, channels_last, representation_shape

__all__ = [
    "EncoderKind",
    "ModelConfig",
    "TaskNetwork",
    "build_network",
    "channels_last",
    "representation_shape",
]
