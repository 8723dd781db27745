"""Twin-aware hard-negative batching: P×K batches and (anchor, positive, negative) triplets.

Both loaders are *index based*: once per loader (cached per process) the
split's tar files are indexed (:func:`shards.reading.tar_members`) — every sample key, its
shard and the byte offset and size of each member (tar members sit at fixed
offsets) — and each sample's identity is read from its ``json``. A batch is
then a pure function of ``(seed, epoch, rank, batch index)`` (not of the
worker count): its sample indices are drawn by an RNG seeded from those, the
samples are read by ``seek`` + ``read`` into the tar, decoded
(:func:`shards.reading.decode_sample`) and transformed by the recipe with the
global RNGs seeded from ``(seed, epoch, rank, batch, row, role)``. So:

* every rank yields exactly ``len(loader)`` batches (``max(1, split samples //
  (world_size * rows per batch))``, from the manifest), whatever the shards;
* ``skip_batches=k`` yields exactly batches ``k..`` of the uninterrupted
  epoch without reading the skipped ones (exact resume, any worker count);
* DataLoader workers own batches ``j`` with ``(j - skip) % W == worker``, so
  batches arrive in order.

Batches are drawn independently (with replacement across batches): an epoch
is ``len(loader)`` batches, not a partition of the split (the triplet
anchors, however, are a per-epoch permutation of the split shared by all
ranks, so every sample is an anchor once per epoch when the epoch is long
enough).

P×K (:func:`build_pk_loader`). A batch holds ``P`` distinct identities × ``K``
samples, rows identity-major (rows ``i*K .. i*K+K-1`` are identity ``i``), ``K``
samples without replacement (with replacement when an identity has fewer).
Every identity is in a batch with probability ``P / N`` (``N`` identities in
the split), twins and singletons alike, and for every twin pair with a
member in a batch the co-twin is there too with probability ``twin_prob``
— the hardest in-batch negative. How: a twin pair whose two members are in
the split is a *twin unit*; a present twin unit holds both twins with
probability ``twin_prob``, else one of them (at random), so it fills
``1 + twin_prob`` slots on average, and uniform identities need ``E[U] = 2 P T
/ (N (1 + twin_prob))`` of the ``T`` twin units per batch. ``U`` is that
expectation rounded up or down at random (probability = its fractional
part), the ``U`` units are drawn uniformly, the rest of the batch is
singletons drawn uniformly. Only when that does not fit exactly — more twin
slots than ``P`` (the last unit is dropped), or too few singletons for the
rest (P close to ``N``: more twin units join, one alone if one slot is left,
then left-out co-twins) — does the batch deviate, so at ``twin_prob=1`` a lone
twin appears only in the last slot of a batch that has no singleton left to
fill it. The batch adds ``pk_identity``
(LongTensor, the manifest identity index of each row) to what the
transform returns.

Triplets (:func:`build_triplet_loader`, for DCAL and THz). A batch holds
``batch_size`` rows; row ``t`` is (anchor, positive, negative): the anchor is
the next sample of the epoch permutation, the positive another sample of the
anchor's identity (the anchor itself if it has no other), the negative a
sample of the anchor's co-twin with probability ``twin_prob`` when the
co-twin is in the split, else of a uniformly drawn other identity (never the
co-twin, so the twin-negative rate is exactly ``twin_prob`` for twins).
Layout: the transform's outputs of the three samples side by side, the
positive's and negative's keys prefixed ``pos_`` and ``neg_`` (e.g. a
transform returning ``{"image", "identity"}`` gives ``image``, ``identity``,
``pos_image``, ``pos_identity``, ``neg_image``, ``neg_identity``), plus
``neg_is_co_twin`` (bool tensor: the negative is the anchor's co-twin; named apart
from ``neg_twin``, the negative's own field when the transform returns ``twin``) and the
sample keys ``__key__``, ``__pos_key__``, ``__neg_key__`` (lists of str). A
sample whose transform returns ``pos_*`` / ``neg_*`` fields itself carries its
own triplet (a THz CSV row): its row is the transform's output as it is, and no
positive or negative is drawn for it.

Corrupt data: a sample that cannot be read, decoded or transformed is
counted (``loader.corrupt_count()``, with the samples the index found
unreadable), logged, and replaced by another sample of the same identity
(P×K composition and triplet roles are kept); above ``max_corrupt_fraction``
of the rows a worker is to deliver, the iteration raises ``RuntimeError``
naming the worst shard — as does building a loader whose index lost more
than that fraction of the split. ``verify_checksums=True`` checks each
shard's sha256 against the manifest when the split is indexed; a shard that
differs is left out of the index and counted as lost, by name.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .manifest import Manifest
from .reading import (DATA_ERRORS, CorruptDataError, CorruptTracker, Shard, ShardLoader, WorkerInit, checksum_problem,
                      collate, decode_sample, derive_seed, preserved_global_rngs, seed_global_rngs,
                      shards_of, tar_members)

log = logging.getLogger("shards.batching")


# ---------------------------------------------------------------------------
# the random-access index
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleIndex:
    """Random access to the complete samples of one split.

    Sample ``i``: ``keys[i]``, in shard ``shard_of[i]``; its members are rows
    ``first[i] .. first[i+1]-1`` of the member table (``m_ext`` index into
    ``exts``, ``m_offset``, ``m_size`` in bytes); ``identity[i]`` is the
    ``json`` identity (-1 when absent). ``lost``: shard -> samples the manifest
    lists that the index could not use (truncated or unreadable tar, missing
    fields), ``errors``: shard -> the first error.
    """

    shards: tuple[Shard, ...]
    keys: tuple[str, ...]
    shard_of: np.ndarray
    first: np.ndarray
    m_ext: np.ndarray
    m_offset: np.ndarray
    m_size: np.ndarray
    exts: tuple[str, ...]
    identity: np.ndarray
    lost: dict[str, int]
    errors: dict[str, str]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def total_lost(self) -> int:
        return sum(self.lost.values())


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension split: the basename up to its first dot."""
    d, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext


