"""``data.val_bins``: insightface ``.bin`` sets scored at every validation
(``<name>_acc``, ``<name>_acc_std``, ``<name>_eer``; protocol:
:mod:`recipes.bin_verification`).

The images are split over the ranks in equal slices (the last padded with
repeats), so every rank runs the same number of forwards (DeepSpeed ZeRO-3
gathers parameters collectively), then every rank gathers all embeddings and
computes the same metrics.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dist_train import distributed
from dist_train.config import ConfigError

log = logging.getLogger("biomtl")


def check_val_bins(paths: Sequence[str]) -> None:
    """Every ``data.val_bins`` file reads (restricted unpickler), has the bin
    shape and decodable images; names are distinct. One ``ConfigError`` line else."""
    from shards.images import open_image
    from shards.verification_bins import BinFormatError, bin_name, read_bin

    seen: dict[str, str] = {}
    for path in paths:
        name = bin_name(path)
        if name in seen:
            raise ConfigError(f"data.val_bins: {seen[name]} and {path} have the same name {name!r} (their metrics "
                              "would collide); rename one")
        seen[name] = path
        try:
            vbin = read_bin(path)
            for i, data in enumerate(vbin.images):
                open_image(data, f"image {i}").close()
        except BinFormatError as exc:
            raise ConfigError(f"data.val_bins: {exc}") from None
        except (OSError, ValueError) as exc:  # Pillow's decoding errors, UnsupportedImage
            raise ConfigError(f"data.val_bins: {path}: {(str(exc).splitlines() or [''])[0][:200]}") from None


class BinScorer:
    """The ``.bin`` sets of a run, scored with the bare model's ``embed``."""

    def __init__(self, paths: Sequence[str], transform: Any, batch_size: int, precision: Any, device: torch.device):
        from shards.verification_bins import read_bin

        self.bins = [read_bin(p) for p in paths]
        self.transform, self.batch_size = transform, batch_size
        self.precision, self.device = precision, device
        self.warned = False

    def score(self, module: torch.nn.Module) -> dict[str, float]:
        from recipes.bin_verification import TRAINING_KEYS, bin_embeddings, bin_metrics, decode_image

        if not hasattr(module, "embed"):
            if not self.warned:
                self.warned = True
                log.warning("data.val_bins: this recipe's model has no embed(); the .bin sets are not scored")
            return {}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        out: dict[str, float] = {}
        for vbin in self.bins:
            mine, padded = rank_slice(len(vbin.images), rank, world)
            images = [decode_image(vbin.images[i], self.transform, f"{vbin.path}:{i}") for i in padded]

            def embed(x: torch.Tensor) -> torch.Tensor:
                with self.precision.autocast():
                    return module.embed(x.to(self.device)).float()

            emb = bin_embeddings(embed, images, self.batch_size)[: len(mine)]
            parts = [p for p in distributed.all_gather_objects(emb) if len(p)]  # rank order = image order
            metrics = bin_metrics(np.concatenate(parts), vbin)
            out.update({f"{vbin.name}_{k}": float(metrics[k]) for k in TRAINING_KEYS})
        return out


def rank_slice(n: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(this rank's image indices, the same padded with image 0 to ``ceil(n / world)``):
    contiguous slices in rank order, so the gathered embeddings are in image order."""
    per = math.ceil(n / world)
    mine = list(range(min(n, rank * per), min(n, (rank + 1) * per)))
    return mine, mine + [0] * (per - len(mine))


def bin_scorer(cfg: Any, transform: Any, precision: Any, device: torch.device) -> BinScorer | None:
    if not cfg.data.val_bins:
        return None
    return BinScorer([str(Path(p)) for p in cfg.data.val_bins], transform, cfg.data.batch_size, precision, device)
