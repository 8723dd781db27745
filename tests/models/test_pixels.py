"""models.pixels.PixelInput: 8-bit pixels in, the ImageNet-normalised floats
torchvision's ToTensor + Normalize would give out; floats untouched."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from models.pixels import IMAGENET_MEAN, IMAGENET_STD, PixelInput
from tests.tolerance import ops_rtol


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (20, 24, 3), dtype=np.uint8))


def test_uint8_matches_to_tensor_and_normalize():
    img = _image()
    ref = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(img))
    out = PixelInput()(transforms.PILToTensor()(img)[None])
    assert out.dtype == torch.float32
    # two orders of (x / 255 - mean) / std (folded constants add 2 roundings): relative errors on
    # values <= 1 + mean before the division by std, each path within that
    bound = ops_rtol(6) * (1 + max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert torch.allclose(out[0], ref, rtol=0, atol=2 * bound)


def test_float_input_is_returned_unchanged():
    x = torch.randn(2, 3, 8, 8)
    assert PixelInput()(x) is x


def test_no_state_and_exact_after_a_half_precision_cast():
    """A bf16 engine casts the module: the constants must not be rounded with it,
    and checkpoints must not change (no state dict entries)."""
    m = PixelInput()
    assert m.state_dict() == {}
    u8 = transforms.PILToTensor()(_image(1))[None]
    ref = PixelInput()(u8)
    assert torch.equal(m.to(torch.bfloat16)(u8), ref)


def test_channels_last_layout_is_kept():
    u8 = transforms.PILToTensor()(_image(2))[None].contiguous(memory_format=torch.channels_last)
    assert PixelInput()(u8).is_contiguous(memory_format=torch.channels_last)


def test_compiled_forward_is_not_recompiled_by_its_second_call():
    """Issue 33: a forward that fills a cache is recompiled after its first call."""
    m = PixelInput()
    torch._dynamo.reset()
    step = torch.compile(m, backend="eager", fullgraph=True)
    u8 = transforms.PILToTensor()(_image(3))[None]
    first = step(u8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = step(u8)
    assert torch.equal(first, second) and torch.equal(second, PixelInput()(u8))


def test_constants_follow_device_moves_but_not_dtype_casts():
    m = PixelInput().to(torch.bfloat16).to("meta")
    assert m._scale.device.type == "meta" and m._scale.dtype == torch.float32
