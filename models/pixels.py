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
    any floating tensor is returned unchanged. Holds no state: the constants
    are kept per device outside the state dict and outside dtype casts
    (a bf16 engine would otherwise round them)."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            mean = torch.tensor(self.mean, dtype=torch.float64)
            std = torch.tensor(self.std, dtype=torch.float64)
            scale, shift = (1.0 / (255.0 * std)), (mean / std)
            self._consts[device] = (scale.float().view(1, -1, 1, 1).to(device),
                                    shift.float().view(1, -1, 1, 1).to(device))
        return self._consts[device]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        scale, shift = self._constants(images.device)
        return images.float().mul_(scale).sub_(shift)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
