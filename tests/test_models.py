"""The networks' memory layout: channels-last for speed, with the same numbers as NCHW."""

import numpy as np
import pytest
import torch

from components.models import ModelConfig, build_network
from components.tasks import InputTransform, get_task
from components.transfer.features import encode_batch, random_encoder
from components.transfer.readout import build_readout

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

MODEL = ModelConfig(width=8, representation_channels=4, downsample=4)


def conv_weights(module):
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("task", ["normal", "class_object"])  # a pixel and a vector decoder
def test_networks_are_channels_last_and_compute_what_nchw_does(task):
    torch.manual_seed(0)
    net = build_network(get_task(task), MODEL, 16).eval()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(net))
    nchw = build_network(get_task(task), MODEL, 16).to(memory_format=torch.contiguous_format).eval()
    nchw.load_state_dict(net.state_dict())  # a state dict loads into either layout
    assert all(w.is_contiguous() for w in conv_weights(nchw))
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(net(x), nchw(x), rtol=1e-4, atol=1e-5)

    readout = build_readout(get_task(task), 4, MODEL, 16, width=8)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(readout))


def test_cached_features_are_stored_nchw_contiguous():
    # A channels-last encoder's output is NHWC in memory; the cache's arrays must not be.
    encoder = random_encoder(MODEL, seed=0)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    out = encode_batch({"random": encoder}, rgb, ["a", "b", "c"], InputTransform.NONE, torch.device("cpu"))
    features = out["random"]
    assert features.shape == (3, 4, 4, 4) and features.flags["C_CONTIGUOUS"]
    with torch.no_grad():
        expected = encoder(torch.from_numpy(rgb).float() / 255.0).contiguous().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-2, atol=1e-2)  # stored as float16
