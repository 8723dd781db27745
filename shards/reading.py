"""Reading shards, shared by the streaming loaders (:mod:`shards.stream`), the
P×K / triplet loaders (:mod:`shards.batching`) and ``biomtl shards verify``:
the shard list of a split, the one tar member reader of the package, sample
decoding, corrupt-sample accounting, per-worker seeding and the DataLoader
wrapper.

The tar members are read by :func:`tar_members`, a small ustar/pax/GNU reader
with the semantics of webdataset's ``tar_file_iterator`` over :mod:`tarfile`
(regular files only, ``__meta__`` files skipped, a bad or truncated header
after the first ends the archive, truncated member data is an error) at ~4
instead of ~100 µs per sample — tarfile's streaming parser cost 10% of the CPU
time of decoding and augmenting a small image. It also refuses member names
that are absolute or climb out with ``..``: shards are untrusted input.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate

from .images import open_image
from .manifest import Manifest, file_sha256
from .remote import RemoteRoot, dataset_root, is_remote, open_stream, stream_sha256

log = logging.getLogger("shards.stream")

# The extensions the decoder turns into images, in order of preference; the
# recipes derive the member names they accept from it (recipes/image_input.py),
# so every format `biomtl shards create` stores is one they read.
IMAGE_EXTS = ("png", "jpg", "jpeg", "pgm", "ppm", "gif", "bmp", "tif", "tiff", "webp")
# Exceptions from a recipe's transform that mean "this sample's data are bad"
# (missing field, unreadable value); anything else is a bug and propagates.
DATA_ERRORS = (KeyError, ValueError, OSError, EOFError, IndexError)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any repr-able parts (Python's hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU global RNGs (not CUDA: that would
    disturb the training process's GPU RNG when num_workers == 0)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_global_rngs(enabled: bool):
    """With num_workers == 0 the per-sample seeding runs in the training process;
    put its RNG states back afterwards so the model's randomness is untouched."""
    if not enabled:
        yield
        return
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode by extension: images -> PIL.Image (fully loaded, 8-bit samples:
    :func:`shards.images.open_image` scales 16-bit grey),
    ``.npy`` -> ndarray (no pickle), ``json`` -> dict, ``txt`` -> str,
    ``cls``/``index`` -> int; ``__meta__`` fields and unknown extensions pass through."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k.startswith("__"):
            out[k] = v
            continue
        ext = k.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTS:
            out[k] = open_image(v, f"{raw.get('__key__', '?')}.{k}")
        elif ext == "npy":
            out[k] = np.load(io.BytesIO(v), allow_pickle=False)
        elif ext == "json":
            out[k] = json.loads(v)
        elif ext == "txt":
            out[k] = v.decode("utf-8")
        elif ext in ("cls", "index"):
            out[k] = int(v.decode("utf-8").strip())
        else:
            out[k] = v
    return out


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return default_collate(rows)


# ---------------------------------------------------------------------------
# corrupt-data accounting (per worker)
# ---------------------------------------------------------------------------
class CorruptDataError(RuntimeError):
    """The data cannot go on: more corrupt samples than ``max_corrupt_fraction``,
    or no readable sample at all. The message is one line naming the split,
    the worst shard and the cause; a DataLoader worker's copy carries the
    worker's traceback first, :func:`corrupt_data_line` finds the line again."""


def corrupt_data_line(exc: BaseException) -> str:
    """The one line of a :class:`CorruptDataError`, also when a DataLoader worker
    re-raised it (``Caught CorruptDataError in DataLoader worker ... Original
    Traceback ... shards.reading.CorruptDataError: <the line>``)."""
    lines = str(exc).splitlines()
    marker = f"{CorruptDataError.__name__}: "
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[0] if lines else type(exc).__name__


