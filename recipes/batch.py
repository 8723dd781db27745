"""Reading a collated batch, written once for every recipe: label columns with
``-1`` for missing, the mask of real (non-padding) rows, moving to a device."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch


def label_column(batch: Mapping[str, Any], key: str, n: int) -> np.ndarray:
    """``batch[key]`` as int64 ``[n]``; all ``-1`` (unlabelled) when absent."""
    v = batch.get(key)
    if v is None:
        return np.full(n, -1, dtype=np.int64)
    return torch.as_tensor(v).detach().cpu().numpy().astype(np.int64).reshape(-1)


def valid_mask(batch: Mapping[str, Any], n: int) -> np.ndarray:
    """Rows that are real samples: eval loaders pad the last batch of a rank and
    mark the padding ``_valid=False``."""
    v = batch.get("_valid")
    if v is None:
        return np.ones(n, dtype=bool)
    return torch.as_tensor(v).detach().cpu().numpy().astype(bool).reshape(-1)


def sample_keys(batch: Mapping[str, Any], n: int) -> list[str]:
    keys = batch.get("__key__")
    return [str(k) for k in keys] if keys is not None else [str(i) for i in range(n)]


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Tensors (also inside mappings and lists of tensors) to ``device``, floating
    ones also to ``dtype`` when given; everything else as is. The trainer's
    strategies and the recipes' own evaluation loops both move batches with it."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch
