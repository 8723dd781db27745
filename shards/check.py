"""Summaries and full verification of a shard directory (``biomtl shards info|verify``)."""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .manifest import Manifest, ShardEntry, file_sha256
from .remote import RemoteMissing, dataset_root, is_remote, stream_sha256


@dataclass
class Problem:
    split: str
    shard: str
    key: str | None  # None: the shard as a whole
    what: str

    def __str__(self) -> str:
        return f"{self.shard}" + (f" key {self.key}" if self.key else "") + f": {self.what}"


@dataclass
class VerifyResult:
    samples: int = 0
    shards: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _scan_labels(directory, m: Manifest, split: str) -> dict[str, Any]:
    """split_stats for a manifest that has none (reads the json member of every sample)."""
    from .reading import Shard, ShardReader

    ids, labels, n = set(), {k: collections.Counter() for k in m.label_schemas}, 0
    for e in m.splits[split]:
        for raw in ShardReader(Shard(str(m.shard_path(directory, e)), e.file, e.count), frozenset({"json"})):
            n += 1
            try:
                meta = json.loads(raw.get("json", b"{}"))
            except ValueError:
                continue
            if isinstance(meta.get("identity"), int):
                ids.add(meta["identity"])
            for k in labels:
                if isinstance(meta.get(k), int):
                    labels[k][meta[k]] += 1
    return {"samples": n, "identities": len(ids),
            "twin_pairs": sum(1 for a, b in m.twin_pairs if a in ids and b in ids),
            "bytes": sum(e.bytes for e in m.splits[split]), "shards": len(m.splits[split]),
            "labels": {k: {m.label_schemas[k][i]: c[i] for i in range(len(m.label_schemas[k])) if c[i]}
                       for k, c in labels.items()}}


def summary(directory: str | Path) -> dict[str, Any]:
    """What ``biomtl shards info`` shows, as plain data."""
    directory = dataset_root(directory)
    m = Manifest.load(directory)
    per = {}
    order = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
    for split in sorted(m.splits, key=lambda n: (order.get(n, 3), n)):
        st = m.split_stats.get(split)
        if not st:
            st = _scan_labels(directory, m, split)
        per[split] = st
    return {"directory": str(directory), "format": m.format, "tool_version": m.tool_version,
            "source": m.created_with.get("source"), "created": m.created_with.get("created"),
            "identities": len(m.identities), "twin_pairs": len(m.twin_pairs), "modalities": m.modalities,
            "label_schemas": m.label_schemas, "image_stats": m.image_stats, "pairs": len(m.pairs),
            "splits": per}


def verify(directory: str | Path, splits: list[str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """sha256 and size of every shard, then read and decode every sample: key
    valid, fields = the manifest's modalities, images/arrays/json decode, label
    indices within their schemas, boxes inside their image, sample count as in
    the manifest, no duplicate keys; protocol pairs name existing samples."""
    from .reading import Shard, ShardReader, decode_sample

    directory = dataset_root(directory)
    m = Manifest.load(directory)
    res = VerifyResult()
    names = splits or list(m.splits)
    for s in names:
        if s not in m.splits:
            raise KeyError(f"split {s!r} not in {directory}/manifest.json (have: {', '.join(m.splits)})")
    total = sum(e.count for s in names for e in m.splits[s])
    done = 0
    expect = set(m.modalities)
    n_ids = len(m.identities)
    keys_by_split: dict[str, set[str]] = {}
    for split in names:
        seen: set[str] = set()
        keys_by_split[split] = seen
        for e in m.splits[split]:
            res.shards += 1
            p = m.shard_path(directory, e)
            problem, readable = _file_problem(p, e)
            if problem:
                res.problems.append(Problem(split, e.file, None, problem))
            if not readable:
                done += e.count
                continue
            reader = ShardReader(Shard(str(p), e.file, e.count), None, None)
            n = 0
            for raw in reader:
                n += 1
                done += 1
                key = raw.get("__key__", "?")
                res.samples += 1
                if progress is not None and done % 64 == 0:
                    progress(done, total)
                for what in _check_sample(raw, expect, m, n_ids, seen, decode_sample):
                    res.problems.append(Problem(split, e.file, key, what))
                seen.add(key)
            if reader.error:
                res.problems.append(Problem(split, e.file, None, f"unreadable after {n} samples: {reader.error}"))
            if n != e.count:
                res.problems.append(Problem(split, e.file, None, f"{n} samples, manifest says {e.count}"))
                done += max(0, e.count - n)
    for i, pr in enumerate(m.pairs):
        sp = pr.get("split")
        if sp in keys_by_split and not {pr["key1"], pr["key2"]} <= keys_by_split[sp]:
            res.problems.append(Problem(sp, "manifest.json", None, f"pair {i} names a key not in split {sp}"))
    if progress is not None:
        progress(total, total)
    return res


def _file_problem(p: Path | str, e: ShardEntry) -> tuple[str | None, bool]:
    """(what is wrong with the shard file as a whole or None, whether it can be read)."""
    if is_remote(p):
        try:
            size, sha = stream_sha256(p)
        except RemoteMissing:
            return "missing", False
        except OSError as err:
            return f"unreadable: {err}", False
    else:
        if not Path(p).is_file():
            return "missing", False
        size, sha = Path(p).stat().st_size, None
    if size != e.bytes:
        return f"{size} bytes, manifest says {e.bytes}", True
    if (sha or file_sha256(p)) != e.sha256:
        return "sha256 mismatch", True
    return None, True


def _check_sample(raw, expect, m: Manifest, n_ids: int, seen: set[str], decode_sample) -> list[str]:
    out = []
    key = raw.get("__key__", "")
    if not key or "." in key or key.startswith("_") or "/" in key:
        out.append(f"bad key {key!r}")
    if key in seen:
        out.append("duplicate key in the split")
    have = {k for k in raw if not k.startswith("__")}
    if expect and have != expect:
        miss, extra = sorted(expect - have), sorted(have - expect)
        out.append("fields differ from the manifest's modalities:" + (f" missing {miss}" if miss else "")
                   + (f" extra {extra}" if extra else ""))
    try:
        s = decode_sample({k: v for k, v in raw.items() if k != "__url__" and k != "__local_path__"})
    except Exception as e:
        return out + [f"decode failed: {type(e).__name__}: {e}"[:300]]
    meta = s.get("json")
    if isinstance(meta, dict):
        ident = meta.get("identity")
        if ident is not None and n_ids and not (isinstance(ident, int) and 0 <= ident < n_ids):
            out.append(f"identity {ident!r} outside 0..{n_ids - 1}")
        for k, names in m.label_schemas.items():
            v = meta.get(k)
            if v is not None and not (isinstance(v, int) and 0 <= v < len(names)):
                out.append(f"label {k}={v!r} outside its schema ({len(names)} classes)")
        box = meta.get("bbox")
        if box is not None:
            img = next((v for k, v in s.items() if k.startswith("image.")), None)
            if img is not None:
                w, h = img.size
                x1, y1, x2, y2 = box
                if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                    out.append(f"bbox {box} outside the {w}x{h} image")
    elif "json" in have:
        out.append("json is not an object")
    return out
