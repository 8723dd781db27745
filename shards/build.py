"""``biomtl shards create``: a raw dataset (any :mod:`shards.sources` format) to
``DIR/{split}/shard-%06d.tar`` + ``DIR/manifest.json`` + ``DIR/report.json``.

Steps: the source scans its input (:class:`shards.sources.Scan`); samples are
assigned to splits (:func:`assign_splits`); each split's samples are read,
decoded and encoded by ``--workers`` processes (in a fixed order, so the
shards do not depend on the worker count) and written by
:class:`shards.writer.ShardSplitWriter`; then the manifest and the report.

Everything is written into a temporary sibling directory
(``.DIR.tmp-<host>-<pid>-<n>``) that is renamed to ``DIR`` only when complete:
an interrupted or failed run leaves no directory that looks like a dataset
(no manifest, no shards under ``DIR``). ``DIR`` must not exist, be empty, or
(with ``overwrite``) is replaced only after the new one is complete, and only
when biomtl wrote all of it: a loadable manifest and nothing but its files
(``manifest.json``, ``report.json``, ``<split>_pairs.json``, the shards and
their split folders; :func:`foreign_entries`). A folder holding anything else
is refused, and so is an output that is the input, lies inside the input, or
holds the input: ``--overwrite`` never deletes what biomtl did not write. The
old dataset's files are removed one by one, by name, after the swap.

The staging directory is removed on every error, on Ctrl-C and on SIGTERM
(turned into ``SystemExit(143)`` while packing, so the cleanup runs). What
SIGKILL or a crash leaves (``.DIR.tmp-...`` or, mid-``overwrite``, the old
dataset as ``.DIR.old-<host>-<pid>-<n>``) is swept by the next ``create`` of
the same ``DIR`` on the same host, once the pid in its name is no longer alive.

Splits. ``split_by="identity"``: identities (with their co-twins: a twin pair
is never split) are shuffled by ``seed`` and dealt to the splits by sample
count deficit, every split with a positive ratio getting at least one
identity group when there are enough; samples without an identity are split
by sample. ``split_by="sample"``: each identity's samples are shuffled and cut
by the ratios (at least one per split with a positive ratio when the identity
has enough samples). Samples used by protocol pairs are pinned to
``pairs_split`` (with ``identity`` splits, their whole identity groups).
Within a split the samples are shuffled by ``seed`` before writing. A source
may fix the splits itself (``Scan.splits``, e.g. ``folder`` input with
``ROOT/{train,val,test}/``): those are kept as they are and ``splits`` /
``split_by`` / ``pairs_split`` are not used.

Faults (missing file, undecodable image or array, bad CSV row, box outside
the image, ...) are listed in the report (printed, and ``DIR/report.json``)
and the samples skipped; with ``strict`` any fault fails the run
(:class:`StrictFailure`) and nothing is written.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import atomic
from .atomic import staging_path
from .manifest import FORMAT, MANIFEST_NAME, TOOL_VERSION, Manifest, ShardEntry
from .sources import Fault, InputError, Item, SampleError, Scan, get_source, natural_key
from .writer import ShardSplitWriter

REPORT_NAME = "report.json"

log = logging.getLogger("shards.build")


class StrictFailure(RuntimeError):
    """``--strict`` and the input had faults; ``faults`` lists them."""

    def __init__(self, faults: list[Fault]):
        super().__init__(f"{len(faults)} fault(s) in the input (--strict): first: {faults[0]}")
        self.faults = faults


@dataclass
class CreateResult:
    out_dir: Path
    manifest: Manifest
    report: dict[str, Any]
    seconds: float
    samples: int

    @property
    def rate(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def parse_splits(text: str) -> list[tuple[str, float]]:
    """``"train=0.8,val=0.1,test=0.1"`` -> [(name, ratio)] (ratios normalised to sum 1)."""
    out: list[tuple[str, float]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        name = name.strip()
        try:
            r = float(val) if eq else float("nan")
        except ValueError:
            r = float("nan")
        if not name or not math.isfinite(r) or r < 0:
            raise InputError(f"--splits: {part!r} is not NAME=RATIO with RATIO >= 0")
        if not all(c.isalnum() or c in "_-" for c in name):
            raise InputError(f"--splits: split name {name!r} may only hold letters, digits, '_' and '-'")
        if name in (n for n, _ in out):
            raise InputError(f"--splits: split {name!r} given twice")
        out.append((name, r))
    total = sum(r for _, r in out)
    if not out or total <= 0:
        raise InputError(f"--splits: {text!r}: need at least one split with a positive ratio")
    return [(n, r / total) for n, r in out]


# ---------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------
def _allocate(n: int, ratios: list[float], min_each: int) -> list[int]:
    """n items by ratios (largest remainder); at least ``min_each`` for each positive ratio when possible."""
    want = [n * r for r in ratios]
    got = [int(math.floor(w)) for w in want]
    for i in sorted(range(len(ratios)), key=lambda i: (want[i] - got[i], -i), reverse=True)[: n - sum(got)]:
        got[i] += 1
    pos = [i for i, r in enumerate(ratios) if r > 0]
    if min_each and n >= min_each * len(pos):
        for i in pos:
            while got[i] < min_each:
                j = max(range(len(got)), key=lambda j: got[j])
                got[j] -= 1
                got[i] += 1
    return got


def _twin_groups(identities: list[str], twin_pairs: list[tuple[str, str]]) -> dict[str, str]:
    """identity -> group representative (union-find over twin pairs)."""
    parent = {i: i for i in identities}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in twin_pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb, key=natural_key)] = min(ra, rb, key=natural_key)
    return {i: find(i) for i in identities}


def assign_splits(items: list[Item], splits: list[tuple[str, float]], split_by: str, seed: int,
                  twin_pairs: list[tuple[str, str]] = (), pinned: dict[str, str] | None = None
                  ) -> dict[str, list[Item]]:
    """Split name -> items (shuffled). See the module doc."""
    names = [n for n, _ in splits]
    ratios = [r for _, r in splits]
    pinned = pinned or {}
    rng = random.Random(f"splits-{seed}")
    out: dict[str, list[Item]] = {n: [] for n in names}
    labelled = [it for it in items if it.identity is not None]
    unlabelled = [it for it in items if it.identity is None]
    if split_by == "identity":
        ids = sorted({it.identity for it in labelled}, key=natural_key)
        known = set(ids)
        group_of = _twin_groups(ids, [p for p in twin_pairs if p[0] in known and p[1] in known])
        groups: dict[str, list[Item]] = collections.defaultdict(list)
        for it in labelled:
            groups[group_of[it.identity]].append(it)
        have = [0] * len(names)
        free: list[str] = []
        for g in sorted(groups, key=natural_key):
            pin = next((pinned[it.key] for it in groups[g] if it.key in pinned), None)
            if pin is not None:
                out[pin].extend(groups[g])
                have[names.index(pin)] += len(groups[g])
            else:
                free.append(g)
        rng.shuffle(free)
        total = len(labelled)
        target = [total * r for r in ratios]
        for si in range(len(names)):  # every split with a positive ratio gets a group first
            if free and ratios[si] > 0 and have[si] == 0:
                g = free.pop()
                out[names[si]].extend(groups[g])
                have[si] += len(groups[g])
        for g in free:
            si = max(range(len(names)), key=lambda s: (target[s] - have[s], -s))
            out[names[si]].extend(groups[g])
            have[si] += len(groups[g])
        by_sample = [("", unlabelled)] if unlabelled else []
    else:
        per_id: dict[str, list[Item]] = collections.defaultdict(list)
        for it in labelled:
            per_id[it.identity].append(it)
        by_sample = [(i, per_id[i]) for i in sorted(per_id, key=natural_key)]
        if unlabelled:
            by_sample.append(("", unlabelled))
    for _, group in by_sample:
        rest = []
        for it in group:
            if it.key in pinned:
                out[pinned[it.key]].append(it)
            else:
                rest.append(it)
        rest = [rest[j] for j in _perm(rng, len(rest))]
        counts = _allocate(len(rest), ratios, 1)
        pos = 0
        for name, c in zip(names, counts):
            out[name].extend(rest[pos:pos + c])
            pos += c
    for name in names:
        lst = out[name]
        out[name] = [lst[j] for j in _perm(random.Random(f"order-{seed}-{name}"), len(lst))]
    return out


def _perm(rng: random.Random, n: int) -> list[int]:
    idx = list(range(n))
    rng.shuffle(idx)
    return idx


# ---------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------
_LOADER: Callable[[Item], dict[str, Any]] | None = None


def _init_worker(loader) -> None:
    global _LOADER
    _LOADER = loader
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass


def _init_pool_worker(loader) -> None:
    # a forked worker inherits the parent's SIGTERM-raises handler; the pool's
    # terminate() must simply end it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(loader)


def _load(item: Item) -> tuple[str, dict[str, Any] | None, Fault | None]:
    try:
        return item.key, _LOADER(item), None
    except SampleError as e:
        return item.key, None, Fault(e.kind, item.origin, e.detail)


def _load_all(loader, items: list[Item], workers: int) -> Iterator[tuple[str, dict[str, Any] | None, Fault | None]]:
    """Results in item order (so the shards do not depend on the worker count)."""
    if workers <= 1 or len(items) < 2:
        _init_worker(loader)
        for it in items:
            yield _load(it)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=(loader,))
    try:
        yield from pool.imap(_load, items, chunksize=max(1, min(16, len(items) // (workers * 8) or 1)))
        # Done: let the workers finish on their own. terminate() (the context
        # manager's exit) signals workers that may not have installed their
        # SIGTERM disposition yet, and joining such a worker can block.
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------
class _Stats:
    """Per field: pixel sums (first split) and image size min/max/sum (all splits)."""

    def __init__(self):
        self.pix: dict[str, list[Any]] = {}
        self.size: dict[str, list[Any]] = {}  # [min w, min h], [max w, max h], [sum w, sum h], n

    def add(self, name: str, f, pixels: bool) -> None:
        if pixels and f.stats is not None:
            s, s2, n = f.stats
            acc = self.pix.setdefault(name, [np.zeros_like(s, dtype=np.float64), np.zeros_like(s, dtype=np.float64), 0])
            if acc[0].shape == s.shape:
                acc[0] += s
                acc[1] += s2
                acc[2] += n
        if f.size is not None:
            w, h = f.size
            acc = self.size.setdefault(name, [[w, h], [w, h], [0, 0], 0])
            acc[0] = [min(acc[0][0], w), min(acc[0][1], h)]
            acc[1] = [max(acc[1][0], w), max(acc[1][1], h)]
            acc[2] = [acc[2][0] + w, acc[2][1] + h]
            acc[3] += 1

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, (s, s2, n) in self.pix.items():
            if n <= 0:
                continue
            mean = s / n
            std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0))
            out[k] = {"mean": [round(float(m), 5) for m in mean], "std": [round(float(x), 5) for x in std]}
        for k, (lo, hi, tot, n) in self.size.items():
            d = out.setdefault(k, {})
            for j, nm in enumerate(("width", "height")):
                d[nm] = {"min": int(lo[j]), "max": int(hi[j]), "mean": round(tot[j] / n, 2)}
        return out


# ---------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------
def sweep_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders (``.DIR.tmp-<host>-<pid>-<n>``) and set-aside old
    datasets (``.DIR.old-...``) of ``out`` that a killed ``create`` left: named for
    this host and a pid no longer alive. An old dataset goes only when its
    replacement ``out`` is complete (a SIGKILL between the two renames of
    ``_install`` leaves it the only copy)."""
    return atomic.sweep_stale_staging(out, ("tmp", "old") if (out / MANIFEST_NAME).is_file() else ("tmp",))