class CorruptTracker:
    """Counts distinct lost samples of one worker in one iteration; raises above
    ``max_fraction`` of the samples the worker is to deliver in this iteration.

    Logged: the first event of every shard (a shard lost whole under a
    permissive fraction is never silent), the first few events overall, then
    every 100th lost sample."""

    MAX_WARNINGS = 5

    def __init__(self, split: str, rank: int, worker: int, planned: int, max_fraction: float):
        self.split, self.rank, self.worker = split, rank, worker
        self.planned = max(1, planned)
        self.max_fraction = max_fraction
        self.total = 0
        self.by_shard: collections.Counter[str] = collections.Counter()
        self._taken: collections.Counter[str] = collections.Counter()
        self.first = ""
        self.last = ""
        self._seen: set[tuple[str, str | None]] = set()

    def record(self, shard: str, key: str | None, what: str, n: int = 1) -> None:
        """Count ``n`` lost samples (``key`` None: samples a shard failed to deliver).
        A sample (or a shard's tail) met again on a later pass is not counted again."""
        if n <= 0 or (shard, key) in self._seen:
            return
        self._seen.add((shard, key))
        new_shard = shard not in self.by_shard
        self.total += n
        self.by_shard[shard] += n
        self.last = f"{shard}{' key ' + key if key else ''}: {what}"
        self.first = self.first or self.last
        if new_shard or self.total <= self.MAX_WARNINGS or self.total % 100 == 0:
            more = (" (from now on: the first of each shard and every 100th)"
                    if self.total >= self.MAX_WARNINGS and self.total - n < self.MAX_WARNINGS else "")
            log.warning("skipping %d corrupt sample(s) [split %s, rank %d, worker %d, %d so far] in %s%s",
                        n, self.split, self.rank, self.worker, self.total, self.last, more)
        if self.total > self.max_fraction * self.planned:
            worst, k = self.by_shard.most_common(1)[0]
            first = f"first: {self.first}; " if self.first != self.last else ""
            raise CorruptDataError(
                f"too many corrupt samples in split {self.split!r} (rank {self.rank}, worker {self.worker}): "
                f"{self.total} lost of {self.planned} planned samples > max_corrupt_fraction="
                f"{self.max_fraction}; worst shard {worst} ({k} lost); {first}last: {self.last}")

    def take(self) -> dict[str, int]:
        """Samples lost per shard since the last call: they travel with the batch
        (``"_corrupt"``) out of the worker process to the loader's :class:`CorruptTally`."""
        d = {s: n - self._taken[s] for s, n in self.by_shard.items() if n > self._taken[s]}
        self._taken.update(d)
        return d


class CorruptTally:
    """A loader's lost samples per shard in its current/last iteration, summed from
    the ``"_corrupt"`` entries of its batches (every worker's :meth:`CorruptTracker.take`)."""

    def __init__(self):
        self.by_shard: collections.Counter[str] = collections.Counter()

    def reset(self) -> None:
        self.by_shard.clear()

    def add(self, batch: dict[str, Any]) -> None:
        """Take the batch's ``"_corrupt"`` entry out and count it."""
        self.by_shard.update(batch.pop("_corrupt", None) or {})

    def count(self) -> int:
        return sum(self.by_shard.values())

    def summary(self, extra: dict[str, int] | None = None) -> dict[str, Any]:
        """``{"samples": lost samples, "shards": {shard: lost samples}}`` (plus ``extra``)."""
        shards = collections.Counter(self.by_shard)
        shards.update(extra or {})
        return {"samples": sum(shards.values()), "shards": dict(shards)}


# ---------------------------------------------------------------------------
# optional checksum verification (data.verify_checksums)
# ---------------------------------------------------------------------------
_CHECKED: dict[tuple[str, int, int, str], str | None] = {}


def checksum_problem(shard: "Shard") -> str | None:
    """None when the file's sha256 is the manifest's, else what is wrong. A file
    that cannot be read is left to the reader (it reports it as such). Cached
    per process by path, size, mtime and expected sum: each shard is hashed
    once per process, not on every pass (a remote shard is streamed once for it,
    keyed by its URL alone)."""
    if is_remote(shard.path):
        key, digest = (shard.path, -1, -1, shard.sha256), lambda: stream_sha256(shard.path)[1]
    else:
        try:
            st = os.stat(shard.path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the hash; the reader refuses it
            return None
        key, digest = (shard.path, st.st_size, st.st_mtime_ns, shard.sha256), lambda: file_sha256(shard.path)
    if key not in _CHECKED:
        try:
            actual = digest()
        except OSError:
            return None  # the reader meets the same fault and names it
        _CHECKED[key] = None if actual == shard.sha256 else (
            f"ChecksumMismatch: sha256 {actual[:16]}... of {shard.name if not is_remote(shard.path) else shard.path} "
            f"is not the manifest's {shard.sha256[:16] or '(none)'}... (data.verify_checksums)")
        if len(_CHECKED) > 4096:
            _CHECKED.pop(next(iter(_CHECKED)))
    return _CHECKED[key]


# ---------------------------------------------------------------------------
# reading one shard
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    path: str  # absolute
    name: str  # relative to the dataset dir (as in the manifest)
    count: int  # samples according to the manifest
    sha256: str = ""  # according to the manifest (checked only with verify_checksums)


class FieldSelector:
    """Picklable ``select_files`` predicate: keep only the wanted extensions."""

    def __init__(self, fields: frozenset[str]):
        self.fields = fields

    def __call__(self, fname: str) -> bool:
        _, ext = wds.tariterators.base_plus_ext(fname)
        return ext is not None and ext.lower() in self.fields


_TAR_REGULAR = (b"0", b"\0", b"7")


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    field = field.split(b"\0", 1)[0].strip()
    try:
        return int(field, 8) if field else 0
    except ValueError:  # int()'s message would quote the file's bytes into logs and errors
        raise tarfile.ReadError("not a tar header (invalid number field)") from None


def unsafe_member_name(name: str) -> bool:
    """An absolute name or one with a ``..`` component: never a sample member."""
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)


