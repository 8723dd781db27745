"""Which validation rows the recipe's pictures show, when it asks for a random draw
(:meth:`recipes.base.Recipe.validation_picture_rows`): ``k`` rows drawn uniformly
from the valid rows this rank (rank 0) validates, a new draw at every epoch.

The draw is a reservoir sample (Vitter's algorithm R) over the rows in loader
order, so the validation set is never held in memory and its size need not be
known in advance; only the ``k`` kept rows are copied (to the CPU). Its random
numbers come from a local :class:`torch.Generator` seeded from ``(seed, epoch)``:
the same epoch of the same run (a resumed one included) draws the same rows, and
the global RNGs, which the other ranks and the training steps share, are never
touched, so drawing on rank 0 alone desynchronises nothing.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch


def draw_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator of its own for ``(seed, epoch)`` (NumPy's SeedSequence mixes the
    two, so nearby seeds and epochs give unrelated streams)."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))


def _rows(mapping: Mapping[str, Any], n: int, index: int) -> dict[str, torch.Tensor]:
    """Row ``index`` of every top-level tensor with ``n`` rows, on the CPU (``[1, ...]``)."""
    return {k: v[index:index + 1].detach().cpu() for k, v in mapping.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n}


class PictureDraw:
    """Offer it every validation batch with its outputs (:meth:`offer`); :meth:`result`
    gives ``(outputs, batch)`` of the drawn rows, in loader order."""

    def __init__(self, rows: int, seed: int, epoch: int):
        self.k = int(rows)
        self.generator = draw_generator(seed, epoch)
        self.seen = 0                                         # valid rows offered so far
        self.kept: list[tuple[int, dict, dict]] = []          # (position, output rows, batch rows)

    def offer(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        n = int(batch["_valid"].shape[0]) if "_valid" in batch else next(
            v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1)
        valid = batch["_valid"].bool().cpu().tolist() if "_valid" in batch else [True] * n
        rows = [i for i in range(n) if valid[i]]
        # one uniform per row past the k-th: slot = floor(u * (position + 1)), kept when < k
        u = torch.rand(len(rows), generator=self.generator, dtype=torch.float64)
        for r, i in enumerate(rows):
            t = self.seen + r
            if t < self.k:
                slot = t
            else:
                slot = int(u[r].item() * (t + 1))
                if slot >= self.k:
                    continue
            entry = (t, _rows(outputs, n, i), _rows(batch, n, i))
            if slot < len(self.kept):
                self.kept[slot] = entry
            else:
                self.kept.append(entry)
        self.seen += len(rows)

    def positions(self) -> list[int]:
        """The drawn rows' positions among the valid rows offered, in loader order."""
        return sorted(t for t, _, _ in self.kept)

    def result(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """``(outputs, batch)`` of the drawn rows in loader order; None when no row was offered."""
        if not self.kept:
            return None
        kept = sorted(self.kept, key=lambda e: e[0])
        outputs = {k: torch.cat([e[1][k] for e in kept]) for k in kept[0][1]}
        batch = {k: torch.cat([e[2][k] for e in kept]) for k in kept[0][2]}
        return outputs, batch