class _SigtermGuard:
    """While packing, SIGTERM (``kill``, a scheduler's stop) raises
    ``SystemExit(143)`` in the main thread instead of ending the process on the
    spot, so the staging folder is removed on the way out; a second SIGTERM
    during that cleanup is ignored. The signal is also remembered and
    :meth:`check` raises again at the next sample: an exception raised while
    Python runs a finalizer (multiprocessing has many) is printed and dropped.
    Outside the main thread no handler can be installed: nothing changes there
    (the next ``create`` sweeps what a kill leaves)."""

    def __init__(self):
        self.received = 0
        self.previous: Any = None
        self.active = threading.current_thread() is threading.main_thread()

    def _stop(self, signum, frame):
        self.received = signum
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    def check(self) -> None:
        if self.received:
            raise SystemExit(128 + self.received)

    def __enter__(self) -> "_SigtermGuard":
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


def owned_entries(directory: Path) -> set[str] | None:
    """The paths (relative, POSIX) ``biomtl shards create`` writes into a dataset
    folder, by its manifest: the manifest, the report, each split's pairs file,
    the shards and their folders. None when ``directory`` holds no loadable
    manifest (then biomtl did not make it)."""
    try:
        manifest = Manifest.load(directory)
    except (OSError, ValueError):
        return None
    owned = {MANIFEST_NAME, REPORT_NAME} | {f"{name}_pairs.json" for name in manifest.splits}
    for entries in manifest.splits.values():
        for e in entries:
            parts = Path(e.file).parts
            owned.update(Path(*parts[:i]).as_posix() for i in range(1, len(parts) + 1))
    return owned


