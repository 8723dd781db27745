"""THz image augmentations for concealed -> unconcealed training.

:class:`ThzAugment` takes a group of aligned images (float tensors ``[C, H, W]``
in [0, 1]: the THz input, its unconcealed target, the visible images) and

1. applies *one* random geometry to all of them (rotation, scaling, a random
   crop resized back), so input and target stay pixel-aligned;
2. corrupts only the images named as inputs, the way THz scanners degrade:
   stripe masking (a few thin rows or columns set to the image mean, like
   dead scan lines), speckle (multiplicative Gaussian noise), band drop (a
   wide horizontal or vertical band attenuated, like a lost frequency band)
   and cutout (a square filled with the mean).

Values stay in [0, 1]. No horizontal flip: it would swap the left/right
posture labels. All draws use the *global torch RNG*, which the data stream
seeds per sample, so augmentation is reproducible and resumable.

Profiles (:data:`PROFILES`): ``gentle`` (default), ``medium``, ``strong``;
``none`` disables everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

__all__ = ["ThzAugProfile", "PROFILES", "ThzAugment"]


@dataclass(frozen=True)
class ThzAugProfile:
    rotate_deg: float = 0.0          # uniform in [-r, r]
    scale: tuple[float, float] = (1.0, 1.0)
    crop_min: float = 1.0            # random crop of area fraction in [crop_min, 1], resized back
    p_stripes: float = 0.0
    max_stripes: int = 0
    p_speckle: float = 0.0
    speckle_std: float = 0.0
    p_band: float = 0.0
    band_frac: float = 0.0           # band width as a fraction of the side
    band_keep: float = 1.0           # what remains of the band's signal
    p_cutout: float = 0.0
    cutout_frac: float = 0.0         # square side as a fraction of the image side


PROFILES: dict[str, ThzAugProfile] = {
    "none": ThzAugProfile(),
    "gentle": ThzAugProfile(rotate_deg=5, scale=(0.95, 1.05), crop_min=0.9, p_stripes=0.2, max_stripes=2,
                            p_speckle=0.3, speckle_std=0.05, p_band=0.1, band_frac=0.1, band_keep=0.5,
                            p_cutout=0.1, cutout_frac=0.12),
    "medium": ThzAugProfile(rotate_deg=10, scale=(0.9, 1.1), crop_min=0.8, p_stripes=0.4, max_stripes=3,
                            p_speckle=0.5, speckle_std=0.1, p_band=0.3, band_frac=0.15, band_keep=0.35,
                            p_cutout=0.3, cutout_frac=0.18),
    "strong": ThzAugProfile(rotate_deg=15, scale=(0.85, 1.15), crop_min=0.7, p_stripes=0.6, max_stripes=5,
                            p_speckle=0.7, speckle_std=0.15, p_band=0.5, band_frac=0.2, band_keep=0.2,
                            p_cutout=0.5, cutout_frac=0.25),
}


def _u(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()).item())


def _coin(p: float) -> bool:
    return p > 0 and torch.rand(()).item() < p


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, ()).item())


class ThzAugment:
    def __init__(self, profile: str | ThzAugProfile = "gentle"):
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"THz augmentation profile must be one of {sorted(PROFILES)}, got {profile!r}")
            profile = PROFILES[profile]
        self.p = profile

    # --- geometry (shared) ---------------------------------------------------
    def _geometry(self, h: int, w: int) -> dict[str, float] | None:
        p = self.p
        if p.rotate_deg == 0 and p.scale == (1.0, 1.0) and p.crop_min >= 1.0:
            return None
        g = {"angle": _u(-p.rotate_deg, p.rotate_deg), "scale": _u(*p.scale)}
        area = _u(p.crop_min, 1.0)
        ch, cw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
        g.update(top=_randint(0, h - ch), left=_randint(0, w - cw), ch=ch, cw=cw)
        return g

    @staticmethod
    def _apply_geometry(img: torch.Tensor, g: dict[str, float]) -> torch.Tensor:
        h, w = img.shape[-2:]
        out = TF.affine(img, angle=g["angle"], translate=[0, 0], scale=g["scale"], shear=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR, fill=0.0)
        out = TF.resized_crop(out, int(g["top"]), int(g["left"]), int(g["ch"]), int(g["cw"]), [h, w],
                              interpolation=InterpolationMode.BILINEAR, antialias=True)
        return out.clamp(0.0, 1.0)

    # --- corruption (inputs only) ---------------------------------------------------
    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = x.clone()
        h, w = x.shape[-2:]
        mean = x.mean()
        if _coin(p.p_stripes) and p.max_stripes > 0:
            for _ in range(_randint(1, p.max_stripes)):
                width = _randint(1, max(1, h // 32))
                if _coin(0.5):
                    r = _randint(0, h - width)
                    x[..., r:r + width, :] = mean
                else:
                    c = _randint(0, w - width)
                    x[..., :, c:c + width] = mean
        if _coin(p.p_speckle):
            x = x * (1.0 + p.speckle_std * torch.randn_like(x))
        if _coin(p.p_band) and p.band_frac > 0:
            horizontal = _coin(0.5)
            side = h if horizontal else w
            bw = max(1, round(side * p.band_frac))
            s = _randint(0, side - bw)
            if horizontal:
                x[..., s:s + bw, :] = mean + p.band_keep * (x[..., s:s + bw, :] - mean)
            else:
                x[..., :, s:s + bw] = mean + p.band_keep * (x[..., :, s:s + bw] - mean)
        if _coin(p.p_cutout) and p.cutout_frac > 0:
            k = max(1, round(min(h, w) * p.cutout_frac))
            r, c = _randint(0, h - k), _randint(0, w - k)
            x[..., r:r + k, c:c + k] = mean
        return x.clamp(0.0, 1.0)

    def __call__(self, images: Mapping[str, torch.Tensor], inputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Same geometry for every image of ``images`` (all the same H x W), then
        corruption of the ones named in ``inputs``."""
        if not images:
            return {}
        sizes = {tuple(v.shape[-2:]) for v in images.values()}
        if len(sizes) != 1:
            raise ValueError(f"THz augmentation needs aligned images of one size, got {sorted(sizes)}")
        h, w = sizes.pop()
        g = self._geometry(h, w)
        out = {k: (self._apply_geometry(v, g) if g is not None else v) for k, v in images.items()}
        for k in inputs:
            if k in out:
                out[k] = self._corrupt(out[k])
        return out
