"""The shard manifest: what a shard directory holds.

``DIR/manifest.json`` lists every shard of every split (file relative to
``DIR``, sample count, size, sha256), the identity names (list index = label),
twin pairs, the schema (class names) of every categorical label, the tar
extensions each sample carries and per-modality image statistics. The stream
reads sample counts from here (equal batches on every rank need the total
before reading), and recipes get a :class:`DataInfo` view.

Fields (``biomtl-shards/1``; readers ignore fields they do not know, missing
ones get their defaults, so older manifests still load):

* ``format``, ``tool_version``, ``created_with`` (source format, input path,
  the creation arguments, the command line);
* ``splits``: split name -> list of :class:`ShardEntry` (file relative to the
  directory, sample count, bytes, sha256);
* ``identities``: identity names, list index = the ``identity`` label stored in
  each sample's ``json``; ``twin_pairs``: ``[a, b]`` identity indices, ``a < b``;
* ``label_schemas``: label name -> class names (the sample's ``json`` stores
  the class index); ``modalities``: the tar extensions every sample carries;
* ``image_stats``: per image/array field: per-channel ``mean``/``std`` (pixels
  scaled to [0, 1]; computed on the first split) and, for images written by
  ``biomtl shards create``, ``width``/``height`` ``{min, max, mean}`` over all
  splits;
* ``pairs``: the dataset's own verification protocol, if it ships one (e.g.
  ``--pairs test_pairs.json`` of the ``folder`` format): a list of
  ``{"key1": sample key, "key2": sample key, "label": 1 same identity | 0,
  "split": the split holding both samples}``. ``biomtl shards create`` also
  writes the pairs of each split as ``DIR/<split>_pairs.json``
  (``[{"img1": key, "img2": key, "label": 0|1}, ...]``), the file the DCAL
  evaluator (``recipes.verification.pairs_from_file``) reads;
* ``split_stats``: per split ``{samples, identities, identity_ids, twin_pairs,
  bytes, labels: {label: {class name: count}}}`` (written by ``biomtl shards
  create``; ``biomtl shards info`` scans the shards when it is missing;
  ``identity_ids``, the split's identity labels, since issue 27: what says
  whether a split's identities were trained on).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .atomic import atomic_write
from .remote import RemoteMissing, RemoteRoot, dataset_root, is_remote, name_problem, read_bytes

MANIFEST_NAME = "manifest.json"
FORMAT = "biomtl-shards/1"
TOOL_VERSION = "0.1.0"


@dataclass(frozen=True)
class DataInfo:
    """What a recipe may know about the dataset, read from the manifest (and
    stored in every checkpoint, so a model can be rebuilt without the data)."""

    identities: tuple[str, ...]
    twin_pairs: tuple[tuple[int, int], ...]
    label_schemas: Mapping[str, tuple[str, ...]]
    modalities: tuple[str, ...]
    split_sizes: Mapping[str, int] = field(default_factory=dict)
    # the identity labels of the training split (None: not known, a manifest
    # written before they were recorded): a classifier scores only these
    trained_identities: tuple[int, ...] | None = None

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def co_twin(self, identity: int, stored: Any = None) -> int:
        """A sample's co-twin identity: ``stored`` (the ``twin`` of the sample's
        json) when the shards carry it, else from ``twin_pairs``; ``-1``: none."""
        return self._co_twins.get(identity, -1) if stored is None else int(stored)

    @functools.cached_property
    def _co_twins(self) -> dict[int, int]:
        # cached_property writes the instance dict directly, which a frozen dataclass allows
        pairs = {}
        for a, b in self.twin_pairs:
            pairs[int(a)], pairs[int(b)] = int(b), int(a)
        return pairs

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for weights_only checkpoints)."""
        return {"identities": list(self.identities), "twin_pairs": [list(p) for p in self.twin_pairs],
                "label_schemas": {k: list(v) for k, v in self.label_schemas.items()},
                "modalities": list(self.modalities), "split_sizes": dict(self.split_sizes),
                "trained_identities": None if self.trained_identities is None else list(self.trained_identities)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "DataInfo":
        return DataInfo(identities=tuple(d["identities"]), twin_pairs=tuple(tuple(p) for p in d["twin_pairs"]),
                        label_schemas={k: tuple(v) for k, v in d["label_schemas"].items()},
                        modalities=tuple(d["modalities"]), split_sizes=dict(d.get("split_sizes", {})),
                        trained_identities=_int_tuple(d.get("trained_identities")))


def _int_tuple(values: Any) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


def shard_file_problem(root: str | os.PathLike, file: str) -> str | None:
    """Why a shard ``file`` named by a manifest is not a file inside the
    dataset directory ``root`` (None when it is): an absolute name, a ``..``
    component, or a path that resolves outside ``root`` (a symlinked parent
    or shard). A manifest is untrusted input: nothing outside its dataset is
    ever opened for it."""
    if not file or "\0" in file:
        return "is not a file name"
    if file.startswith(("/", "\\")) or os.path.isabs(file):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", file):
        return "climbs out of the dataset directory with '..'"
    base = Path(root).resolve()
    if not (base / file).resolve().is_relative_to(base):
        return "resolves outside the dataset directory (a symlink)"
    return None


class UnsafeShardPath(ValueError):
    """A manifest names a shard file outside its dataset directory; one line."""


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard. ``file`` is relative to the dataset directory and stays
    inside it (:func:`shard_file_problem`, checked by :meth:`Manifest.load`
    and :meth:`Manifest.shard_path`)."""

    file: str
    count: int
    bytes: int
    sha256: str

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ShardEntry":
        return ShardEntry(file=str(d["file"]), count=int(d["count"]), bytes=int(d["bytes"]),
                          sha256=str(d["sha256"]))


@dataclass
class Manifest:
    format: str = FORMAT
    created_with: dict[str, Any] = field(default_factory=dict)
    tool_version: str = TOOL_VERSION
    splits: dict[str, list[ShardEntry]] = field(default_factory=dict)
    identities: list[str] = field(default_factory=list)
    twin_pairs: list[tuple[int, int]] = field(default_factory=list)
    label_schemas: dict[str, list[str]] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    image_stats: dict[str, Any] = field(default_factory=dict)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    split_stats: dict[str, Any] = field(default_factory=dict)

    # --- queries ------------------------------------------------------------
    def split_size(self, name: str) -> int:
        if name not in self.splits:
            raise KeyError(f"split {name!r} not in manifest (have: {', '.join(sorted(self.splits)) or 'none'})")
        return sum(e.count for e in self.splits[name])

    def shard_path(self, root: str | os.PathLike, entry: ShardEntry) -> Path | str:
        """``root / entry.file`` (for a remote root its URL, a ``str``); an
        :class:`UnsafeShardPath` when that is not inside ``root``."""
        remote = is_remote(root)
        problem = name_problem(entry.file) if remote else shard_file_problem(root, entry.file)
        if remote and problem is None:
            return dataset_root(root) / entry.file
        if remote:
            raise UnsafeShardPath(f"{dataset_root(root) / MANIFEST_NAME}: shard file {entry.file[:120]!r} "
                                  f"{problem}; shard files must be inside {root}")
        if problem is not None:
            shown = entry.file if len(entry.file) <= 120 else entry.file[:117] + "..."
            raise UnsafeShardPath(f"{Path(root) / MANIFEST_NAME}: shard file {shown!r} {problem}; "
                                  f"shard files must be inside {root}")
        return Path(root) / entry.file

    def check_shard_paths(self, root: str | os.PathLike) -> None:
        """Every shard file of every split is inside ``root`` (else :class:`UnsafeShardPath`)."""
        for entries in self.splits.values():
            for e in entries:
                self.shard_path(root, e)

    def split_pairs(self, name: str) -> list[dict[str, Any]]:
        """The protocol pairs whose two samples are both in split ``name``."""
        return [p for p in self.pairs if p.get("split") == name]

    def data_info(self, train_split: str | None = None) -> DataInfo:
        """The recipe's view; with ``train_split`` it also says which identities
        that split holds (when the manifest records them)."""
        stats = self.split_stats.get(train_split) if train_split else None
        ids = stats.get("identity_ids") if isinstance(stats, Mapping) else None
        return DataInfo(
            identities=tuple(self.identities),
            twin_pairs=tuple((int(a), int(b)) for a, b in self.twin_pairs),
            label_schemas={k: tuple(v) for k, v in self.label_schemas.items()},
            modalities=tuple(self.modalities),
            split_sizes={name: self.split_size(name) for name in self.splits},
            trained_identities=_int_tuple(ids),
        )

    # --- io -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["twin_pairs"] = [list(p) for p in self.twin_pairs]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Manifest":
        check_fields(d)
        return Manifest(
            format=str(d.get("format", "")),
            created_with=dict(d.get("created_with", {})),
            tool_version=str(d.get("tool_version", "")),
            splits={str(k): [ShardEntry.from_dict(e) for e in v] for k, v in d.get("splits", {}).items()},
            identities=[str(x) for x in d.get("identities", [])],
            twin_pairs=[(int(a), int(b)) for a, b in d.get("twin_pairs", [])],
            label_schemas={str(k): [str(x) for x in v] for k, v in d.get("label_schemas", {}).items()},
            modalities=[str(x) for x in d.get("modalities", [])],
            image_stats=dict(d.get("image_stats", {})),
            pairs=[{"key1": str(p["key1"]), "key2": str(p["key2"]), "label": int(p["label"]),
                    **({"split": str(p["split"])} if p.get("split") is not None else {})}
                   for p in d.get("pairs", [])],
            split_stats=dict(d.get("split_stats", {})),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/manifest.json`` atomically (:func:`shards.atomic.atomic_write`),
        synced to disk before the rename."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

        def write(tmp: Path) -> None:
            # open(): 0666 minus the umask, what the shards get (mkstemp's 0600 would
            # hide the manifest from the other users of a shared dataset)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

        return atomic_write(directory / MANIFEST_NAME, write)

    @staticmethod
    def load(directory: str | os.PathLike) -> "Manifest":
        """The manifest of a local shard directory or of a remote dataset
        (:mod:`shards.remote`: ``http(s)://``, ``s3://``, ``pipe:``)."""
        if is_remote(directory):
            return Manifest._load_remote(dataset_root(directory))
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"shard directory {directory} does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a shard directory: no {MANIFEST_NAME} in it")
        manifest = Manifest.parse(path.read_bytes(), path)
        manifest.check_shard_paths(directory)  # every reader loads the manifest here first
        return manifest

    @staticmethod
    def _load_remote(root: RemoteRoot) -> "Manifest":
        url = root / MANIFEST_NAME
        try:
            data = read_bytes(url)
        except RemoteMissing:
            raise FileNotFoundError(f"{root} is not a shard directory: no {MANIFEST_NAME} at {url}") from None
        manifest = Manifest.parse(data, url)
        manifest.check_shard_paths(root)
        return manifest

    @staticmethod
    def parse(data: bytes, path: str | os.PathLike) -> "Manifest":
        """A manifest from the bytes of ``path`` (named in errors)."""
        try:
            d = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or not str(d.get("format", "")).startswith("biomtl-shards/"):
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{path}: not a biomtl shard manifest (format={fmt!r}, expected {FORMAT!r})")
        try:
            return Manifest.from_dict(d)
        except ManifestFieldError as e:
            raise ValueError(f"{path}: malformed manifest: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {str(e)[:200]})") from None

    def verify(self, directory: str | os.PathLike, splits: list[str] | None = None) -> list[str]:
        """Check sizes and sha256 of the shards; returns a list of problems (empty = fine)."""
        directory = Path(directory)
        problems = []
        for name in splits or list(self.splits):
            for e in self.splits[name]:
                p = self.shard_path(directory, e)
                if not p.is_file():
                    problems.append(f"{e.file}: missing")
                    continue
                if p.stat().st_size != e.bytes:
                    problems.append(f"{e.file}: {p.stat().st_size} bytes, manifest says {e.bytes}")
                    continue
                if file_sha256(p) != e.sha256:
                    problems.append(f"{e.file}: sha256 mismatch")
        return problems


class ManifestFieldError(ValueError):
    """A manifest field of the wrong shape; the message names the field."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _expect(ok: bool, field: str, what: str, value: Any) -> None:
    if not ok:
        raise ManifestFieldError(f"'{field}' must be {what}, got {type(value).__name__}")


def check_fields(d: Mapping[str, Any]) -> None:
    """The shape of every field a reader uses (a manifest is untrusted input):
    a wrong one is a :class:`ManifestFieldError` naming it, instead of an
    ``AttributeError`` deep in whichever command reads it first. The value
    itself is not quoted (a manifest may be any JSON)."""
    mapping, listing = "a mapping", "a list"
    for name in ("splits", "label_schemas", "image_stats", "split_stats", "created_with"):
        _expect(isinstance(d.get(name, {}), Mapping), name, mapping, d.get(name))
    for name in ("identities", "twin_pairs", "modalities", "pairs"):
        _expect(isinstance(d.get(name, []), list), name, listing, d.get(name))
    for split, entries in d.get("splits", {}).items():
        _expect(isinstance(entries, list), f"splits.{split}", "a list of shard entries", entries)
        for i, e in enumerate(entries):
            _expect(isinstance(e, Mapping), f"splits.{split}[{i}]", "a mapping (file, count, bytes, sha256)", e)
            _expect(isinstance(e.get("count"), int) and not isinstance(e.get("count"), bool) and e["count"] >= 0,
                    f"splits.{split}[{i}].count", "an integer >= 0", e.get("count"))
    for i, pair in enumerate(d.get("twin_pairs", [])):
        _expect(isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) for x in pair),
                f"twin_pairs[{i}]", "two identity indices", pair)
    for label, names in d.get("label_schemas", {}).items():
        _expect(isinstance(names, list), f"label_schemas.{label}", "a list of class names", names)
    for key, st in d.get("image_stats", {}).items():
        _expect(isinstance(st, Mapping), f"image_stats.{key}", mapping, st)
        for stat in ("mean", "std"):
            v = st.get(stat, [])
            _expect(isinstance(v, list) and all(_is_number(x) for x in v), f"image_stats.{key}.{stat}",
                    "a list of numbers", v)
        for dim in ("width", "height"):
            v = st.get(dim, {})
            _expect(isinstance(v, Mapping) and all(_is_number(x) for x in v.values()), f"image_stats.{key}.{dim}",
                    "a mapping of numbers (min, max, mean)", v)
    for split, st in d.get("split_stats", {}).items():
        _expect(isinstance(st, Mapping), f"split_stats.{split}", mapping, st)
        labels = st.get("labels", {})
        _expect(isinstance(labels, Mapping) and all(isinstance(c, Mapping) for c in labels.values()),
                f"split_stats.{split}.labels", "a mapping of label -> {class: count}", labels)
        ids = st.get("identity_ids", [])
        _expect(isinstance(ids, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in ids),
                f"split_stats.{split}.identity_ids", "a list of identity indices", ids)
    for i, pair in enumerate(d.get("pairs", [])):
        _expect(isinstance(pair, Mapping) and pair.get("label") in (0, 1) and not isinstance(pair.get("label"), bool),
                f"pairs[{i}]", "a mapping with key1, key2 and label 0 or 1", pair)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