def foreign_entries(directory: Path) -> list[str] | None:
    """What in ``directory`` biomtl did not write (relative paths, sorted; symlinks
    count as foreign: they are not biomtl's). None when it is not a biomtl dataset."""
    owned = owned_entries(directory)
    if owned is None:
        return None
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):  # (does not follow symlinked folders)
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            relp = p.relative_to(directory).as_posix()
            if relp not in owned or p.is_symlink():
                found.append(relp)
    return sorted(found, key=natural_key)


def _check_replaceable(out: Path) -> None:
    """``--overwrite`` may replace ``out`` only when biomtl wrote all of it."""
    if out.is_symlink():  # the swap would move the link, and the old files be removed through it
        raise InputError(f"--output: {out} is a symlink; --overwrite replaces only a real folder: name its target")
    foreign = foreign_entries(out)
    if foreign is None:
        raise InputError(f"--output: {out} is not empty and biomtl did not write it (no loadable {MANIFEST_NAME}); "
                         "--overwrite replaces only a dataset made by 'biomtl shards create': pick another directory")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"--output: {out} holds files biomtl did not write ({shown}); not replaced: move them "
                         "or pick another directory")


def _check_input_output(inp: Path | None, out: Path) -> None:
    """The output is neither the input, nor inside it (a later scan would read the
    shards, and --overwrite would replace the input), nor holding it."""
    if inp is None:
        return
    i, o = inp.resolve(), out.resolve()
    if i == o:
        raise InputError(f"--output: {out} is the input; pick another directory (an input is never overwritten)")
    if inp.is_dir() and o.is_relative_to(i):
        raise InputError(f"--output: {out} is inside the input {inp}; pick a directory outside it (an input is "
                         "never overwritten)")
    if i.is_relative_to(o):
        raise InputError(f"--output: the input {inp} is inside the output {out}; pick an output that does "
                         "not hold the input (an input is never overwritten)")


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--output: {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            what = "a shard dataset" if (out / MANIFEST_NAME).exists() else "not empty"
            raise InputError(f"--output: {out} is {what}; pick another directory or pass --overwrite")
        if any(out.iterdir()):
            _check_replaceable(out)
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"--output: {out.parent} is not a directory")
    # The staging folder is made beside ``out`` (and its missing parents): say
    # now, in one line, when a file is in the way or the place is read-only.
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output: cannot create {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output: cannot create {out}: {existing} is not writable (permission denied or a "
                         f"read-only file system)")


def create(fmt: str, input_path: str | os.PathLike | None, output: str | os.PathLike, *,
           splits: str | list[tuple[str, float]] = "train=0.8,val=0.1,test=0.1", split_by: str = "identity",
           seed: int = 0, maxcount: int = 1000, maxsize: int = 1 << 30, workers: int = 1, strict: bool = False,
           overwrite: bool = False, pairs_split: str | None = None, options: argparse.Namespace | None = None,
           progress: Callable[[str, int, int], None] | None = None, argv: list[str] | None = None) -> CreateResult:
    """Pack a dataset; see the module doc. ``options``: the format options
    (argparse namespace; missing ones take the source's defaults).
    ``progress(phase, done, total)`` is called while writing."""
    t0 = time.perf_counter()
    source = get_source(fmt)
    opts = _source_options(source, options, seed)
    split_list = parse_splits(splits) if isinstance(splits, str) else [(n, float(r)) for n, r in splits]
    _check_numbers(split_by, maxcount, maxsize, workers)
    out = Path(output).absolute()
    inp = Path(input_path).expanduser() if input_path is not None else None
    if source.needs_input and inp is None:
        raise InputError(f"--input is required for --format {fmt}")
    if inp is not None and not inp.exists():
        raise InputError(f"--input: {inp} does not exist")
    for given in [inp, *source.other_inputs(opts)]:  # first: "--overwrite" must not be the hint then
        _check_input_output(given, out)
    _check_output(out, overwrite)

    scan: Scan = source.scan(inp, opts)
    faults = list(scan.faults)
    if strict and faults:  # fail before reading any image
        raise StrictFailure(faults)
    if split_by == "identity" and not any(it.identity is not None for it in scan.items):
        raise InputError(f"--split-by identity: the {fmt} input has no identities; use --split-by sample")
    if scan.splits:  # the input's own splits (train first: its pixels give the image statistics)
        order = {"train": 0, "val": 1, "test": 2}
        fixed = sorted(set(scan.splits.values()), key=lambda n: (order.get(n, 3), n))
        split_list = [(n, 1.0) for n in fixed]
    names = [n for n, _ in split_list]
    pin_to, pinned = _pinned_keys(scan, names, pairs_split)
    labels = _Labels.of(scan, faults)
    plan = _split_plan(scan, labels.items, names, split_list, split_by, seed, labels.twin_pairs, pinned)
    sweep_stale_staging(out)
    tmp = staging_path(out)
    sigterm = _SigtermGuard().__enter__()
    try:
        tmp.mkdir(parents=True)  # (and the output's parent folders)
        packed = _pack(tmp, names, plan, scan, labels, faults, workers, maxcount, maxsize, sigterm, progress)
        if strict and faults:
            raise StrictFailure(faults)
        n_written = sum(v.samples for v in packed.written.values())
        if n_written == 0:
            raise InputError(f"no readable samples in {inp} ({len(faults)} fault(s); first: "
                             f"{faults[0] if faults else 'none'})")
        pairs, dropped = _kept_pairs(scan.pairs, packed.key_split)
        report = {
            "format": fmt, "input": str(inp) if inp is not None else None,
            "scanned": len(scan.items), "written": n_written,
            "skipped": len(scan.items) - n_written,
            "faults_by_kind": dict(collections.Counter(f.kind for f in faults)),
            "faults": [f.to_dict() for f in faults],
            "ignored": list(scan.ignored),
            "pairs": {"given": len(scan.pairs), "kept": len(pairs), "dropped": dropped} if scan.pairs else None,
            "empty_splits": [n for n in names if not packed.written[n].samples],
        }
        created_with = {
            "source": fmt, "input": str(inp.resolve()) if inp is not None else None,
            "args": {"splits": [[n, r] for n, r in split_list], "split_by": split_by, "seed": seed,
                     "maxcount": maxcount, "maxsize": maxsize, "workers": workers, "strict": strict,
                     "pairs_split": pin_to,
                     **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()
                        if k not in ("seed",) and _plain(v)}},
            "notes": scan.notes,
            "command": argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest = _manifest(created_with, labels, packed, pairs)
        _write_metadata(tmp, names, pairs, report, manifest)
        sigterm.check()
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        sigterm.__exit__()
    return CreateResult(out_dir=out, manifest=manifest, report=report, seconds=time.perf_counter() - t0,
                        samples=n_written)


def _source_options(source, options: argparse.Namespace | None, seed: int) -> argparse.Namespace:
    """The source's options: its defaults, overridden by those of ``options`` it knows."""
    opts = _source_defaults(source)
    if options is not None:  # only this source's options
        for k in vars(opts):
            if hasattr(options, k):
                setattr(opts, k, getattr(options, k))
    opts.seed = seed
    return opts


def _check_numbers(split_by: str, maxcount: int, maxsize: int, workers: int) -> None:
    if split_by not in ("identity", "sample"):
        raise InputError(f"--split-by: {split_by!r} is not identity or sample")
    if maxcount < 1:
        raise InputError(f"--maxcount: must be >= 1, got {maxcount}")
    if maxsize < 1024:
        raise InputError(f"--maxsize: must be >= 1024 bytes, got {maxsize}")
    if workers < 0:
        raise InputError(f"--workers: must be >= 0, got {workers}")


def _pinned_keys(scan: Scan, names: list[str], pairs_split: str | None) -> tuple[str | None, dict[str, str]]:
    """The split the protocol pairs' samples go to, and those samples' keys -> it
    (none when the input fixes the splits itself)."""
    pin_to = None
    pinned: dict[str, str] = {}
    if scan.pairs and not scan.splits:
        pin_to = pairs_split or ("test" if "test" in names else names[-1])
        if pin_to not in names:
            raise InputError(f"--pairs-split: {pin_to!r} is not one of the splits ({', '.join(names)})")
        for k1, k2, _ in scan.pairs:
            pinned[k1] = pinned[k2] = pin_to
    return pin_to, pinned


@dataclass
class _Labels:
    """Identities (sorted names, name -> label index), twin pairs and co-twins by
    name, label schemas, and the items whose labels fit the schemas."""

    identities: list[str]
    id_index: dict[str, int]
    twin_pairs: list[tuple[str, str]]
    co_twin: dict[str, str]
    schemas: dict[str, list[str]]
    items: list[Item]

    @staticmethod
    def of(scan: Scan, faults: list[Fault]) -> "_Labels":
        """From the scan; an item with a label outside a fixed schema is a fault (appended)."""
        items = scan.items
        identities = sorted({it.identity for it in items if it.identity is not None}, key=natural_key)
        id_index = {n: i for i, n in enumerate(identities)}
        twin_pairs = [p for p in scan.twin_pairs if p[0] in id_index and p[1] in id_index]
        co_twin = {}
        for a, b in twin_pairs:
            co_twin[a], co_twin[b] = b, a
        # label schemas: fixed orders from the source, else sorted distinct values
        schemas = {k: list(v) for k, v in scan.schemas.items()}
        for it in items:
            for k, v in it.labels.items():
                if k not in scan.schemas:
                    schemas.setdefault(k, [])
                    if v not in schemas[k]:
                        schemas[k].append(v)
        for k in schemas:
            if k not in scan.schemas:
                schemas[k] = sorted(schemas[k], key=natural_key)
        good = []
        for it in items:
            bad = [f"{k}={v!r}" for k, v in it.labels.items() if v not in schemas[k]]
            if bad:
                faults.append(Fault("bad label", it.origin, ", ".join(bad)))
            else:
                good.append(it)
        return _Labels(identities, id_index, twin_pairs, co_twin, schemas, good)

    def meta(self, it: Item) -> dict[str, Any]:
        """The sample's json: the item's own fields, its identity and co-twin labels, its label indices."""
        meta = {**it.meta}
        if it.identity is not None:
            meta.update(identity=self.id_index[it.identity], identity_name=it.identity,
                        twin=self.id_index[self.co_twin[it.identity]] if it.identity in self.co_twin else -1)
        for k, v in it.labels.items():
            meta[k] = self.schemas[k].index(v)
        return meta


def _split_plan(scan: Scan, items: list[Item], names: list[str], split_list: list[tuple[str, float]],
                split_by: str, seed: int, twin_pairs: list[tuple[str, str]], pinned: dict[str, str]
                ) -> dict[str, list[Item]]:
    """Split name -> items in writing order: the input's own splits (shuffled by
    ``seed``) or :func:`assign_splits`."""
    if not scan.splits:
        return assign_splits(items, split_list, split_by, seed, twin_pairs, pinned)
    plan = {n: [it for it in items if scan.splits[it.key] == n] for n in names}
    return {n: [v[j] for j in _perm(random.Random(f"order-{seed}-{n}"), len(v))] for n, v in plan.items()}


@dataclass
class _Packed:
    """What writing the shards gave: per split its shard entries and counts, the
    split of every protocol-pair sample, the fields every sample has, the image
    statistics."""

    split_entries: dict[str, list[ShardEntry]]
    written: dict[str, _SplitCount]
    key_split: dict[str, str]
    modalities: set[str] | None
    stats: _Stats


def _pack(tmp: Path, names: list[str], plan: dict[str, list[Item]], scan: Scan, labels: _Labels,
          faults: list[Fault], workers: int, maxcount: int, maxsize: int, sigterm: _SigtermGuard,
          progress: Callable[[str, int, int], None] | None) -> _Packed:
    """Read, decode and write every planned sample into ``tmp``, split by split;
    a sample that fails or lacks the fields of the first one is a fault (appended)."""
    total = sum(len(v) for v in plan.values())
    pair_keys = {k for k1, k2, _ in scan.pairs for k in (k1, k2)}
    packed = _Packed({}, {n: _SplitCount(labels.schemas) for n in names}, {}, None, _Stats())
    done = 0
    for name in names:
        with ShardSplitWriter(tmp, name, maxcount=maxcount, maxsize=maxsize) as w:
            by_key = {it.key: it for it in plan[name]}
            for key, fields, fault in _load_all(scan.loader, plan[name], workers):
                done += 1
                sigterm.check()
                if progress is not None:
                    progress(name, done, total)
                if fault is not None:
                    faults.append(fault)
                    continue
                it = by_key[key]
                meta = labels.meta(it)
                meta.update(fields.pop("json", {}))
                sample = {"__key__": key, **{k: f.data for k, f in fields.items()}, "json": meta}
                keys_here = set(sample) - {"__key__"}
                if packed.modalities is None:
                    packed.modalities = keys_here
                elif keys_here != packed.modalities:
                    faults.append(Fault("inconsistent fields", it.origin,
                                        f"has {sorted(keys_here)}, others have {sorted(packed.modalities)}"))
                    continue
                w.write(sample)
                for k, f in fields.items():
                    packed.stats.add(k, f, pixels=(name == names[0]))
                packed.written[name].add(meta)
                if key in pair_keys:
                    packed.key_split[key] = name
            packed.split_entries[name] = w.close()
    return packed


def _kept_pairs(given: list[tuple[str, str, int]], key_split: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """The protocol pairs whose two samples were written into the same split, and how many were dropped."""
    pairs, dropped = [], 0
    for k1, k2, label in given:
        s1, s2 = key_split.get(k1), key_split.get(k2)
        if s1 is None or s2 is None or s1 != s2:
            dropped += 1
            continue
        pairs.append({"key1": k1, "key2": k2, "label": int(label), "split": s1})
    return pairs, dropped


def _manifest(created_with: dict[str, Any], labels: _Labels, packed: _Packed, pairs: list[dict[str, Any]]
              ) -> Manifest:
    id_index = labels.id_index
    return Manifest(
        format=FORMAT, created_with=created_with, tool_version=TOOL_VERSION, splits=packed.split_entries,
        identities=labels.identities, twin_pairs=sorted((min(id_index[a], id_index[b]), max(id_index[a], id_index[b]))
                                                        for a, b in labels.twin_pairs),
        label_schemas=labels.schemas, modalities=sorted(packed.modalities or []), image_stats=packed.stats.result(),
        pairs=pairs, split_stats=_split_stats(packed.written, packed.split_entries, labels.schemas,
                                              labels.twin_pairs, id_index))


def _write_metadata(tmp: Path, names: list[str], pairs: list[dict[str, Any]], report: dict[str, Any],
                    manifest: Manifest) -> None:
    """Each split's pairs file, the report, then the manifest (last: it marks the dataset complete)."""
    for name in names:
        sp = [{"img1": p["key1"], "img2": p["key2"], "label": p["label"]} for p in pairs if p["split"] == name]
        if sp:
            (tmp / f"{name}_pairs.json").write_text(json.dumps(sp, indent=1) + "\n")
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    manifest.save(tmp)


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, Path)) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v))


