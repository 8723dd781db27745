"""Shards: WebDataset tar shards with a manifest, the synthetic biometric
dataset, and the streaming train/eval loaders (see docs/architecture.md).

Modules: ``manifest`` (manifest.json), ``writer`` (rolling tar shards),
``synthetic`` (the built-in dataset), ``stream`` (train/eval streams, equal
batches per rank, exact resume, optional resampling), ``batching``
(twin-aware P×K and triplet batches by random access), ``sources`` (one
reader per raw dataset format), ``build`` (``biomtl shards create``),
``check`` (``info``/``verify``), ``cli`` (the ``biomtl shards`` command)."""
from .manifest import DataInfo, Manifest, ShardEntry

__all__ = ["DataInfo", "Manifest", "ShardEntry"]
