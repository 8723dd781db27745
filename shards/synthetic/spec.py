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


class SpecError(ValueError):
    """A bad :class:`SyntheticSpec` option; ``field`` names it, so that each front end
    can name its own spelling (``--identities``, ``data.synthetic.num_identities``)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


# The many-identities mode (base_faces > 0, shards/synthetic/many.py) needs at least two
# identities (one identity is no identification task) and draws only the visible image.
MANY_MODALITIES = ("vis",)


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
    # 0: every identity is a face of its own (the renderer of faces.py). > 0: the
    # many-identities mode: this many rendered base faces, each identity one of
    # them under its own cheap colour/offset/pattern transform (many.py).
    base_faces: int = 0
    # How co-twins differ (world.py): "subtle" (the default, generator version 2: sub-pixel
    # differences and a mirrored parting) or "marked" (a cheek mole, thicker brows, wider-set
    # eyes, 1-2 px at 64 px, none of them a mirror image: docs/differences.md).
    twin_style: str = "subtle"

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "splits", tuple((str(n), float(r)) for n, r in
                                                 (self.splits.items() if isinstance(self.splits, dict)
                                                  else self.splits)))
        self._check_counts()
        bad = set(self.modalities) - set(MODALITIES)
        if bad or not self.modalities:
            raise SpecError("modalities", f"must be a non-empty subset of {', '.join(MODALITIES)}; "
                                          f"got {self.modalities}")
        if {"thz", "thz_dense"} <= set(self.modalities):
            raise SpecError("modalities", "thz and thz_dense both write thz.png: choose one")
        if self.base_faces and self.modalities != MANY_MODALITIES:
            raise SpecError("modalities", f"the many-identities mode draws only "
                                          f"{', '.join(MANY_MODALITIES)}; got {', '.join(self.modalities)}")
        if self.twin_style not in ("subtle", "marked"):
            raise SpecError("twin_style", f"must be 'subtle' or 'marked', got {self.twin_style!r}")
        if self.base_faces and self.twin_style != "subtle":
            raise SpecError("twin_style", "the many-identities mode has its own co-twins (many.py): leave it 'subtle'")
        if self.split_by not in ("sample", "identity"):
            raise SpecError("split_by", f"must be 'sample' or 'identity', got {self.split_by!r}")
        if not self.splits or any(r < 0 for _, r in self.splits) or sum(r for _, r in self.splits) <= 0:
            raise SpecError("splits", f"bad split ratios {self.splits}")
        if len({n for n, _ in self.splits}) != len(self.splits):
            raise SpecError("splits", f"duplicate split names in {self.splits}")

    def _check_counts(self) -> None:
        if self.base_faces < 0:
            raise SpecError("base_faces", f"must be >= 0 (0: every identity its own face), got {self.base_faces}")
        if self.num_identities < (2 if self.base_faces else 1):
            raise SpecError("num_identities", f"must be >= 2 in the many-identities mode, got {self.num_identities}"
                            if self.base_faces else f"must be >= 1, got {self.num_identities}")
        if self.samples_per_identity < 1:
            raise SpecError("samples_per_identity", f"must be >= 1, got {self.samples_per_identity}")
        if not 0.0 <= self.twin_fraction <= 1.0:
            raise SpecError("twin_fraction", f"must be in [0, 1], got {self.twin_fraction}")
        if self.image_size < 16:
            raise SpecError("image_size", f"must be >= 16, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        d["splits"] = [[n, r] for n, r in self.splits]
        if not self.base_faces:  # absent when off: every older spec keeps its hash (its cache folder)
            del d["base_faces"]
        if self.twin_style == "subtle":  # likewise: the default keeps every older hash
            del d["twin_style"]
        return d


def spec_hash(spec: SyntheticSpec) -> str:
    text = json.dumps({"spec": spec.to_dict(), "generator": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
