"""The synthetic dataset's options (:class:`SyntheticSpec`), its label schemas and
modalities, and the hash that names a dataset built from them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

GENERATOR_VERSION = 2  # bump when the drawing changes: it is part of the dataset hash

LABEL_SCHEMAS: dict[str, list[str]] = {
    "gender": ["female", "male"],
    "emotion": ["neutral", "happy", "sad", "angry", "surprised"],
    "facial_hair": ["none", "moustache", "beard"],
    "spectacles": ["none", "glasses"],
    "posture": ["front", "left", "right", "up", "down"],
    "concealed": ["unconcealed", "concealed"],
}

# vis: visible image (concealed when the sample is); vis_target: the same capture unconcealed;
# thz: THz image through thin fabric (concealment barely visible) + thz_target (unconcealed);
# thz_dense: THz through dense fabric, written as thz.png + thz_target.png (so it replaces thz);
# maps: photometric-stereo albedo / normal / depth.
# ear: an ear photo (ear.png, ear inside a larger image) + json ear_bbox (render_ear).
MODALITIES = ("vis", "vis_target", "thz", "thz_dense", "maps", "ear")


@dataclass(frozen=True)
class SyntheticSpec:
    num_identities: int = 40
    samples_per_identity: int = 20
    twin_fraction: float = 0.25  # fraction of identities that are in twin pairs
    image_size: int = 64
    modalities: tuple[str, ...] = ("vis", "thz", "maps")
    splits: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.15), ("test", 0.15))
    split_by: str = "sample"  # "sample": closed set; "identity": identity-disjoint splits
    seed: int = 0
    maxcount: int = 200  # samples per shard

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "splits", tuple((str(n), float(r)) for n, r in
                                                 (self.splits.items() if isinstance(self.splits, dict)
                                                  else self.splits)))
        bad = set(self.modalities) - set(MODALITIES)
        if bad or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {', '.join(MODALITIES)}; "
                             f"got {self.modalities}")
        if {"thz", "thz_dense"} <= set(self.modalities):
            raise ValueError("modalities thz and thz_dense both write thz.png: choose one")
        if self.split_by not in ("sample", "identity"):
            raise ValueError(f"split_by must be 'sample' or 'identity', got {self.split_by!r}")
        if self.num_identities < 1 or self.samples_per_identity < 1:
            raise ValueError("num_identities and samples_per_identity must be >= 1")
        if not 0.0 <= self.twin_fraction <= 1.0:
            raise ValueError(f"twin_fraction must be in [0, 1], got {self.twin_fraction}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not self.splits or any(r < 0 for _, r in self.splits) or sum(r for _, r in self.splits) <= 0:
            raise ValueError(f"bad split ratios {self.splits}")
        if len({n for n, _ in self.splits}) != len(self.splits):
            raise ValueError(f"duplicate split names in {self.splits}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        d["splits"] = [[n, r] for n, r in self.splits]
        return d


def spec_hash(spec: SyntheticSpec) -> str:
    text = json.dumps({"spec": spec.to_dict(), "generator": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
