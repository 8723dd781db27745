"""PLACEHOLDER (being written)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def split_images(data_dir: Path, split: str, size: int) -> dict[str, Any]:
    """Every image of a shard split as raw pixels in [0, 1] at ``size`` x ``size``
    (grey scans stay one channel, colour images keep three), with identities and
    co-twin ids as the recipes see them."""
    import torch
    from torchvision.transforms import functional as TF

    from shards.manifest import Manifest
    from shards.stream import build_eval_loader
    from recipes.image_input import IMAGE_KEYS

    co_twin: dict[int, int] = {}
    for a, b in Manifest.load(data_dir).data_info().twin_pairs:
        co_twin[int(a)], co_twin[int(b)] = int(b), int(a)

    def transform(sample: dict[str, Any], train: bool) -> dict[str, Any]:
        img = next(sample[k] for k in IMAGE_KEYS if k in sample)
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        meta = sample.get("json") or {}
        ident = int(meta.get("identity", -1))
        twin = meta.get("twin")
        twin = co_twin.get(ident, -1) if twin is None else int(twin)
        return {"image": TF.to_tensor(TF.resize(img, [size, size], antialias=True)),
                "identity": torch.tensor(ident), "twin": torch.tensor(twin)}

    from recipes import verification as ev

    loader = build_eval_loader(data_dir, split, transform, 64, 0, 1, 0)
    return ev.embed_batches(lambda x: x.flatten(1), loader)
