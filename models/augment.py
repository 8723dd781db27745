"""Augmentations for degraded face images (FaceCom: blur, noise, low light, fog, JPEG).

Every transform takes a ``PIL.Image`` or a float tensor ``[C, H, W]`` in
``[0, 1]`` and returns the same kind, so it sits anywhere in a
``torchvision.transforms.Compose`` (before or after ``ToTensor``). Each is
applied with probability ``p``. All random draws use the *global torch RNG*
(``torch.rand`` etc.), which the data stream seeds per sample, so a given
sample gets the same degradation on every run and after a resume.

- :class:`RandomGaussianBlur`: ``torchvision`` gaussian blur, sigma uniform in a range.
- :class:`RandomGaussianNoise`: additive N(0, std^2), std uniform in a range, clipped to [0, 1].
- :class:`RandomLowLight`: gamma > 1 (darkens shadows first) then a brightness drop.
- :class:`RandomHaze`: atmospheric scattering ``I = J t + A (1 - t)``, ``t = exp(-beta d)``,
  ``d`` a linear depth-like ramp in a random direction, ``A`` a grey-to-white veil.
- :class:`RandomJpeg`: re-encode with PIL at a low JPEG quality.

:func:`degradation_transforms` composes them (haze, low light, blur, noise, JPEG:
the order a camera would see them).
"""
from __future__ import annotations

import io
import math
from typing import Callable

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

__all__ = ["RandomGaussianBlur", "RandomGaussianNoise", "RandomLowLight", "RandomHaze", "RandomJpeg",
           "degradation_transforms"]


def _uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()).item())


def _as_tensor(img: Image.Image | torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], object]]:
    """A float ``[C,H,W]`` tensor in [0,1] and a function converting back to the input kind."""
    if isinstance(img, Image.Image):
        mode = img.mode
        return TF.to_tensor(img), lambda t: TF.to_pil_image(t.clamp(0, 1), mode=mode if mode in ("L", "RGB") else None)
    if isinstance(img, torch.Tensor):
        if img.dtype == torch.uint8:
            return img.float() / 255.0, lambda t: (t.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return img, lambda t: t.clamp(0, 1).to(img.dtype)
    raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")


class _RandomDegradation:
    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, img):
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        return self.apply(img)

    def apply(self, img):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class RandomGaussianBlur(_RandomDegradation):
    def __init__(self, p: float = 0.3, sigma: tuple[float, float] = (0.5, 2.0)):
        super().__init__(p)
        self.sigma = sigma

    def apply(self, img):
        sigma = _uniform(*self.sigma)
        k = 2 * math.ceil(3 * sigma) + 1
        size = img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])
        k = max(3, min(k, (min(size) // 2) * 2 - 1 if min(size) > 3 else 3))
        return TF.gaussian_blur(img, kernel_size=[k, k], sigma=[sigma, sigma])


class RandomGaussianNoise(_RandomDegradation):
    def __init__(self, p: float = 0.3, std: tuple[float, float] = (0.02, 0.10)):
        super().__init__(p)
        self.std = std

    def apply(self, img):
        t, back = _as_tensor(img)
        std = _uniform(*self.std)
        return back(t + torch.randn(t.shape) * std)


class RandomLowLight(_RandomDegradation):
    def __init__(self, p: float = 0.3, gamma: tuple[float, float] = (1.5, 3.0),
                 brightness: tuple[float, float] = (0.3, 0.8)):
        super().__init__(p)
        self.gamma, self.brightness = gamma, brightness

    def apply(self, img):
        gamma = _uniform(*self.gamma)
        factor = _uniform(*self.brightness)
        return TF.adjust_brightness(TF.adjust_gamma(img, gamma), factor)


class RandomHaze(_RandomDegradation):
    """Fog: ``I = J t + A (1 - t)``, ``t = exp(-beta * d)``, ``d`` in [d0, 1] a ramp."""

    def __init__(self, p: float = 0.2, beta: tuple[float, float] = (0.6, 2.0),
                 airlight: tuple[float, float] = (0.7, 1.0), base_depth: tuple[float, float] = (0.2, 0.6)):
        super().__init__(p)
        self.beta, self.airlight, self.base_depth = beta, airlight, base_depth

    def apply(self, img):
        t, back = _as_tensor(img)
        _, H, W = t.shape
        beta = _uniform(*self.beta)
        A = _uniform(*self.airlight)
        d0 = _uniform(*self.base_depth)
        angle = _uniform(0.0, 2 * math.pi)
        ys = torch.linspace(-1, 1, H)[:, None]
        xs = torch.linspace(-1, 1, W)[None, :]
        ramp = math.cos(angle) * xs + math.sin(angle) * ys
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min()).clamp(min=1e-6)
        depth = d0 + (1 - d0) * ramp
        trans = torch.exp(-beta * depth)[None]
        return back(t * trans + A * (1 - trans))


class RandomJpeg(_RandomDegradation):
    def __init__(self, p: float = 0.3, quality: tuple[int, int] = (10, 40)):
        super().__init__(p)
        self.quality = quality

    def apply(self, img):
        q = int(torch.randint(int(self.quality[0]), int(self.quality[1]) + 1, ()).item())
        if isinstance(img, Image.Image):
            pil, back = img, None
        else:
            t, back = _as_tensor(img)
            pil = TF.to_pil_image(t.clamp(0, 1))
        mode = pil.mode
        if mode not in ("L", "RGB"):
            pil = pil.convert("RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=q)
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        if back is None:
            return out.convert(mode) if out.mode != mode and mode in ("L", "RGB") else out
        return back(TF.to_tensor(out))


def degradation_transforms(p_blur: float = 0.3, p_noise: float = 0.3, p_low_light: float = 0.3,
                           p_haze: float = 0.2, p_jpeg: float = 0.3) -> transforms.Compose:
    """Haze, low light, blur, noise, JPEG, each with its own probability."""
    return transforms.Compose([
        RandomHaze(p_haze),
        RandomLowLight(p_low_light),
        RandomGaussianBlur(p_blur),
        RandomGaussianNoise(p_noise),
        RandomJpeg(p_jpeg),
    ])