def tar_members(path: str, select: Callable[[str], bool] | None, handler: Callable[[Exception], bool],
                chunk: int = 1 << 16, with_data: bool = True) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` per regular member of a tar file (see the
    module doc); with ``with_data=False`` ``{"fname", "offset", "size"}`` instead
    (the data are skipped, for indexing)."""
    try:
        if is_remote(path):  # streamed, reopened where it broke (shards/remote.py)
            f, file_size = open_stream(path, chunk), 1 << 62
        else:
            if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or device would block the open
                raise tarfile.ReadError("not a regular file")
            f = open(path, "rb", buffering=chunk)
            file_size = os.fstat(f.fileno()).st_size
    except (OSError, tarfile.ReadError) as exn:
        exn.args = (f"{exn.args[0] if exn.args else exn} @ {path}",) + exn.args[1:]
        handler(exn)
        return
    with f:
        pax: dict[str, str] = {}  # this member's pax records (global ones included)
        pax_global: dict[str, str] = {}
        long_name: str | None = None
        first = True
        pending = False  # an extended header (pax, GNU long name) waits for its member's header
        try:
            while True:
                h = f.read(512)
                if len(h) < 512 or h.count(0) == 512:
                    if pending:
                        raise tarfile.ReadError("empty header" if not h.strip(b"\0") else "truncated header")
                    if first and len(h) < 512:
                        raise tarfile.ReadError("empty file" if not h else "truncated header")
                    return  # end of archive (or a truncated header: tarfile ends there too)
                stored = _tar_number(h[148:156])
                if stored != sum(h[:148]) + 256 + sum(h[156:]):
                    if first or pending:
                        raise tarfile.ReadError("bad checksum")
                    return  # tarfile treats an invalid later header as the end
                first = False
                kind = h[156:157]
                size = int(pax["size"]) if "size" in pax else _tar_number(h[124:136])
                padded = (size + 511) & ~511
                if kind in (b"x", b"g", b"L", b"K"):
                    data = f.read(padded)
                    if len(data) < padded:
                        raise tarfile.ReadError("unexpected end of data")
                    data = data[:size]
                    if kind == b"x":
                        pax = {**pax_global, **_pax_records(data)}
                    elif kind == b"g":
                        pax_global.update(_pax_records(data))
                        pax = {**pax_global, **pax}
                    elif kind == b"L":
                        long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    pending = True
                    continue
                pending = False
                if "path" in pax:
                    name = pax["path"]
                elif long_name is not None:
                    name = long_name
                else:
                    name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if h[257:265] == b"ustar\x0000" and h[345:346] != b"\0":
                        prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                        name = f"{prefix}/{name}"
                pax, long_name = dict(pax_global), None
                if kind in _TAR_REGULAR and unsafe_member_name(name):
                    raise tarfile.ReadError(f"unsafe member name {name!r}")
                wanted = (kind in _TAR_REGULAR and name
                          and not ("/" not in name and name.startswith(wds.tariterators.meta_prefix)
                                   and name.endswith(wds.tariterators.meta_suffix))
                          and not re.match(r"__[^/]*__($|/)", name)
                          and (select is None or select(name)))
                if not wanted:
                    if padded and len(f.read(padded)) < padded:
                        raise tarfile.ReadError("unexpected end of data")
                    continue
                if not with_data:
                    offset = f.tell()
                    if offset + size > file_size:
                        raise tarfile.ReadError(f"unexpected end of data (member {name} ends past the end of the file)")
                    yield {"fname": name, "offset": offset, "size": size}
                    f.seek(min(offset + padded, file_size))
                    continue
                data = f.read(padded)
                if len(data) < size:
                    raise tarfile.ReadError("unexpected end of data")
                yield {"fname": name, "data": data[:size] if padded != size else data, "__url__": path}
                if len(data) < padded:  # tarfile fails when it moves on to the next header
                    raise tarfile.ReadError("unexpected end of data")
        except Exception as exn:
            exn.args = (f"{exn.args[0] if exn.args else exn} @ {path}",) + exn.args[1:]
            handler(exn)


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        if length <= 0:
            break
        rec = data[sp + 1:pos + length - 1]  # without the trailing newline
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


class ShardReader:
    """Iterate the complete samples of one tar (webdataset's tarfile_samples).

    A read error (truncated or garbled tar, missing file) ends the shard. The
    sample being assembled when it happened is kept only if it has every
    expected field (``expect``: the manifest's modalities; without them, the
    fields of the shard's previous sample). Afterwards ``n`` is the number of
    samples yielded and ``error`` the error. With ``verify`` the file's sha256
    is checked against the manifest first; a mismatch is an error that ends the
    shard before its first sample (the whole shard counts as corrupt).
    """

    def __init__(self, shard: Shard, fields: frozenset[str] | None, expect: frozenset[str] | None = None,
                 verify: bool = False):
        self.shard = shard
        self.fields = fields
        self.expect = expect
        self.verify = verify
        self.n = 0
        self.error: str | None = None

    def _handler(self, exn: Exception) -> bool:
        if self.error is None:
            self.error = f"{type(exn).__name__}: {str(exn.args[0]) if exn.args else exn}"[:300]
        return False  # stop reading this shard

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.verify:
            self.error = checksum_problem(self.shard)
            if self.error is not None:
                return
        select = FieldSelector(self.fields) if self.fields is not None else None
        samples = wds.tariterators.group_by_keys(tar_members(self.shard.path, select, self._handler),
                                                 handler=self._handler)
        expect = self.expect
        try:
            for s in samples:
                have = frozenset(k for k in s if not k.startswith("__"))
                if self.error is not None and (expect is None or not expect <= have):
                    continue  # assembled across the failure point and incomplete
                if expect is None:
                    expect = have
                self.n += 1
                yield s
        except Exception as exn:  # errors the webdataset handlers do not see
            self._handler(exn)



class WorkerInit:
    """Per-(rank, worker) seeding of the global RNGs, one thread per worker."""

    def __init__(self, seed: int, epoch: int, rank: int, tag: str):
        self.seed, self.epoch, self.rank, self.tag = seed, epoch, rank, tag

    def __call__(self, worker_id: int) -> None:
        torch.set_num_threads(1)
        self.seed_worker(worker_id, self.epoch)

    def seed_worker(self, worker_id: int, epoch: int) -> None:
        """The global RNGs of worker ``worker_id`` at the start of ``epoch`` (a
        persistent worker calls it again at each new epoch it starts)."""
        seed_global_rngs(derive_seed("worker", self.tag, self.seed, epoch, self.rank, worker_id))


def make_dataloader(ds: IterableDataset, num_workers: int, init: WorkerInit, pin_memory: bool,
                    mp_context: str | None, prefetch_factor: int, persistent: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=num_workers, worker_init_fn=init,
                      # an explicit generator: the DataLoader's base-seed draw must not
                      # consume the training process's global torch RNG
                      generator=torch.Generator().manual_seed(0),
                      pin_memory=pin_memory, multiprocessing_context=mp_context,
                      prefetch_factor=prefetch_factor, persistent_workers=persistent)


def iterate_batches(ds: IterableDataset, num_workers: int, init: WorkerInit, pin_memory: bool,
             mp_context: str | None, prefetch_factor: int) -> Iterator[dict[str, Any]]:
    """Batches of ``ds``: in this process, or from DataLoader worker processes."""
    if num_workers <= 0:
        yield from ds
        return
    it = iter(make_dataloader(ds, num_workers, init, pin_memory, mp_context, prefetch_factor))
    try:
        yield from it
    finally:
        # stop the workers now (on errors and early breaks too), not whenever the
        # iterator is garbage collected: live workers and their queue threads
        # would otherwise outlast the epoch (and slow down later forks)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class ShardLoader:
    """What every loader of shard batches offers (the streaming train and eval
    loaders, the P×K / triplet loader): ``len(loader)`` batches per epoch on
    every rank, ``num_remaining`` of them yielded by one iteration (fewer when
    resuming mid-epoch), and the samples lost to corrupt data in the
    current/last iteration. A subclass sets ``plan`` (with ``num_batches``,
    ``rank``), the DataLoader settings, and says which stream it iterates."""

    plan: Any
    transform: Callable[..., dict]
    num_workers: int
    pin_memory: bool
    mp_context: str | None
    prefetch_factor: int
    skip_batches: int = 0
    kind: str = "loader"  # named in the batch-count error
    # Keep the DataLoader and its worker processes from one iteration to the
    # next (its stream must then read what changes per iteration, e.g. the
    # epoch, from shared memory: TrainLoader.set_epoch)
    keep_workers: bool = False

    def __init__(self) -> None:
        self._corrupt = CorruptTally()
        self._dataloader: DataLoader | None = None

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_remaining(self) -> int:
        """Batches one iteration yields (``len - skip_batches``, at least 0)."""
        return max(0, len(self) - self.skip_batches)

    def lost_before_iterating(self) -> dict[str, int]:
        """Samples per shard found unusable before any iteration (an index built up front)."""
        return {}

    def corrupt_summary(self) -> dict[str, Any]:
        """``{"samples": lost samples, "shards": {shard: lost samples}}`` of the
        current/last iteration of this rank (plus :meth:`lost_before_iterating`)."""
        return self._corrupt.summary(self.lost_before_iterating())

    def corrupt_count(self) -> int:
        """Samples lost to corrupt data: :meth:`corrupt_summary`'s total."""
        return self._corrupt.count() + sum(self.lost_before_iterating().values())

    def stream(self) -> tuple[IterableDataset, WorkerInit]:
        """The dataset one iteration reads and the seeding of its workers."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "_dataloader": None}  # a copy starts its own workers

    def close(self) -> None:
        """Stop kept worker processes now (else they end with the loader)."""
        loader, self._dataloader = self._dataloader, None
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._corrupt.reset()
        ds, init = self.stream()
        n = 0
        if self.keep_workers and self.num_workers > 0:
            if self._dataloader is None:
                self._dataloader = make_dataloader(ds, self.num_workers, init, self.pin_memory, self.mp_context,
                                                   self.prefetch_factor, persistent=True)
            batches: Iterator[dict[str, Any]] = iter(self._dataloader)
        else:
            batches = iterate_batches(ds, self.num_workers, init, self.pin_memory, self.mp_context,
                                      self.prefetch_factor)
        for batch in batches:
            self._corrupt.add(batch)
            n += 1
            yield batch
        if n != self.num_remaining:  # would desynchronise the ranks' collectives
            raise RuntimeError(f"{self.kind} stream of rank {self.plan.rank} yielded {n} batches, expected "
                               f"{self.num_remaining}")


def expected_fields(manifest: Manifest, fields: Sequence[str] | None) -> frozenset[str] | None:
    """The fields every sample should have (manifest modalities, within ``fields``)."""
    if not manifest.modalities:
        return None
    exp = frozenset(manifest.modalities)
    if fields is not None:
        exp &= frozenset(fields)
    return exp or None


def shards_of(data_dir: "Path | RemoteRoot", manifest: Manifest, split: str) -> tuple[Shard, ...]:
    if split not in manifest.splits:
        raise KeyError(f"split {split!r} not in {data_dir}/manifest.json "
                       f"(have: {', '.join(sorted(manifest.splits)) or 'none'})")
    # shard_path: never a file outside the dataset (a manifest is untrusted input)
    return tuple(Shard(path=str(manifest.shard_path(data_dir, e)), name=e.file, count=e.count, sha256=e.sha256)
                 for e in manifest.splits[split])




def read_images_by_key(data_dir: str | os.PathLike, split: str, keys: Sequence[str],
                       prefer: Sequence[str] = ("vis.png", "png", "jpg", "jpeg", "pgm")) -> dict[str, Any]:
    """``{key: PIL.Image}`` read straight from a split's shards (the first image
    member by ``prefer``, else any image member), for pictures of chosen samples.
    Unreadable shards are logged and passed over: pictures are a nicety."""
    want = set(keys)
    found: dict[str, dict[str, bytes]] = {}

    def failed(exn: Exception) -> bool:
        log.warning("cannot read images from %s", exn.args[0] if exn.args else exn)
        return False

    for shard in shards_of(dataset_root(data_dir), Manifest.load(data_dir), split):
        if want <= found.keys():
            break
        for member in tar_members(shard.path, None, failed):
            base, _, ext = member["fname"].rsplit("/", 1)[-1].partition(".")
            if base in want and ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                found.setdefault(base, {})[ext] = member["data"]
    out = {}
    for key, members in found.items():
        ext = next((e for e in prefer if e in members), next(iter(members)))
        out[key] = open_image(members[ext], f"{key}.{ext}")
    return out