def _source_defaults(source) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    source.add_arguments(p)
    return p.parse_args([])


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    owned: set[str] = set()
    if out.exists():
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(f"--output: {out} appeared while packing; not replaced")
            _check_replaceable(out)  # again: packing took a while
            owned = owned_entries(out) or set()
            old = staging_path(out, "old")
    # no SIGTERM between setting the old dataset aside and moving the new one in
    # (it is handled right after: the new dataset is then complete)
    blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if old is not None:
            os.rename(out, old)
        elif out.exists():
            out.rmdir()
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)  # put the previous dataset back
            raise
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if old is not None:
        _remove_owned(old, owned)


def _remove_owned(old: Path, owned: set[str]) -> None:
    """Delete the set-aside dataset by name (its manifest's files, then the emptied
    folders): a file that appeared there after the last check is left, with a warning."""
    for relp in sorted(owned, key=lambda r: r.count("/"), reverse=True):
        p = old / relp
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # (a folder that is not empty: reported below)
    try:
        old.rmdir()
    except OSError:
        log.warning("the previous dataset was replaced; %s still holds files biomtl did not write, left there",
                    old)


class _SplitCount:
    """Samples, identities and label counts of one split, accumulated while writing."""

    def __init__(self, schemas: dict[str, list[str]]):
        self.samples = 0
        self.ids: set[int] = set()
        self.labels = {k: collections.Counter() for k in schemas}

    def add(self, meta: dict[str, Any]) -> None:
        self.samples += 1
        if isinstance(meta.get("identity"), int):
            self.ids.add(meta["identity"])
        for k, c in self.labels.items():
            if isinstance(meta.get(k), int):
                c[meta[k]] += 1


def _split_stats(written: dict[str, _SplitCount], entries, schemas, twin_pairs, id_index) -> dict[str, Any]:
    out = {}
    for name, cnt in written.items():
        ids = cnt.ids
        labels = {k: {names[i]: cnt.labels[k][i] for i in range(len(names)) if cnt.labels[k][i]}
                  for k, names in schemas.items()}
        out[name] = {"samples": cnt.samples, "identities": len(ids), "identity_ids": sorted(ids),
                     "twin_pairs": sum(1 for a, b in twin_pairs if id_index[a] in ids and id_index[b] in ids),
                     "bytes": sum(e.bytes for e in entries.get(name, [])), "shards": len(entries.get(name, [])),
                     "labels": labels}
    return out
