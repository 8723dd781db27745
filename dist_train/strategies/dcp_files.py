"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) read as untrusted input.

An FSDP2 checkpoint is a DCP directory: ``.metadata`` (a pickle of DCP's
index), one ``__<rank>_<n>.distcp`` file per writing rank, and the
trainer's own ``trainer.pt`` (scheduler, scaler, loop state; the layout is
:mod:`recipes.model_file`'s). DCP reads its index with ``pickle.load`` and
its non-tensor entries (the optimizer's param groups) with
``torch.load(weights_only=False)``: a crafted directory would run code. So
the index is read here with an unpickler that knows only DCP's metadata
classes (:class:`CheckedReader`), and every load runs with torch's
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch on (:func:`weights_only_loads`),
which makes DCP's ``weights_only=False`` loads weights-only.

Resharding is DCP's: the index holds each tensor's global shape and the
chunks every rank wrote, so a load into a model sharded over another number
of ranks (or into plain full tensors, :func:`full_model_state`) reads the
pieces it needs.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dist_train.config import ConfigError
from recipes.model_file import dcp_model_prefix

METADATA = ".metadata"  # DCP's index file (torch.distributed.checkpoint.filesystem._metadata_fn)
_FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_MAX_METADATA_BYTES = 256 << 20

# What DCP's index pickles: its own dataclasses, torch.Size / dtypes / the
# layout lookup, and the checkpoint id as a path. Constructing these runs no
# code chosen by the file.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class DCPLoadError(ConfigError):
    """A DCP directory that does not read as data; one line naming the file."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it pickles {module}.{name}")


def is_dcp_dir(path: str | os.PathLike) -> bool:
    """A directory with DCP's index (an FSDP checkpoint), as opposed to a DeepSpeed folder."""
    return Path(path).is_dir() and (Path(path) / METADATA).exists()


def read_index(ckpt_dir: str | os.PathLike) -> Metadata:
    """DCP's index of ``ckpt_dir``, unpickled with DCP's own classes only."""
    path = Path(ckpt_dir) / METADATA
    if not path.is_file():  # (a FIFO would block the read)
        raise DCPLoadError(f"{ckpt_dir}: not an FSDP (DCP) checkpoint directory (no regular {METADATA} file)")
    try:
        if path.stat().st_size > _MAX_METADATA_BYTES:
            raise DCPLoadError(f"{path}: implausibly large ({path.stat().st_size} bytes)")
        with path.open("rb") as fh:
            index = _IndexUnpickler(fh).load()
    except DCPLoadError:
        raise
    except OSError as exc:
        raise DCPLoadError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file is one line
        why = str(exc) if isinstance(exc, pickle.UnpicklingError) and str(exc).startswith("it pickles") \
            else "truncated or corrupt"
        raise DCPLoadError(f"{path}: refused ({why}); only DCP's index classes are loaded") from None
    if not isinstance(index, Metadata) or not isinstance(index.state_dict_metadata, dict):
        raise DCPLoadError(f"{path}: not a DCP index")
    return index


class CheckedReader(FileSystemReader):
    """DCP's file reader with the index read by :func:`read_index`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank index files: not what biomtl writes
            raise DCPLoadError(f"{self.path}: per-rank DCP index files are not read")
        index = read_index(self.path)
        if getattr(index, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            index.storage_meta = StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block is weights-only, DCP's
    ``weights_only=False`` ones included (torch's documented switch, read on each call)."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY_ENV)
    os.environ[_FORCE_WEIGHTS_ONLY_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY_ENV, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY_ENV] = previous


def model_shapes(ckpt_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model's tensors (what a resume check compares)."""
    prefix = dcp_model_prefix()
    return {key[len(prefix):]: tuple(meta.size) for key, meta in read_index(ckpt_dir).state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def full_model_state(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model state dict of a DCP checkpoint in plain CPU tensors,
    without a process group (``biomtl export``): every rank's chunks read back
    into full tensors."""
    prefix = dcp_model_prefix()
    return {key[len(prefix):]: value for key, value in full_tensors(ckpt_dir, prefix).items()}


def full_tensors(ckpt_dir: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint whose dotted key starts with ``prefix``,
    whole, in plain CPU tensors (no process group needed)."""
    import torch.distributed.checkpoint as dcp

    index = read_index(ckpt_dir)
    target = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
              for key, meta in index.state_dict_metadata.items()
              if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not target:
        raise DCPLoadError(f"{ckpt_dir}: the DCP checkpoint holds no tensors under '{prefix}'")
    try:
        with weights_only_loads(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            # flat keys as stored (DCP flattened the nested dicts to dotted keys on save)
            dcp.load(target, storage_reader=CheckedReader(ckpt_dir), no_dist=True,
                     planner=dcp.DefaultLoadPlanner(flatten_state_dict=False))
    except DCPLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing/cut-off chunk files: one line
        cause = (str(exc).splitlines() or [""])[0][:200]
        raise DCPLoadError(f"{ckpt_dir}: the DCP checkpoint's tensors do not load ({type(exc).__name__}: "
                           f"{cause})") from None
    return target


__all__ = ["CheckedReader", "DCPLoadError", "METADATA", "full_model_state", "full_tensors", "is_dcp_dir", "model_shapes",
           "read_index", "weights_only_loads"]
