"""Shards: WebDataset tar shards with a manifest, the synthetic biometric
dataset, and the streaming train/eval loaders (see docs/architecture.md)."""
from .manifest import Manifest, ShardEntry

__all__ = ["Manifest", "ShardEntry"]
