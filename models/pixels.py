"""8-bit images in, normalised floats out, on the device the network runs on.

The face recipes' training transforms end in 8-bit tensors: the DataLoader
workers then hand a quarter of the bytes of float32 across the process
boundary (shared memory, pickling of the batch) and skip the float
conversion, which the GPU does almost for free. Float input is taken to be
normalised already (evaluation transforms, tensors a user passes to
``embed``), so both kinds of input give the same network input."""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelInput(nn.Module):
    """``uint8 [B, C, H, W]`` in 0..255 -> ``(x / 255 - mean) / std`` in float32;
    any floating tensor is returned unchanged. Holds no state: the constants are plain
    float32 attributes, outside the state dict and outside dtype casts (a bf16 engine
    would otherwise round them); they follow the module's device moves. ``forward``
    changes nothing on the module, so a compiled step is not recompiled by its second call."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        mean64 = torch.tensor(self.mean, dtype=torch.float64)
        std64 = torch.tensor(self.std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std64)).float().view(1, -1, 1, 1)
        self._shift = (mean64 / std64).float().view(1, -1, 1, 1)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .to(device) / .cuda() / a DeepSpeed engine's move carry the constants along;
        # .half() / .to(bfloat16) do not touch them
        device = fn(self._scale).device
        if device != self._scale.device:
            self._scale, self._shift = self._scale.to(device), self._shift.to(device)
        return super()._apply(fn, recurse)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        # .to: a no-op where the module is; else a copy (inputs on another device than the module)
        return images.float().mul_(self._scale.to(images.device)).sub_(self._shift.to(images.device))

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
