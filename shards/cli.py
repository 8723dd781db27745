"""``biomtl shards``: pack raw datasets into WebDataset shards, inspect, verify.

    biomtl shards create --format FORMAT --input PATH --output DIR [--maxcount N] [--maxsize BYTES]
                         [--splits train=0.8,val=0.1,test=0.1] [--split-by identity|sample] [--seed S]
                         [--workers N] [--strict] [--overwrite] [format options]
    biomtl shards info DIR [--json]
    biomtl shards verify DIR [--split NAME ...]        (DIR: also http(s)://, s3://, pipe:CMD with {})
    biomtl shards upload DIR s3://BUCKET/PREFIX [--overwrite]
    biomtl shards formats

Exit codes: 0 fine; 1 faults (``create --strict`` with bad inputs, ``verify``
with a faulty shard or sample); 2 a usage error (bad argument, missing input,
output exists): one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MAX_LISTED = 30


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ...``), exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500000000, 500M, 1G)") from None
    if v < 1024:
        raise argparse.ArgumentTypeError(f"must be >= 1024 bytes, got {text!r}")
    return v


def _location(text: str):
    """A shard folder (Path) or a remote dataset (kept a str: Path folds '//')."""
    from .remote import dataset_root

    try:
        return dataset_root(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser(prog: str = "biomtl shards") -> argparse.ArgumentParser:
    from .sources import SOURCES, get_source

    p = _Parser(prog=prog, description="Pack raw datasets into WebDataset shards with a manifest; "
                                       "inspect and verify shard directories.")
    sub = p.add_subparsers(dest="cmd", metavar="{create,info,verify,upload,formats}", parser_class=_Parser)
    c = sub.add_parser("create", help="pack a raw dataset", description="Pack a raw dataset into "
                       "DIR/{split}/shard-%06d.tar + DIR/manifest.json + DIR/report.json.")
    c.add_argument("--format", required=True, choices=list(SOURCES), metavar="FORMAT",
                   help=f"input layout: {', '.join(SOURCES)}")
    c.add_argument("--input", type=Path, help="the raw dataset (a folder; for ear the metadata .npy, .json or .csv; "
                   "for recordio also a .rec file)")
    c.add_argument("--output", type=Path, required=True, help="the shard directory to create")
    c.add_argument("--maxcount", type=_positive, default=1000, help="samples per shard (default 1000)")
    c.add_argument("--maxsize", type=_size, default=1 << 30, help="bytes per shard (default 1G)")
    c.add_argument("--splits", default="train=0.8,val=0.1,test=0.1", help="NAME=RATIO,... (default %(default)s)")
    c.add_argument("--split-by", choices=["identity", "sample"], default="identity",
                   help="identity: identity-disjoint splits, twins together (default); sample: closed set")
    c.add_argument("--pairs-split", help="the split the --pairs samples go to (default test, else the last)")
    c.add_argument("--seed", type=int, default=0, help="split/order seed (and the synthetic generator's)")
    c.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decode/encode processes (default min(4, CPUs))")
    c.add_argument("--strict", action="store_true", help="fail (exit 1, nothing written) on any bad input")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DIR (after the new one is done)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name in SOURCES:
        get_source(name).add_arguments(c)
    i = sub.add_parser("info", help="summary table of a shard directory")
    i.add_argument("dir", type=_location, help="a shard folder, http(s)://HOST/DIR, s3://BUCKET/PREFIX or pipe:COMMAND with {}")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    v = sub.add_parser("verify", help="checksums and a decode of every sample; exit 1 on any fault")
    v.add_argument("dir", type=_location, help="a shard folder, http(s)://HOST/DIR, s3://BUCKET/PREFIX or pipe:COMMAND with {}")
    v.add_argument("--split", action="append", help="only this split (repeatable)")
    v.add_argument("--no-progress", action="store_true")
    u = sub.add_parser("upload", help="put a shard folder on S3 (the manifest last)",
                       description="Upload the files biomtl wrote in DIR to s3://BUCKET/PREFIX, manifest.json "
                                   "last (credentials and AWS_ENDPOINT_URL from the environment).")
    u.add_argument("dir", type=Path)
    u.add_argument("destination", help="s3://BUCKET/PREFIX")
    u.add_argument("--overwrite", action="store_true", help="replace a dataset already at the destination")
    sub.add_parser("formats", help="list the input formats")
    return p


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _err(prog: str, msg: str, code: int = 2) -> int:
    print(f"{prog}: error: {str(msg).splitlines()[0] if msg else 'failed'}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace, prog: str, argv: list[str]) -> int:
    from .build import StrictFailure, create
    from .sources import InputError

    con = _console(stderr=True)
    show = not args.no_progress and con.is_terminal
    progress = task = None
    if show:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=con, transient=False)
        progress.start()
        task = progress.add_task("packing", total=None, rate="")
    import time

    t0 = time.perf_counter()

    def on_progress(split: str, done: int, total: int) -> None:
        if progress is not None and (done % 8 == 0 or done == total):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=done, total=total, description=f"packing {split}",
                            rate=f"{rate:.0f} img/s")

    try:
        res = create(args.format, args.input, args.output, splits=args.splits, split_by=args.split_by,
                     seed=args.seed, maxcount=args.maxcount, maxsize=args.maxsize, workers=args.workers,
                     strict=args.strict, overwrite=args.overwrite, pairs_split=args.pairs_split, options=args,
                     progress=on_progress, argv=["biomtl", "shards", *argv])
    except StrictFailure as e:
        if progress is not None:
            progress.stop()
        _print_faults(con, [f.to_dict() for f in e.faults])
        return _err(prog, f"{len(e.faults)} fault(s) in the input and --strict: nothing written", 1)
    except (InputError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if progress is not None:
            progress.stop()
        return _err(prog, str(e))
    except OSError as e:  # disk full while packing: the staging folder is already removed
        if progress is not None:
            progress.stop()
        where = f"{e.filename}: " if e.filename else f"{args.output}: "
        return _err(prog, f"{where}{e.strerror or e}", 1)
    if progress is not None:
        progress.stop()
    out = _console()
    m, rep = res.manifest, res.report
    sizes = ", ".join(f"{k}={m.split_size(k)}" for k in m.splits)
    out.print(f"wrote {res.out_dir}  ({sizes}; {len(m.identities)} identities, {len(m.twin_pairs)} twin pairs; "
              f"{res.samples} samples in {res.seconds:.1f} s = {res.rate:.0f} samples/s)")
    if rep["faults"]:
        _print_faults(con, rep["faults"])
        out.print(f"{rep['skipped']} sample(s) skipped; the full list is in {res.out_dir / 'report.json'}")
    for line in rep["ignored"]:
        out.print(f"ignored: {line}", markup=False)
    if rep.get("empty_splits"):
        out.print(f"[yellow]warning:[/] empty split(s): {', '.join(rep['empty_splits'])} (too few samples or "
                  "identities for the ratios)")
    if rep.get("pairs"):
        out.print(f"pairs: {rep['pairs']['kept']} kept, {rep['pairs']['dropped']} dropped")
    return 0


def _print_faults(con, faults: list[dict[str, str]]) -> None:
    import collections

    by = collections.Counter(f["kind"] for f in faults)
    con.print(f"[yellow]{len(faults)} fault(s):[/] " + ", ".join(f"{k} {n}" for k, n in by.most_common()))
    for f in faults[:MAX_LISTED]:
        con.print(f"  {f['kind']}: {f['where']}" + (f"  ({f['detail']})" if f.get("detail") else ""),
                  markup=False)
    if len(faults) > MAX_LISTED:
        con.print(f"  ... and {len(faults) - MAX_LISTED} more")


def cmd_info(args: argparse.Namespace, prog: str) -> int:
    from .check import summary

    try:
        s = summary(args.dir)
    except (OSError, ValueError) as e:  # OSError: a remote dataset that does not answer (one line naming it)
        return _err(prog, str(e))
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    from rich.table import Table

    con = _console()
    con.print(f"[bold]{s['directory']}[/]  {s['format']}  source={s['source']}  tool {s['tool_version']}"
              + (f"  created {s['created']}" if s.get("created") else ""))
    con.print(f"identities {s['identities']}, twin pairs {s['twin_pairs']}, protocol pairs {s['pairs']}; "
              f"modalities: {', '.join(s['modalities'])}")
    t = Table(title="splits")
    for col in ("split", "shards", "samples", "identities", "twin pairs", "bytes"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for name, st in s["splits"].items():
        t.add_row(name, str(st["shards"]), str(st["samples"]), str(st["identities"]), str(st["twin_pairs"]),
                  _fmt_bytes(st["bytes"]))
    tot = {k: sum(st[k] for st in s["splits"].values()) for k in ("shards", "samples", "bytes")}
    t.add_row("[bold]total", str(tot["shards"]), str(tot["samples"]), str(s["identities"]), str(s["twin_pairs"]),
              _fmt_bytes(tot["bytes"]))
    con.print(t)
    splits = list(s["splits"])
    for label, names in s["label_schemas"].items():
        lt = Table(title=f"label {label}")
        lt.add_column("class")
        for sp in splits:
            lt.add_column(sp, justify="right")
        for nm in names:
            lt.add_row(nm, *[str(s["splits"][sp]["labels"].get(label, {}).get(nm, 0)) for sp in splits])
        con.print(lt)
    if s["image_stats"]:
        it = Table(title="image statistics")
        for col in ("field", "width", "height", "mean", "std"):
            it.add_column(col)
        for k, st in s["image_stats"].items():
            wh = [f"{st[d]['min']}-{st[d]['max']}" if d in st else "" for d in ("width", "height")]
            it.add_row(k, *wh, " ".join(f"{x:.3f}" for x in st.get("mean", [])),
                       " ".join(f"{x:.3f}" for x in st.get("std", [])))
        con.print(it)
    return 0


def cmd_verify(args: argparse.Namespace, prog: str) -> int:
    from .check import verify

    con = _console(stderr=True)
    show = not args.no_progress and con.is_terminal
    progress = task = None
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=con)
        progress.start()
        task = progress.add_task("verify", total=None)

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress.update(task, completed=done, total=total)

    try:
        res = verify(args.dir, args.split, progress=on_progress)
    except (OSError, ValueError, KeyError) as e:
        if progress is not None:
            progress.stop()
        return _err(prog, str(e.args[0]) if isinstance(e, KeyError) else str(e))
    finally:
        if progress is not None:
            progress.stop()
    out = _console()
    if res.ok:
        out.print(f"OK: {res.shards} shards, {res.samples} samples: checksums match, every sample decodes")
        return 0
    out.print(f"FAULTY: {len(res.problems)} problem(s) in {res.shards} shards / {res.samples} samples:")
    for p in res.problems:
        out.print(f"  {p.split}: {p}", markup=False)
    return 1


def cmd_upload(args: argparse.Namespace, prog: str) -> int:
    from .remote import RemoteError
    from .upload import UploadError, upload

    try:
        n = upload(args.dir, args.destination, overwrite=args.overwrite)
    except (UploadError, ValueError, RemoteError) as e:  # bad input: not a dataset, a dataset there, credentials
        return _err(prog, str(e))
    except OSError as e:
        return _err(prog, f"{args.destination}: {e}", 1)
    print(f"uploaded {n} files of {args.dir} to {args.destination}")
    return 0


def run(argv: list[str] | None = None, prog: str = "biomtl shards") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if not argv:
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (2) or --help (0)
        return e.code if isinstance(e.code, int) else 0
    if args.cmd == "create":
        return cmd_create(args, f"{prog} create", argv)
    if args.cmd == "info":
        return cmd_info(args, f"{prog} info")
    if args.cmd == "verify":
        return cmd_verify(args, f"{prog} verify")
    if args.cmd == "upload":
        return cmd_upload(args, f"{prog} upload")
    if args.cmd == "formats":
        from .sources import SOURCES, get_source

        for name in SOURCES:
            print(f"{name:12s} {get_source(name).help}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(run())
