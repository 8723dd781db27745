"""``biomtl shards create`` on untrusted input: no code runs from crafted metadata
(pickles in ``.npy`` files), and FIFOs / devices among the inputs are reported,
never opened (a FIFO would block ``create`` forever)."""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import pickle
import shlex
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import create
from shards.cli import run as shards_cli
from shards.manifest import Manifest
from shards.sources import InputError, SampleError, read_npy
from tests.conftest import REPO


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = shards_cli(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def save_img(path: Path, value: int, size=(40, 30), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size[1], size[0], 3), value % 256, np.uint8)
    a[0, 0] = 255 - value % 256
    Image.fromarray(a, "RGB").save(path, format=fmt)
    return path


def packed(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: member bytes} over every shard (plain tarfile)."""
    m = Manifest.load(out)
    res: dict[str, dict[str, bytes]] = {}
    for entries in m.splits.values():
        for e in entries:
            with tarfile.open(out / e.file) as tf:
                for member in tf.getmembers():
                    key, ext = member.name.split(".", 1)
                    res.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return res


class FifoWatch:
    """Notices the code under test opening one of ``fifos`` for reading, and unblocks it
    (opens the write end non-blocking and closes it: the reader gets EOF), so a
    regression fails the test instead of hanging it."""

    def __init__(self, *fifos: Path):
        self.fifos = [str(p) for p in fifos]
        self.opened: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.fifos:
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO unless someone is reading it
                except OSError:
                    continue
                self.opened.add(p)
                os.close(fd)
            time.sleep(0.01)

    def __enter__(self) -> "FifoWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------------------
# ear: crafted pickles in the metadata .npy
# ---------------------------------------------------------------------------
class RunsShell:
    """Pickles as ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OpensFile:
    """Pickles as ``open(path, "w")`` (creates the file when unpickled)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _raw_object_npy(path: Path, pickle_bytes: bytes) -> Path:
    """A valid object-dtype .npy header followed by an arbitrary pickle."""
    from numpy.lib import format as npformat

    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(pickle_bytes)
    return path


def _evil_dict(meta: Path, marker: Path) -> tuple[Path, str]:
    np.save(meta, {"image_paths": ["a/ear0.jpg"], "bboxes": [RunsShell(f"touch {shlex.quote(str(marker))}")]},
            allow_pickle=True)
    return meta, os.system.__module__ + ".system"


def _evil_records(meta: Path, marker: Path) -> tuple[Path, str]:
    arr = np.empty(1, dtype=object)
    arr[0] = {"image_path": "a/ear0.jpg", "bbox": [1, 2, 3, 4], "identity": OpensFile(marker)}
    np.save(meta, arr, allow_pickle=True)
    return meta, f"{open.__module__}.open"


def _evil_protocol0(meta: Path, marker: Path) -> tuple[Path, str]:
    cmd = f"touch {shlex.quote(str(marker))}"
    return _raw_object_npy(meta, b"cos\nsystem\n(S" + repr(cmd).encode() + b"\ntR."), "os.system"


def _evil_eval(meta: Path, marker: Path) -> tuple[Path, str]:
    code = f"open({str(marker)!r}, 'w')"
    return _raw_object_npy(meta, pickle.dumps(_Reduce(eval, (code,)), protocol=4)), "builtins.eval"


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("craft", [_evil_dict, _evil_records, _evil_protocol0, _evil_eval],
                         ids=["dict-os.system", "records-open", "protocol0-os.system", "eval"])
def test_ear_npy_pickle_payload_is_refused_and_never_runs(craft, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    save_img(tmp_path / "a" / "ear0.jpg", 10)
    meta, refused = craft(tmp_path / "meta.npy", marker)
    out = tmp_path / "out"
    rc, o, e = cli(["create", "--format", "ear", "--input", str(meta), "--output", str(out), "--workers", "1",
                    "--split-by", "sample"], capsys)
    assert not marker.exists(), "the crafted pickle ran code"
    assert rc == 2, (rc, o, e)
    assert len(e.strip().splitlines()) == 1, e
    assert "error" in e and str(meta) in e and refused in e and "refused" in e, e
    assert not out.exists()
    with pytest.raises(InputError, match="refused"):
        create("ear", meta, tmp_path / "out2", split_by="sample")
    assert not marker.exists()


# ---------------------------------------------------------------------------
# ear: the legit .npy forms and the CSV / JSON alternatives pack the same samples
# ---------------------------------------------------------------------------
EAR_ROWS = [  # path, box, identity
    ("a/ear0.jpg", [10, 5, 30, 25], "L1"),
    ("a/ear1.jpg", [-5, -5, 10, 10], "L1"),  # partly outside: clipped
    ("b/ear0.jpg", [10, 5, 30, 25], "R2"),
    ("b/ear1.jpg", [2.5, 3, 20, 28], "R2"),
    ("c/ear0.jpg", [10, 5, 30, 25], "L3"),
    ("c/ear1.jpg", [5, 5, 2, 9], "L3"),  # x2 < x1: bad box
    ("c/missing.jpg", [1, 1, 5, 5], "L3"),  # missing file
    ("a/ear0.jpg", [100, 100, 120, 130], "L1"),  # outside the 40x30 image
]


def _ear_images(root: Path) -> Path:
    for i, (p, _, _) in enumerate(EAR_ROWS):
        if "missing" not in p and not (root / p).exists():
            save_img(root / p, i * 30)
    return root


def _write_metadata(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = [r[0] for r in EAR_ROWS]
    boxes = [r[1] for r in EAR_ROWS]
    ids = [r[2] for r in EAR_ROWS]
    out: dict[str, Path] = {}
    # the original format: np.save of a dict (a 0-d object array)
    out["npy-dict"] = d / "dict.npy"
    np.save(out["npy-dict"], {"image_paths": paths, "bboxes": boxes, "identities": ids}, allow_pickle=True)
    # the same with NumPy arrays and scalars inside
    out["npy-dict-numpy"] = d / "dict_numpy.npy"
    np.save(out["npy-dict-numpy"], {"image_paths": np.array(paths), "bboxes": np.array(boxes, dtype=np.float64),
                                    "labels": np.array(ids), "count": np.int64(len(paths)),
                                    "scale": np.float32(1.0), "ok": np.bool_(True), "z": 1 + 2j},
            allow_pickle=True)
    # an object array of records (list of dicts)
    recs = np.empty(len(EAR_ROWS), dtype=object)
    for i, (p, b, ident) in enumerate(EAR_ROWS):
        recs[i] = {"image_path": p, "bbox": b, "identity": ident}
    out["npy-records"] = d / "records.npy"
    np.save(out["npy-records"], recs, allow_pickle=True)
    # a structured array (no pickle at all)
    st = np.array([(p, *b, ident) for p, b, ident in EAR_ROWS],
                  dtype=[("image_path", "U32"), ("x1", "f8"), ("y1", "f8"), ("x2", "f8"), ("y2", "f8"),
                         ("identity", "U8")])
    out["npy-structured"] = d / "structured.npy"
    np.save(out["npy-structured"], st, allow_pickle=False)
    # JSON: the dict, and records
    out["json-dict"] = d / "dict.json"
    out["json-dict"].write_text(json.dumps({"image_paths": paths, "bboxes": boxes, "identities": ids}))
    out["json-records"] = d / "records.json"
    out["json-records"].write_text(json.dumps([{"image_path": p, "bbox": b, "identity": ident}
                                               for p, b, ident in EAR_ROWS]))
    # CSV: x1..y2 columns, and a single bbox column
    out["csv"] = d / "meta.csv"
    with open(out["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "x1", "y1", "x2", "y2", "Identity"])
        w.writerows([[p, *b, ident] for p, b, ident in EAR_ROWS])
    out["csv-bbox"] = d / "meta_bbox.csv"
    with open(out["csv-bbox"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "bbox", "label"])
        w.writerows([[p, " ".join(str(v) for v in b), ident] for p, b, ident in EAR_ROWS])
    return out


def test_ear_npy_json_csv_metadata_pack_the_same_samples(tmp_path):
    imgs = _ear_images(tmp_path / "imgs")
    metas = _write_metadata(tmp_path / "meta")
    results = {}
    for name, meta in metas.items():
        out = tmp_path / f"out-{name}"
        r = create("ear", meta, out, split_by="sample", splits="train=1", options=ns(root=imgs))
        m = Manifest.load(out)
        kinds = sorted(f["kind"] for f in r.report["faults"])
        assert kinds == ["bad box", "box outside image", "missing file"], (name, r.report["faults"])
        assert m.identities == ["L1", "L3", "R2"], name
        assert m.modalities == ["image.jpg", "json"], name
        results[name] = packed(out)
    ref = results["npy-dict"]
    assert sorted(ref) == ["a_ear0", "a_ear1", "b_ear0", "b_ear1", "c_ear0"]
    x = json.loads(ref["a_ear0"]["json"])
    assert x["bbox"] == [8, 3, 32, 27] and x["bbox_raw"] == [10, 5, 30, 25] and x["identity_name"] == "L1"
    assert json.loads(ref["a_ear1"]["json"])["bbox_clipped"] is True
    assert ref["b_ear1"]["image.jpg"] == (imgs / "b/ear1.jpg").read_bytes()
    for name, res in results.items():
        assert res == ref, f"{name} packs other samples than the original .npy dict"


def test_ear_formats_listing_documents_the_metadata_formats(capsys):
    rc, o, _ = cli(["formats"], capsys)
    assert rc == 0
    line = next(ln for ln in o.splitlines() if ln.startswith("ear"))
    assert ".npy" in line and ".csv" in line and ".json" in line and "image_path" in line
    from shards.sources import ear

    assert "SafeUnpickler" in ear.__doc__ and "META.csv" in ear.__doc__ and "META.json" in ear.__doc__


def test_ear_bad_metadata_is_a_one_line_error(tmp_path, capsys):
    cases = {
        "float.npy": lambda p: np.save(p, np.zeros((3, 4))),
        "nodict.json": lambda p: p.write_text(json.dumps({"paths": []})),
        "bad.json": lambda p: p.write_text("{not json"),
        "nocols.csv": lambda p: p.write_text("file,identity\na.jpg,x\n"),
        "trunc.npy": lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"),
    }
    for name, write in cases.items():
        p = tmp_path / name
        write(p)
        rc, o, e = cli(["create", "--format", "ear", "--input", str(p), "--output", str(tmp_path / "o")], capsys)
        assert rc == 2 and len(e.strip().splitlines()) == 1 and str(p) in e, (name, e)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# no unsafe loaders anywhere in shards/
# ---------------------------------------------------------------------------
def test_shards_code_has_no_unsafe_loads():
    bad = []
    for path in sorted((REPO / "shards").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name in ("eval", "exec") and not owner:
                bad.append(f"{where}: {name}()")
            if owner in ("pickle", "cPickle", "dill", "marshal", "shelve") and name in ("load", "loads", "open"):
                bad.append(f"{where}: {owner}.{name}()")
            if owner == "torch" and name == "load":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append(f"{where}: torch.load() without weights_only=True")
            if name == "load" and owner in ("np", "numpy"):
                a = kw.get("allow_pickle")
                if not (isinstance(a, ast.Constant) and a.value is False):
                    bad.append(f"{where}: np.load() without allow_pickle=False")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                loader = kw.get("Loader")
                if not (isinstance(loader, ast.Attribute) and "Safe" in loader.attr):
                    bad.append(f"{where}: yaml.{name}() without a SafeLoader")
            if "allow_pickle" in kw and isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value:
                bad.append(f"{where}: allow_pickle=True")
    assert not bad, bad


# ---------------------------------------------------------------------------
# photometric: read_npy never unpickles
# ---------------------------------------------------------------------------
def test_read_npy_refuses_object_arrays_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "albedo.npy"
    np.save(p, np.array([RunsShell(f"touch {shlex.quote(str(marker))}")], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError) as ei:
        read_npy(p)
    assert ei.value.kind == "undecodable array"
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1 and str(p) in msg and "object array" in msg and "pickle" in msg, msg
    assert not marker.exists()
    np.save(tmp_path / "ok.npy", np.ones((2, 2, 3), np.float32))
    f, arr = read_npy(tmp_path / "ok.npy")
    assert arr.shape == (2, 2, 3) and f.data == (tmp_path / "ok.npy").read_bytes()


@needs_fifo
@pytest.mark.timeout(180)
def test_photometric_object_array_and_fifo_map_are_faults(tmp_path):
    marker = tmp_path / "PWNED"
    root = tmp_path / "ph"
    rows = []
    for ident in range(4):
        d = root / "data" / str(ident) / "s1"
        d.mkdir(parents=True)
        rows.append([ident, "s1", "Male" if ident % 2 else "Female"])
    np.save(root / "data/0/s1/albedo.npy", np.ones((4, 4, 3), np.float32))
    np.save(root / "data/1/s1/albedo.npy", np.array([RunsShell(f"touch {shlex.quote(str(marker))}")],
                                                    dtype=object), allow_pickle=True)
    fifo = root / "data/2/s1/albedo.npy"
    os.mkfifo(fifo)
    np.save(root / "data/3/s1/albedo.npy", np.zeros((4, 4, 3), np.float32))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "session", "Gender"])
        w.writerows(rows)
    with FifoWatch(fifo) as watch:
        r = create("photometric", root, tmp_path / "out", split_by="sample", splits="train=1",
                   options=ns(maps="albedo"))
    assert not watch.opened, "the FIFO was opened"
    assert not marker.exists()
    by_kind = {f["kind"]: f for f in r.report["faults"]}
    assert set(by_kind) == {"undecodable array", "not a regular file"}, r.report["faults"]
    assert "object array" in by_kind["undecodable array"]["detail"]
    assert by_kind["not a regular file"]["where"] == "data/2/s1" and "FIFO" in by_kind["not a regular file"]["detail"]
    assert r.samples == 2 and r.report["skipped"] == 2


# ---------------------------------------------------------------------------
# FIFOs and devices: skipped, reported, never opened
# ---------------------------------------------------------------------------
@needs_fifo
@pytest.mark.timeout(180)
def test_folder_fifo_and_device_images_are_skipped_not_opened(tmp_path, capsys):
    root = tmp_path / "raw"
    for i in range(3):
        for k in range(3):
            save_img(root / f"id{i}" / f"{k}.png", i * 10 + k, size=(12, 10), fmt="PNG")
    fifo = root / "id1" / "fifo.png"
    os.mkfifo(fifo)
    if os.path.exists("/dev/null"):  # a symlink out of the input: the whole input is refused (issue 22)
        os.symlink("/dev/null", root / "id2" / "null.png")
        rc, o, e = cli(["create", "--format", "folder", "--input", str(root), "--output", str(tmp_path / "o"),
                        "--workers", "1", "--split-by", "sample", "--splits", "train=1"], capsys)
        assert rc == 2 and "id2/null.png" in e and "outside the input" in e and not (tmp_path / "o").exists()
        os.unlink(root / "id2" / "null.png")
    out = tmp_path / "out"
    with FifoWatch(fifo) as watch:
        rc, o, e = cli(["create", "--format", "folder", "--input", str(root), "--output", str(out),
                        "--workers", "1", "--split-by", "sample", "--splits", "train=1"], capsys)
    assert not watch.opened, "the FIFO was opened"
    assert rc == 0, e
    rep = json.loads((out / "report.json").read_text())
    faults = {f["where"]: f for f in rep["faults"]}
    assert faults["id1/fifo.png"]["kind"] == "not a regular file" and "FIFO" in faults["id1/fifo.png"]["detail"]
    n_special = 1
    assert len(rep["faults"]) == n_special
    assert rep["written"] == 9 and rep["skipped"] == n_special
    assert "not a regular file" in e and "id1/fifo.png" in e  # printed too
    assert Manifest.load(out).modalities == ["image.png", "json"]


@needs_fifo
@pytest.mark.timeout(180)
def test_thz_fifo_csv_and_image_are_reported_not_opened(tmp_path):
    root = tmp_path / "thz"
    root.mkdir()
    for ident in ("p1", "p2", "p3"):
        for posture in ("b1b", "n1n"):
            name = f"{ident}_{posture}_1.png"
            if name != "p3_b1b_1.png":
                save_img(root / "img" / name, len(name), size=(8, 8), fmt="PNG")
    fifo_img = root / "img" / "p3_b1b_1.png"
    os.mkfifo(fifo_img)
    fifo_csv = root / "more.csv"
    os.mkfifo(fifo_csv)
    with open(root / "triplets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["anchor", "positive", "negative"])
        w.writerow(["p1_b1b_1.png", "p1_n1n_1.png", "p2_b1b_1.png"])
        w.writerow(["p2_b1b_1.png", "p2_n1n_1.png", "p1_b1b_1.png"])
        w.writerow(["p3_b1b_1.png", "p3_n1n_1.png", "p1_b1b_1.png"])
    with FifoWatch(fifo_img, fifo_csv) as watch:
        r = create("thz", root, tmp_path / "out", split_by="sample", splits="train=1")
    assert not watch.opened, f"opened: {watch.opened}"
    faults = {f["where"]: f for f in r.report["faults"]}
    assert faults["more.csv"]["kind"] == "not a regular file"
    assert [f["kind"] for w, f in faults.items() if w != "more.csv"] == ["not a regular file"]
    assert r.samples == 2


@needs_fifo
@pytest.mark.timeout(180)
def test_ear_fifo_metadata_and_image(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    save_img(imgs / "a" / "ear0.jpg", 1)
    save_img(imgs / "b" / "ear0.jpg", 2)
    fifo_img = imgs / "a" / "ear1.jpg"
    os.mkfifo(fifo_img)
    fifo_meta = tmp_path / "meta.json"
    os.mkfifo(fifo_meta)
    with FifoWatch(fifo_meta, fifo_img) as watch:
        rc, o, e = cli(["create", "--format", "ear", "--input", str(fifo_meta), "--output", str(tmp_path / "o")],
                       capsys)
        assert rc == 2 and len(e.strip().splitlines()) == 1 and "FIFO" in e and str(fifo_meta) in e, e
        meta = tmp_path / "meta.csv"
        meta.write_text("image_path,x1,y1,x2,y2\na/ear0.jpg,1,1,20,20\na/ear1.jpg,1,1,20,20\nb/ear0.jpg,1,1,9,9\n")
        r = create("ear", meta, tmp_path / "out", split_by="sample", splits="train=1", options=ns(root=imgs))
    assert not watch.opened, f"opened: {watch.opened}"
    assert [(f["kind"], f["where"]) for f in r.report["faults"]] == [("not a regular file", "a/ear1.jpg")]
    assert r.samples == 2