def build_index(data_dir: str | os.PathLike, split: str, manifest: Manifest | None = None,
                fields: Sequence[str] | None = None, verify_checksums: bool = False) -> SampleIndex:
    """Index one split (see :class:`SampleIndex`); cached per process by the
    shard sha256s, sizes and mtimes (a changed dataset is indexed anew).
    ``verify_checksums``: a shard whose sha256 is not the manifest's is lost whole."""
    data_dir = Path(data_dir)
    m = manifest or Manifest.load(data_dir)
    shards = shards_of(data_dir, m, split)
    want = None if fields is None else frozenset(fields) | {"json"}
    cache_key = (str(data_dir.resolve()), split, tuple(e.sha256 for e in m.splits[split]),
                 tuple(_stat(s.path) for s in shards), None if want is None else tuple(sorted(want)),
                 bool(verify_checksums))
    hit = _INDEX_CACHE.get(cache_key)
    if hit is not None:
        return hit
    expect = frozenset(m.modalities) & want if (m.modalities and want is not None) else (
        frozenset(m.modalities) or None)
    keys: list[str] = []
    shard_of: list[int] = []
    first: list[int] = [0]
    m_ext: list[int] = []
    m_off: list[int] = []
    m_size: list[int] = []
    ident: list[int] = []
    exts: dict[str, int] = {}
    lost: dict[str, int] = {}
    errors: dict[str, str] = {}
    for si, sh in enumerate(shards):
        found: "collections.OrderedDict[str, list[tuple[str, int, int]]]" = collections.OrderedDict()

        def failed(exn: Exception, shard: Shard = sh) -> bool:
            errors.setdefault(shard.name, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"[:300])
            return False

        mismatch = checksum_problem(sh) if verify_checksums else None
        if mismatch is not None:
            errors[sh.name] = mismatch
            lost[sh.name] = sh.count
            continue
        for member in tar_members(sh.path, None, failed, with_data=False):
            kx = _split_name(member["fname"])
            if kx is None:
                continue
            k, ext = kx
            if want is not None and ext not in want:
                continue
            found.setdefault(k, []).append((ext, member["offset"], member["size"]))
        n_ok = 0
        with _open_or_none(sh.path) as f:
            for k, members in found.items():
                have = {e for e, _, _ in members}
                if expect is not None and not expect <= have:
                    continue
                identity = -1
                js = next(((o, s) for e, o, s in members if e == "json"), None)
                if js is not None and f is not None:
                    try:
                        f.seek(js[0])
                        meta = json.loads(f.read(js[1]))
                        v = meta.get("identity") if isinstance(meta, dict) else None
                        identity = int(v) if isinstance(v, int) else -1
                    except (ValueError, OSError):
                        continue  # an unreadable json: the sample is unusable
                keys.append(k)
                shard_of.append(si)
                for e, o, s in members:
                    m_ext.append(exts.setdefault(e, len(exts)))
                    m_off.append(o)
                    m_size.append(s)
                first.append(len(m_ext))
                ident.append(identity)
                n_ok += 1
        if n_ok < sh.count:
            lost[sh.name] = sh.count - n_ok
            errors.setdefault(sh.name, f"{n_ok} usable samples of {sh.count}")
    for name, n in lost.items():  # every damaged shard by name, once per process (the index is cached)
        log.warning("skipping %d corrupt sample(s) [split %s, when indexing] in %s: %s", n, split, name,
                    errors.get(name, ""))
    idx = SampleIndex(shards=shards, keys=tuple(keys), shard_of=np.asarray(shard_of, np.int32),
                      first=np.asarray(first, np.int64), m_ext=np.asarray(m_ext, np.int16),
                      m_offset=np.asarray(m_off, np.int64), m_size=np.asarray(m_size, np.int64),
                      exts=tuple(sorted(exts, key=exts.get)), identity=np.asarray(ident, np.int64),
                      lost=lost, errors=errors)
    if len(_INDEX_CACHE) > 8:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    _INDEX_CACHE[cache_key] = idx
    return idx


_INDEX_CACHE: dict[tuple, SampleIndex] = {}


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


class _open_or_none:
    def __init__(self, path: str):
        self.path, self.f = path, None

    def __enter__(self):
        try:
            self.f = open(self.path, "rb")
        except OSError:
            self.f = None
        return self.f

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


class _Reader:
    """Raw samples by index (``seek`` + ``read``), a few tar files kept open."""

    def __init__(self, index: SampleIndex, max_open: int = 16):
        self.index, self.max_open = index, max_open
        self.files: "collections.OrderedDict[int, Any]" = collections.OrderedDict()

    def raw(self, i: int) -> dict[str, Any]:
        ix = self.index
        si = int(ix.shard_of[i])
        f = self.files.get(si)
        if f is None:
            f = open(ix.shards[si].path, "rb")
            self.files[si] = f
            if len(self.files) > self.max_open:
                self.files.popitem(last=False)[1].close()
        else:
            self.files.move_to_end(si)
        out: dict[str, Any] = {"__key__": ix.keys[i]}
        for r in range(int(ix.first[i]), int(ix.first[i + 1])):
            f.seek(int(ix.m_offset[r]))
            size = int(ix.m_size[r])
            data = f.read(size)
            if len(data) != size:
                raise EOFError(f"short read in {ix.shards[si].name} ({len(data)} of {size} bytes)")
            out[ix.exts[int(ix.m_ext[r])]] = data
        return out

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# ---------------------------------------------------------------------------
# batch plans (pure functions of the seeds)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Groups:
    """Per identity (present in the split): its sample indices; twins within the split."""

    ids: np.ndarray  # identity indices present, sorted
    samples: tuple[np.ndarray, ...]  # per position in ids
    pos: dict[int, int]  # identity -> position in ids
    twin: dict[int, int]  # identity -> co-twin identity (both in the split)
    units: tuple[tuple[int, ...], ...]  # twin pairs and singletons (identity indices)

    @staticmethod
    def of(index: SampleIndex, twin_pairs: Sequence[tuple[int, int]]) -> "_Groups":
        ident = index.identity
        ok = np.flatnonzero(ident >= 0)
        order = ok[np.argsort(ident[ok], kind="stable")]
        ids, starts = np.unique(ident[order], return_index=True)
        samples = tuple(np.split(order, starts[1:])) if len(order) else ()
        pos = {int(i): p for p, i in enumerate(ids)}
        twin: dict[int, int] = {}
        for a, b in twin_pairs:
            a, b = int(a), int(b)
            if a in pos and b in pos and a != b and a not in twin and b not in twin:
                twin[a], twin[b] = b, a
        units, seen = [], set()
        for i in ids.tolist():
            if i in seen:
                continue
            u = (i, twin[i]) if i in twin else (i,)
            seen.update(u)
            units.append(u)
        return _Groups(ids=ids, samples=samples, pos=pos, twin=twin, units=tuple(units))


def _round_at_random(x: float, rng: np.random.Generator) -> int:
    """``floor(x)`` or ``ceil(x)``, with expectation ``x``."""
    return int(x) + int(rng.random() < x - int(x))


def pk_plan(groups: _Groups, P: int, K: int, twin_prob: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """One P×K batch: ``P*K`` (identity, sample index) rows, identity-major
    (how the identities are drawn: the module doc)."""
    singles = [u[0] for u in groups.units if len(u) == 1]
    pairs = [u for u in groups.units if len(u) == 2]
    n_ids = len(singles) + 2 * len(pairs)
    if not 0 < P <= n_ids:
        raise ValueError(f"a P×K batch needs 1 <= P <= {n_ids} identities (P={P})")
    n_units = _round_at_random(min(float(len(pairs)), 2.0 * P * len(pairs) / (n_ids * (1.0 + twin_prob))), rng)
    n_both = _round_at_random(twin_prob * n_units, rng)
    order = rng.permutation(len(pairs))
    # slots of each twin unit in draw order: of the first n_units, n_both hold both twins (a rounded count,
    # not one coin per unit, so the batch rarely overflows); units beyond join only to fill, one coin each
    size = np.where(rng.random(len(pairs)) < twin_prob, 2, 1)
    size[:n_units] = np.r_[np.full(n_both, 2), np.ones(n_units - n_both, np.int64)][rng.permutation(n_units)]
    first = rng.integers(2, size=len(pairs))  # the twin that enters a lone unit (and comes first in a pair)
    slots = int(size[:n_units].sum())
    while slots > P:  # the last unit does not fit
        n_units -= 1
        slots -= int(size[n_units])
    while P - slots > len(singles) and n_units < len(pairs):  # too few singletons: more twin units
        if P - slots == 1:
            size[n_units] = 1
        slots += int(size[n_units])
        n_units += 1
    for k in range(n_units):  # still too few (P close to N): left-out co-twins join
        if P - slots <= len(singles):
            break
        if size[k] == 1:
            size[k], slots = 2, slots + 1
    blocks: list[tuple[int, ...]] = []
    for k in range(n_units):
        a, b = pairs[order[k]][first[k]], pairs[order[k]][1 - first[k]]
        blocks.append((a, b) if size[k] == 2 else (a,))
    blocks += [(singles[i],) for i in rng.permutation(len(singles))[:P - slots]]
    chosen = [i for j in rng.permutation(len(blocks)) for i in blocks[j]]
    rows: list[tuple[int, int]] = []
    for i in chosen:
        s = groups.samples[groups.pos[i]]
        if len(s) >= K:
            pick_s = s[rng.choice(len(s), K, replace=False)]
        else:
            pick_s = np.concatenate([s[rng.permutation(len(s))], s[rng.integers(len(s), size=K - len(s))]])
        rows += [(i, int(x)) for x in pick_s]
    return rows


def triplet_plan(groups: _Groups, anchors: np.ndarray, identity: np.ndarray, twin_prob: float,
                 rng: np.random.Generator) -> list[tuple[int, int, int, bool]]:
    """(anchor, positive, negative sample indices, negative is the co-twin) per anchor."""
    out = []
    n_ids = len(groups.ids)
    for a in anchors.tolist():
        i = int(identity[a])
        own = groups.samples[groups.pos[i]]
        if len(own) > 1:
            p = int(own[rng.integers(len(own) - 1)])
            if p == a:
                p = int(own[-1])
        else:
            p = a
        t = groups.twin.get(i)
        is_twin = t is not None and rng.random() < twin_prob
        if is_twin:
            j = t
        else:
            excl = {groups.pos[i]} | ({groups.pos[t]} if t is not None and n_ids > 2 else set())
            q = int(rng.integers(n_ids - len(excl)))
            for e in sorted(excl):  # the q-th position not excluded
                if q >= e:
                    q += 1
            j = int(groups.ids[q])
            is_twin = t is not None and j == t
        neg_s = groups.samples[groups.pos[j]]
        out.append((a, p, int(neg_s[rng.integers(len(neg_s))]), bool(is_twin)))
    return out


# ---------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    mode: str  # "pk" | "triplet"
    split: str
    index: SampleIndex
    groups: _Groups
    rows: int  # rows per batch (P*K or triplets)
    P: int
    K: int
    twin_prob: float
    num_batches: int
    rank: int
    world_size: int
    workers: int
    seed: int
    epoch: int
    skip_batches: int
    max_corrupt_fraction: float
    anchors: np.ndarray | None  # triplet: the epoch's anchor permutation

    def batch_rows(self, j: int) -> list[tuple]:
        """Batch ``j`` of this rank: P×K (identity, sample) rows or triplets."""
        if self.mode == "pk":
            rng = np.random.default_rng(derive_seed("pk", self.seed, self.epoch, self.rank, j))
            return pk_plan(self.groups, self.P, self.K, self.twin_prob, rng)
        g = j * self.world_size + self.rank  # global batch index
        n = len(self.anchors)
        anchors = self.anchors[(g * self.rows + np.arange(self.rows)) % n]
        rng = np.random.default_rng(derive_seed("triplet", self.seed, self.epoch, g))
        return triplet_plan(self.groups, anchors, self.index.identity, self.twin_prob, rng)


# A transform output with keys of these prefixes is a whole triplet (e.g. a THz CSV row:
# anchor, its own positive and negative): triplet batching keeps it as it is.
OWN_TRIPLET = ("pos_", "neg_")


class _IndexedStream(IterableDataset):
    def __init__(self, plan: _Plan, transform: Callable[..., dict]):
        super().__init__()
        self.plan = plan
        self.transform = transform

    def _sample(self, reader: _Reader, i: int, seed: int, tracker: CorruptTracker, bad: set[int]):
        """Transform of sample ``i`` (None if it is bad; counted once)."""
        if i in bad:
            return None
        ix = self.plan.index
        shard, key = ix.shards[int(ix.shard_of[i])].name, ix.keys[i]
        try:
            sample = decode_sample(reader.raw(i))
        except Exception as exn:  # unreadable bytes or undecodable data
            bad.add(i)
            tracker.record(shard, key, f"read/decode failed: {type(exn).__name__}: {exn}")
            return None
        seed_global_rngs(seed)
        try:
            out = self.transform(sample, train=True)
        except DATA_ERRORS as exn:
            bad.add(i)
            tracker.record(shard, key, f"transform failed: {type(exn).__name__}: {exn}")
            return None
        if not isinstance(out, dict):
            raise TypeError(f"transform must return a dict, got {type(out).__name__}")
        out.setdefault("__key__", key)
        return out

    def _robust(self, reader, i: int, seed: int, tracker, bad) -> tuple[dict | None, int]:
        """Sample ``i`` or, if it is bad, the next good sample of the same identity."""
        out = self._sample(reader, i, seed, tracker, bad)
        if out is not None:
            return out, i
        ident = int(self.plan.index.identity[i])
        if ident < 0 or ident not in self.plan.groups.pos:
            return None, i
        own = self.plan.groups.samples[self.plan.groups.pos[ident]].tolist()
        start = own.index(i) if i in own else 0
        for k in range(1, len(own)):
            alt = own[(start + k) % len(own)]
            out = self._sample(reader, alt, seed, tracker, bad)
            if out is not None:
                return out, alt
        return None, i

    def _batch_pk(self, j, reader, tracker, bad) -> dict[str, Any]:
        p = self.plan
        rows = p.batch_rows(j)
        outs = []
        for r, (ident, i) in enumerate(rows):
            out, _ = self._robust(reader, i, derive_seed("pk-aug", p.seed, p.epoch, p.rank, j, r), tracker, bad)
            outs.append((out, ident))
        good = [o for o in outs if o[0] is not None]
        if not good:
            raise CorruptDataError(f"split {p.split!r} rank {p.rank}: no readable sample in P×K batch {j}; "
                               f"last: {tracker.last}")
        # a row whose identity has no readable sample at all repeats a good row (identity included)
        filled = [o if o[0] is not None else good[k % len(good)] for k, o in enumerate(outs)]
        batch = collate([o for o, _ in filled])
        batch["pk_identity"] = torch.tensor([ident for _, ident in filled], dtype=torch.long)
        return batch

    def _batch_triplet(self, j, reader, tracker, bad) -> dict[str, Any]:
        p = self.plan
        g = j * p.world_size + p.rank
        rows = []
        for t, (a, pos, neg, twin) in enumerate(p.batch_rows(j)):
            parts = []
            for role, i in (("a", a), ("p", pos), ("n", neg)):
                out, _ = self._robust(reader, i, derive_seed("triplet-aug", p.seed, p.epoch, g, t, role),
                                      tracker, bad)
                parts.append(out)
                if role == "a" and out is not None and any(k.startswith(OWN_TRIPLET) for k in out):
                    break  # the sample is its own triplet: the drawn positive and negative are not read
            if any(x is None for x in parts):
                rows.append(None)
                continue
            if len(parts) == 1:
                rows.append(parts[0])
                continue
            a_out, p_out, n_out = parts
            row = {k: v for k, v in a_out.items()}
            for prefix, o in (("pos_", p_out), ("neg_", n_out)):
                for k, v in o.items():
                    row[f"__{prefix}key__" if k == "__key__" else prefix + k] = v
            row["neg_is_co_twin"] = torch.tensor(twin)  # not neg_twin: that is the negative's own "twin"
            rows.append(row)
        good = [r for r in rows if r is not None]
        if not good:
            raise RuntimeError(f"split {p.split!r} rank {p.rank}: no readable triplet in batch {j}; "
                               f"last: {tracker.last}")
        return collate([r if r is not None else good[k % len(good)] for k, r in enumerate(rows)])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.plan
        info = get_worker_info()
        w = info.id if info is not None else 0
        mine = range(p.skip_batches + w, p.num_batches, p.workers)
        if len(mine) == 0:
            return
        per_row = 3 if p.mode == "triplet" else 1
        tracker = CorruptTracker(p.split, p.rank, w, len(mine) * p.rows * per_row, p.max_corrupt_fraction)
        reader = _Reader(p.index)
        bad: set[int] = set()
        make = self._batch_pk if p.mode == "pk" else self._batch_triplet
        try:
            for j in mine:
                with preserved_global_rngs(info is None):
                    batch = make(j, reader, tracker, bad)
                batch["_corrupt"] = tracker.take()
                yield batch
        finally:
            reader.close()


class IndexedTrainLoader(ShardLoader):
    """The P×K / triplet training loader of one rank for one epoch: exactly
    ``len(self)`` batches (``len - skip_batches`` when resuming)."""

    def __init__(self, mode: str, data_dir, split: str, transform: Callable[..., dict], rows: int, P: int, K: int,
                 twin_prob: float, rank: int, world_size: int, num_workers: int, seed: int, epoch: int,
                 skip_batches: int = 0, max_corrupt_fraction: float = 0.01, fields: Sequence[str] | None = None,
                 pin_memory: bool = False, mp_context: str | None = None, prefetch_factor: int = 2,
                 verify_checksums: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        if not 0.0 <= twin_prob <= 1.0:
            raise ValueError(f"twin_prob must be in [0, 1], got {twin_prob}")
        super().__init__()
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        total = self.manifest.split_size(split) if split in self.manifest.splits else None
        index = build_index(self.data_dir, split, self.manifest, fields, verify_checksums)
        if total is None or total <= 0:
            raise ValueError(f"split {split!r} of {self.data_dir} has no samples")
        if index.lost:
            worst = max(index.lost, key=index.lost.get)
            msg = (f"split {split!r}: {index.total_lost} of {total} samples unusable when indexing; worst shard "
                   f"{worst} ({index.lost[worst]} lost: {index.errors.get(worst, '')})")
            if index.total_lost > max_corrupt_fraction * total:
                raise RuntimeError(f"too many corrupt samples: {msg} > max_corrupt_fraction={max_corrupt_fraction}")
            log.warning("skipping %s", msg)
        groups = _Groups.of(index, self.manifest.twin_pairs)
        n_ids = len(groups.ids)
        if mode == "pk":
            if n_ids < P:
                raise ValueError(f"P×K batching: split {split!r} has {n_ids} identities with samples, P={P} "
                                 "needs at least that many")
            anchors = None
        else:
            if n_ids < 2:
                raise ValueError(f"triplet batching: split {split!r} needs >= 2 identities, has {n_ids}")
            labelled = np.flatnonzero(index.identity >= 0)
            anchors = labelled[np.random.default_rng(derive_seed("triplet-order", seed, epoch))
                               .permutation(len(labelled))]
        self.num_workers = int(num_workers)
        self.transform = transform
        self.pin_memory, self.mp_context, self.prefetch_factor = pin_memory, mp_context, prefetch_factor
        self.plan = _Plan(mode=mode, split=split, index=index, groups=groups, rows=int(rows), P=int(P), K=int(K),
                          twin_prob=float(twin_prob), num_batches=max(1, total // (world_size * rows)),
                          rank=int(rank), world_size=int(world_size), workers=max(1, self.num_workers),
                          seed=int(seed), epoch=int(epoch), skip_batches=int(skip_batches),
                          max_corrupt_fraction=float(max_corrupt_fraction), anchors=anchors)
        self.skip_batches, self.kind = self.plan.skip_batches, mode

    def lost_before_iterating(self) -> dict[str, int]:
        """Samples found unusable when indexing the split (the iteration's own losses come on top)."""
        return dict(self.plan.index.lost)

    def batch_rows(self, j: int) -> list[tuple]:
        """The sample indices of batch ``j`` (P×K: (identity, sample); triplet:
        (anchor, positive, negative, negative-is-co-twin)) — for tests/tools."""
        return self.plan.batch_rows(j)

    def stream(self) -> tuple[_IndexedStream, WorkerInit]:
        p = self.plan
        return _IndexedStream(p, self.transform), WorkerInit(p.seed, p.epoch, p.rank, p.mode)


def build_pk_loader(data_dir, split: str, transform: Callable[..., dict], P: int, K: int, rank: int,
                    world_size: int, num_workers: int, seed: int, epoch: int, skip_batches: int = 0,
                    twin_prob: float = 1.0, max_corrupt_fraction: float = 0.01,
                    fields: Sequence[str] | None = None, pin_memory: bool = False, mp_context: str | None = None,
                    prefetch_factor: int = 2, verify_checksums: bool = False) -> IndexedTrainLoader:
    """P×K training batches (``P*K`` rows; see the module doc).
    ``len(loader) == max(1, split samples // (world_size * P * K))``."""
    if P < 1 or K < 1:
        raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
    return IndexedTrainLoader("pk", data_dir, split, transform, P * K, P, K, twin_prob, rank, world_size,
                              num_workers, seed, epoch, skip_batches, max_corrupt_fraction, fields, pin_memory,
                              mp_context, prefetch_factor, verify_checksums)


def build_triplet_loader(data_dir, split: str, transform: Callable[..., dict], batch_size: int, rank: int,
                         world_size: int, num_workers: int, seed: int, epoch: int, skip_batches: int = 0,
                         twin_prob: float = 1.0, max_corrupt_fraction: float = 0.01,
                         fields: Sequence[str] | None = None, pin_memory: bool = False,
                         mp_context: str | None = None, prefetch_factor: int = 2,
                         verify_checksums: bool = False) -> IndexedTrainLoader:
    """(anchor, positive, negative) training batches of ``batch_size`` triplets
    (see the module doc). ``len(loader) == max(1, split samples // (world_size * batch_size))``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return IndexedTrainLoader("triplet", data_dir, split, transform, batch_size, 0, 0, twin_prob, rank,
                              world_size, num_workers, seed, epoch, skip_batches, max_corrupt_fraction, fields,
                              pin_memory, mp_context, prefetch_factor, verify_checksums)


__all__ = ["SampleIndex", "build_index", "build_pk_loader", "build_triplet_loader", "IndexedTrainLoader",
           "pk_plan", "triplet_plan"]
