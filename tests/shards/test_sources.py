"""``biomtl shards create|info|verify`` and the format readers in shards/sources/,
each on a small fixture written here (plus ORL/CMU from ../shared/data when present)."""
from __future__ import annotations

import csv
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.build import StrictFailure, assign_splits, create, parse_splits
from shards.check import verify
from shards.cli import run as shards_cli
from shards.manifest import Manifest
from shards.sources import InputError, Item, KeyMaker, sniff
from shards.reading import decode_sample
from shards.stream import build_eval_loader, build_train_loader
from tests.conftest import PYTHON, REPO, SHARED_DATA


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def img(value: int, size=(12, 10), mode="L") -> Image.Image:
    a = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value % 256, np.uint8)
    a[0, 0] = 255 - value % 256
    return Image.fromarray(a, mode)


def save(image: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def p2_pgm(path: Path, a: np.ndarray, maxval: int = 156) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = a.shape
    body = "\n".join(" ".join(str(int(v)) for v in row) for row in a)
    path.write_text(f"P2\n{w} {h}\n{maxval}\n{body}\n")
    return path


def samples_of(out: Path, split: str | None = None) -> list[dict]:
    m = Manifest.load(out)
    res = []
    for s in ([split] if split else list(m.splits)):
        urls = [str(out / e.file) for e in m.splits[s]]
        if not urls:
            continue
        res += [decode_sample(x) for x in wds.WebDataset(urls, shardshuffle=False)]
    return res


def check_dataset(out: Path) -> Manifest:
    """What every created dataset must satisfy."""
    m = Manifest.load(out)
    assert (out / "report.json").is_file()
    assert verify(out).ok, verify(out).problems
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    for split, entries in m.splits.items():
        urls = [str(out / e.file) for e in entries]
        raw = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []  # stock webdataset
        assert len(raw) == m.split_size(split)
        for s in raw:
            assert "." not in s["__key__"] and not s["__key__"].startswith("_")
            assert {k for k in s if not k.startswith("__")} == set(m.modalities)
            meta = json.loads(s["json"])
            for k, names in m.label_schemas.items():
                if k in meta:
                    assert 0 <= meta[k] < len(names)
            if "identity" in meta:
                assert m.identities[meta["identity"]] == meta["identity_name"]
        for e in entries:  # plain tar
            names = subprocess.run(["tar", "tf", str(out / e.file)], capture_output=True, text=True,
                                   check=True).stdout.split()
            assert len(names) == e.count * len(m.modalities)
        assert m.split_stats[split]["samples"] == m.split_size(split)
    assert m.created_with["source"] and m.tool_version
    return m


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = shards_cli(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---------------------------------------------------------------------------
# fixtures: one small raw dataset per format
# ---------------------------------------------------------------------------
def make_folder(root: Path, n_ids: int = 6, per: int = 4, fmt: str = "PNG", ext: str = "png") -> Path:
    for i in range(n_ids):
        for k in range(per):
            save(img(i * 10 + k), root / f"id {i}" / f"{k}.{ext}", fmt)
    return root


@pytest.fixture
def folder_ds(tmp_path) -> Path:
    root = make_folder(tmp_path / "raw")
    (root / "id 2" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # undecodable
    (root / "id 2" / "notes.txt").write_text("not an image")
    save(img(1), root / "_trash" / "x.png")
    (tmp_path / "twins.json").write_text(json.dumps([["id 0", "id 1"], ["id 3", "nobody"], ["id 4", "id 5"]]))
    (tmp_path / "pairs.json").write_text(json.dumps([
        {"img1": "id 0/0.png", "img2": "id 0/1.png", "label": 1},
        {"img1": "id 0/2.png", "img2": "id 1/0.png", "label": 0},
        {"img1": "id 9/0.png", "img2": "id 1/0.png", "label": 0},  # no such image
    ]))
    return root


# ---------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------
def test_keys_splits_sniff():
    k = KeyMaker()
    assert k("id 0", "a.b") == "id-0_a-b" and k("id 0", "a.b") == "id-0_a-b-2" and k("_x") == "x"
    assert parse_splits("train=8,val=1,test=1") == [("train", 0.8), ("val", 0.1), ("test", 0.1)]
    for bad in ("train", "train=-1", "a=1,a=2", "a=0", "tr.ain=1"):
        with pytest.raises(InputError):
            parse_splits(bad)
    assert sniff(b"P2\n12") == "pnm-ascii" and sniff(b"\xff\xd8\xff\xe0") == "jpg"
    assert sniff(b"P5\n# c\n64 60\n255\n\x00") == "pgm" and sniff(b"P5 64 60 156\n\x00") == "pnm-slow"


def test_assign_splits_identity_disjoint_twins_together_and_pins():
    items = [Item(key=f"i{i}_{k}", identity=f"p{i}") for i in range(30) for k in range(3)]
    twins = [("p0", "p1"), ("p2", "p3"), ("p4", "p5")]
    plan = assign_splits(items, [("train", 0.8), ("val", 0.1), ("test", 0.1)], "identity", 0, twins,
                         pinned={"i7_0": "test"})
    ids = {s: {it.identity for it in v} for s, v in plan.items()}
    assert all(ids.values()) and not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    for a, b in twins:
        assert any(a in v and b in v for v in ids.values())
    assert "p7" in ids["test"]
    assert sum(len(v) for v in plan.values()) == 90
    plan = assign_splits(items, [("train", 0.5), ("test", 0.5)], "sample", 1)
    assert all({it.identity for it in plan["train"]} == {it.identity for it in plan["test"]} for _ in [0])
    assert len(plan["train"]) + len(plan["test"]) == 90


# ---------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------
def test_folder_create_twins_pairs_report(folder_ds, tmp_path, capsys):
    out = tmp_path / "out"
    rc, o, e = cli(["create", "--format", "folder", "--input", str(folder_ds), "--output", str(out),
                    "--twins", str(tmp_path / "twins.json"), "--pairs", str(tmp_path / "pairs.json"),
                    "--splits", "train=0.6,val=0.2,test=0.2", "--workers", "1", "--maxcount", "5"], capsys)
    assert rc == 0, e
    m = check_dataset(out)
    assert m.modalities == ["image.png", "json"]
    assert m.identities == [f"id {i}" for i in range(6)]
    assert m.twin_pairs == [(0, 1), (4, 5)]
    # original PNG bytes are stored as they are
    by_key = {s["__key__"]: s for s in wds.WebDataset([str(out / e.file) for v in m.splits.values() for e in v],
                                                        shardshuffle=False)}
    assert by_key["id-0_0"]["image.png"] == (folder_ds / "id 0" / "0.png").read_bytes()
    assert all(e.count <= 5 for v in m.splits.values() for e in v)
    # report: undecodable image, unknown twin, unresolvable pair; ignored things listed
    rep = json.loads((out / "report.json").read_text())
    kinds = {f["kind"] for f in rep["faults"]}
    assert kinds == {"undecodable image", "bad twin pair", "bad pair"}
    assert any("id 2/bad.png" in f["where"] for f in rep["faults"])
    assert any("_trash" in x for x in rep["ignored"]) and any("non-image" in x for x in rep["ignored"])
    assert rep["written"] == 24 and rep["skipped"] == 1
    assert "undecodable image" in e and "id 2/bad.png" in e  # printed too
    # pairs: pinned to test, in the manifest and in test_pairs.json for the evaluator
    assert m.pairs == [{"key1": "id-0_0", "key2": "id-0_1", "label": 1, "split": "test"},
                       {"key1": "id-0_2", "key2": "id-1_0", "label": 0, "split": "test"}]
    assert json.loads((out / "test_pairs.json").read_text()) == [
        {"img1": "id-0_0", "img2": "id-0_1", "label": 1}, {"img1": "id-0_2", "img2": "id-1_0", "label": 0}]
    assert m.split_stats["test"]["twin_pairs"] >= 1  # id 0 and id 1 travelled together
    test_keys = {s["__key__"] for s in samples_of(out, "test")}
    assert {"id-0_0", "id-0_1", "id-1_0"} <= test_keys
    # json labels
    s = by_key["id-1_0"]
    meta = json.loads(s["json"])
    assert meta == {"identity": 1, "identity_name": "id 1", "twin": 0, "path": "id 1/0.png"}
    # the evaluator reads the pairs file with the split's keys
    from recipes.verification import pairs_from_file

    keys = sorted(test_keys)
    pr = pairs_from_file(out / "test_pairs.json", keys)
    assert pr.label.tolist() == [True, False]


def test_folder_strict_fails_and_writes_nothing(folder_ds, tmp_path, capsys):
    out = tmp_path / "out"
    rc, o, e = cli(["create", "--format", "folder", "--input", str(folder_ds), "--output", str(out), "--strict",
                    "--workers", "1"], capsys)
    assert rc == 1 and "--strict" in e and "undecodable image" in e
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(StrictFailure):
        create("folder", folder_ds, out, strict=True)
    assert not out.exists()


def test_folder_mixed_formats_become_png_and_workers_do_not_change_shards(tmp_path):
    root = make_folder(tmp_path / "raw", n_ids=4, per=3)
    save(img(7, mode="RGB"), root / "id 1" / "extra.bmp", "BMP")
    save(img(9), root / "id 2" / "g.gif", "GIF")
    a = create("folder", root, tmp_path / "a", workers=1, split_by="sample")
    b = create("folder", root, tmp_path / "b", workers=2, split_by="sample")
    assert a.manifest.modalities == ["image.png", "json"]
    assert a.manifest.splits == b.manifest.splits  # byte-identical shards
    check_dataset(tmp_path / "a")
    s = {x["__key__"]: x for x in samples_of(tmp_path / "a")}
    assert np.array_equal(np.asarray(s["id-1_extra"]["image.png"]), np.asarray(img(7, mode="RGB")))
    assert b.manifest.image_stats["image.png"]["width"] == {"min": 12, "max": 12, "mean": 12.0}


def test_crash_midway_leaves_no_dataset(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "raw", n_ids=4, per=3)
    import shards.sources.folder as folder

    calls = {"n": 0}
    real = folder.FolderLoader.__call__

    def boom(self, item):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, item)

    monkeypatch.setattr(folder.FolderLoader, "__call__", boom)
    with pytest.raises(KeyboardInterrupt):
        create("folder", root, tmp_path / "out", workers=1, maxcount=2)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_cli_usage_errors_are_one_line_exit_2(folder_ds, tmp_path, capsys):
    cases = [
        ["create", "--format", "folder", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
        ["create", "--format", "nope", "--input", str(folder_ds), "--output", str(tmp_path / "o")],
        ["create", "--format", "folder", "--output", str(tmp_path / "o")],
        ["create", "--format", "folder", "--input", str(folder_ds), "--output", str(tmp_path / "o"),
         "--splits", "train=x"],
        ["create", "--format", "folder", "--input", str(folder_ds), "--output", str(tmp_path / "o"),
         "--maxcount", "0"],
        ["create", "--format", "folder", "--input", str(folder_ds), "--output", str(tmp_path / "o"),
         "--twins", str(tmp_path / "nope.json")],
        ["create", "--format", "folder", "--input", str(tmp_path), "--output", str(folder_ds)],  # not empty
        ["create", "--format", "ear", "--input", str(folder_ds), "--output", str(tmp_path / "o"),
         "--root", str(folder_ds)],  # a subject-folder --input is its own root
        ["info", str(tmp_path / "missing")],
        ["verify", str(folder_ds)],  # no manifest
    ]
    for argv in cases:
        rc, o, e = cli(argv, capsys)
        assert rc == 2, (argv, e)
        assert len(e.strip().splitlines()) == 1 and "error" in e, (argv, e)
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_only_when_done(folder_ds, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["create", "--format", "folder", "--input", str(folder_ds), "--output", str(out), "--workers", "1",
                "--seed", "1"], capsys)[0] == 0
    rc, _, e = cli(["create", "--format", "folder", "--input", str(folder_ds), "--output", str(out)], capsys)
    assert rc == 2 and "--overwrite" in e
    rc, _, e = cli(["create", "--format", "folder", "--input", str(folder_ds), "--output", str(out), "--workers",
                    "1", "--seed", "2", "--overwrite", "--split-by", "sample"], capsys)
    assert rc == 0 and Manifest.load(out).created_with["args"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pairs.json", "raw", "twins.json"]


def test_info_and_verify(folder_ds, tmp_path, capsys):
    out = tmp_path / "out"
    create("folder", folder_ds, out, workers=1, splits="train=0.5,test=0.5",
           options=_ns(twins=tmp_path / "twins.json"))
    rc, o, e = cli(["info", str(out)], capsys)
    assert rc == 0 and "identities" in o and "twin pairs" in o and "train" in o and "image.png" in o
    rc, o, _ = cli(["info", str(out), "--json"], capsys)
    s = json.loads(o)
    assert s["twin_pairs"] == 2 and s["splits"]["train"]["samples"] + s["splits"]["test"]["samples"] == 24
    rc, o, _ = cli(["verify", str(out)], capsys)
    assert rc == 0 and o.startswith("OK")
    # damage one PNG inside a shard: sha256 mismatch + that sample fails to decode
    m = Manifest.load(out)
    shard = out / m.splits["train"][0].file
    with tarfile.open(shard) as t:
        mem = next(x for x in t.getmembers() if x.name.endswith(".image.png"))
    data = bytearray(shard.read_bytes())
    data[mem.offset_data + 40: mem.offset_data + mem.size - 4] = b"\0" * (mem.size - 44)
    shard.write_bytes(bytes(data))
    rc, o, _ = cli(["verify", str(out)], capsys)
    key = mem.name.split(".", 1)[0]
    assert rc == 1 and "FAULTY" in o and "sha256 mismatch" in o and f"key {key}: decode failed" in o
    # a missing shard
    (out / m.splits["test"][0].file).unlink()
    rc, o, _ = cli(["verify", str(out)], capsys)
    assert rc == 1 and "missing" in o


def _ns(**kw):
    import argparse

    return argparse.Namespace(**kw)


def test_synthetic_manifest_info_without_split_stats(tmp_path, capsys):
    from shards.synthetic import SyntheticSpec, ensure_synthetic

    d = ensure_synthetic(tmp_path, SyntheticSpec(num_identities=4, samples_per_identity=3, image_size=16,
                                                 modalities=("vis",)))
    rc, o, _ = cli(["info", str(d), "--json"], capsys)
    s = json.loads(o)
    assert rc == 0 and sum(v["samples"] for v in s["splits"].values()) == 12
    assert s["splits"]["train"]["labels"]["posture"]


def test_dist_train_cli_lists_shards(tmp_path):
    out = subprocess.run([PYTHON, "-m", "dist_train.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "shards" in out.stdout
    out = subprocess.run([PYTHON, "-m", "dist_train.cli", "shards", "formats"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "photometric" in out.stdout and "synthetic" in out.stdout


# ---------------------------------------------------------------------------
# cmu
# ---------------------------------------------------------------------------
def make_cmu(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for ident in ("alice", "bob", "carol"):
        for pose in ("straight", "left"):
            for expr in ("neutral", "sad"):
                for eyes in ("open", "sunglasses"):
                    stem = f"{ident}_{pose}_{expr}_{eyes}"
                    p2_pgm(root / ident / f"{stem}.pgm", rng.integers(0, 157, (12, 16)))
                    save(img(len(stem)), root / ident / f"{stem}_2.pgm", "PPM")
    (root / "_bad").mkdir()
    (root / "_bad" / "alice_up_happy_open.bad").write_bytes(b"P2\n garbage")
    (root / "bob" / "bob_sideways_sad_open_2.pgm").write_bytes(b"P5\n1 1\n255\n\0")  # bad pose
    (root / "carol" / "bob_left_sad_open_2.pgm").write_bytes(b"P5\n1 1\n255\n\0")  # wrong folder
    return root


def test_cmu_scales_ascii_pgm_and_bad_folder(tmp_path):
    raw = make_cmu(tmp_path / "cmu")
    r1 = create("cmu", raw, tmp_path / "s1", split_by="sample", options=_ns(scale=1))
    m = check_dataset(tmp_path / "s1")
    assert m.modalities == ["image.png", "json"]  # ASCII P2 converted to PNG
    assert m.label_schemas == {"pose": ["straight", "left", "right", "up"],
                               "expression": ["neutral", "happy", "sad", "angry"], "sunglasses": ["open", "sunglasses"]}
    assert sum(m.split_size(s) for s in m.splits) == 24
    s = {x["__key__"]: x for x in samples_of(tmp_path / "s1")}
    src = (raw / "bob" / "bob_left_sad_sunglasses.pgm").read_text().split()
    vals = np.array(list(map(int, src[4:])), np.float64).reshape(12, 16)
    assert np.array_equal(np.asarray(s["bob_left_sad_sunglasses"]["image.png"]),
                          np.round(vals * 255 / 156).astype(np.uint8))  # decoded right (maxval 156)
    assert s["bob_left_sad_sunglasses"]["json"]["sunglasses"] == 1
    assert s["bob_left_sad_sunglasses"]["json"]["pose"] == 1
    rep = r1.report
    assert any("_bad" in x for x in rep["ignored"])
    assert {f["kind"] for f in rep["faults"]} == {"bad file name"} and len(rep["faults"]) == 2
    r2 = create("cmu", raw, tmp_path / "s2", split_by="identity", options=_ns(scale=2))
    assert r2.manifest.modalities == ["image.pgm", "json"]  # binary, maxval 255: kept as they are
    assert r2.manifest.image_stats["image.pgm"]["width"]["max"] == 12


def test_cmu_real_data(tmp_path):
    raw = SHARED_DATA / "cmu_faces"
    if not raw.is_dir():
        pytest.skip("../shared/data/cmu_faces not present")
    r = create("cmu", raw, tmp_path / "cmu4", options=_ns(scale=4), workers=1)
    m = check_dataset(tmp_path / "cmu4")
    assert len(m.identities) == 20 and sum(m.split_size(s) for s in m.splits) == 624
    assert r.report["faults"] == [] and any("_bad" in x and "7 files" in x for x in r.report["ignored"])
    assert m.modalities == ["image.png", "json"]  # maxval-156 PGMs: converted
    ids = [{x["json"]["identity"] for x in samples_of(tmp_path / "cmu4", s)} for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # identity-disjoint by default


def test_orl_real_data_folder(tmp_path):
    raw = SHARED_DATA / "orl_faces"
    if not raw.is_dir():
        pytest.skip("../shared/data/orl_faces not present")
    r = create("folder", raw, tmp_path / "orl", workers=2)
    m = check_dataset(tmp_path / "orl")
    assert len(m.identities) == 40 and r.samples == 400 and m.modalities == ["image.pgm", "json"]
    assert m.identities[:3] == ["s1", "s2", "s3"]  # natural order


# ---------------------------------------------------------------------------
# thz
# ---------------------------------------------------------------------------
IDENTS = ("p1", "p2", "p3", "p4")


def thz_value(ident: str, posture: int, sample: str, unconcealed: bool) -> int:
    """The grey level of make_thz's image of ``ident`` (distinct for every file)."""
    return IDENTS.index(ident) * 50 + posture * 8 + int(sample) + 3 * unconcealed


def make_thz(root: Path, visible: bool = True, csv_name: str = "triplets.csv") -> Path:
    """Rows (p<i>_b<p>b_<s>, p<i>_n<p>n_<s>, p<i+1>_n<p>n_<s>): the negative is the next
    person's positive; plus a repeated row and bad rows."""
    (root / "img").mkdir(parents=True)
    rows = []
    for n, ident in enumerate(IDENTS):
        for posture in range(1, 6):
            for sample in ("01", "02"):
                a, p = f"{ident}_b{posture}b_{sample}.png", f"{ident}_n{posture}n_{sample}.png"
                neg = f"{IDENTS[(n + 1) % len(IDENTS)]}_n{posture}n_{sample}.png"
                save(img(thz_value(ident, posture, sample, False)), root / "img" / a)
                save(img(thz_value(ident, posture, sample, True)), root / "img" / p)
                row = {"anchor": a, "positive": p, "negative": neg}
                if visible:
                    save(img(posture, mode="RGB"), root / "vis" / f"v_{a}")
                    save(img(posture + 1, mode="RGB"), root / "vis" / f"v_{p}")
                    row.update(visible_concealed=f"vis/v_{a}", visible_unconcealed=f"vis/v_{p}",
                               visible_negative=f"vis/v_{neg}")
                rows.append(row)
    rows.append(dict(rows[0]))  # repeated row
    bad = [dict(rows[0], anchor="p1_x1x_01.png"), dict(rows[1], positive="p2_n1n_01.png"),
           dict(rows[2], positive=rows[2]["anchor"]), dict(rows[3], anchor="p1_b5b_99.png"),
           dict(rows[4], negative="p1_n2n_01.png")]  # a negative of the anchor's own person
    with open(root / csv_name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + bad)
        f.write("p1_b1b_01.png,,\n")  # empty positive/negative
    return root


def test_thz_triplet_csv(tmp_path):
    raw = make_thz(tmp_path / "thz")
    r = create("thz", raw, tmp_path / "out", split_by="identity", splits="train=0.5,test=0.5")
    m = check_dataset(tmp_path / "out")
    assert m.modalities == ["json", "thz.png", "thz_negative.png", "thz_target.png", "vis.png",
                            "vis_negative.png", "vis_target.png"]
    assert m.label_schemas == {"posture": ["front", "left", "right", "up", "down"],
                               "concealed": ["unconcealed", "concealed"]}
    assert r.samples == 40  # 4 identities x 5 postures x 2 samples
    kinds = [f["kind"] for f in r.report["faults"]]
    assert kinds.count("bad csv row") == 5 and kinds.count("missing file") == 1
    assert r.manifest.created_with["notes"]["duplicate_rows"] == 1
    assert r.manifest.created_with["notes"]["splits_from"] == "drawn"
    s = {x["__key__"]: x for x in samples_of(tmp_path / "out")}
    x = s["p2_b3b_02"]
    assert x["json"]["posture"] == 2 and x["json"]["concealed"] == 1 and x["json"]["sample"] == "02"
    assert x["json"]["negative_identity"] == "p3" and x["json"]["negative_posture"] == 2
    assert np.asarray(x["thz.png"])[1, 1] == thz_value("p2", 3, "02", False)
    assert np.asarray(x["thz_target.png"])[1, 1] == thz_value("p2", 3, "02", True)
    assert np.asarray(x["thz_negative.png"])[1, 1] == thz_value("p3", 3, "02", True)   # the row's negative
    assert x["vis.png"].mode == "RGB" and x["vis_negative.png"].mode == "RGB"
    # without visible columns
    raw2 = make_thz(tmp_path / "thz2", visible=False)
    r2 = create("thz", raw2, tmp_path / "out2", split_by="sample")
    assert r2.manifest.modalities == ["json", "thz.png", "thz_negative.png", "thz_target.png"]


def test_thz_one_sample_per_csv_row(tmp_path):
    """The original trains every CSV row: an anchor named by two rows (other positive or
    negative) is two samples; only a row repeated word for word is dropped."""
    raw = make_thz(tmp_path / "thz", visible=False)
    with open(raw / "triplets.csv", "a", newline="") as f:
        f.write("p1_b1b_01.png,p1_n1n_02.png,p3_n1n_01.png\n")
    r = create("thz", raw, tmp_path / "out", split_by="sample", splits="train=1")
    assert r.samples == 41
    rows = {(x["json"]["files"]["anchor"], x["json"]["files"]["positive"], x["json"]["files"]["negative"])
            for x in samples_of(tmp_path / "out")}
    assert {("p1_b1b_01.png", "p1_n1n_01.png", "p2_n1n_01.png"),
            ("p1_b1b_01.png", "p1_n1n_02.png", "p3_n1n_01.png")} <= rows


def test_thz_csv_names_keep_their_splits(tmp_path):
    raw = make_thz(tmp_path / "thz", visible=False, csv_name="thz_train_val.csv")
    test_rows = "anchor,positive,negative\np1_b1b_01.png,p1_n1n_01.png,p2_n1n_01.png\n"
    (raw / "test_triplets.csv").write_text(test_rows)
    r = create("thz", raw, tmp_path / "out", split_by="identity", splits="train=0.5,test=0.5")  # not used
    m = r.manifest
    assert set(m.splits) == {"train", "val", "test"} and m.created_with["notes"]["splits_from"] == "csv names"
    split_of = {s: [x["json"] for x in samples_of(tmp_path / "out", s)] for s in m.splits}
    assert [(j["files"]["anchor"]) for j in split_of["test"]] == ["p1_b1b_01.png"]
    # the original's train_val cut: per (identity, posture) one of its sample numbers validates, with
    # every row of that anchor; the others train. (p1, down) also lists sample 99, whose file is missing.
    assert len(split_of["val"]) + len(split_of["train"]) == 40
    for ident in IDENTS:
        for posture in range(5):
            val = {j["sample"] for j in split_of["val"] if j["identity_name"] == ident and j["posture"] == posture}
            train = {j["sample"] for j in split_of["train"] if j["identity_name"] == ident
                     and j["posture"] == posture}
            assert not val & train and val | train == {"01", "02"}
            assert len(val) == 1 or (ident, posture) == ("p1", 4) and len(val) <= 1
    # a CSV named for no split beside named ones: one line, nothing written
    (raw / "extra.csv").write_text(test_rows)
    with pytest.raises(InputError, match="extra.csv names no split"):
        create("thz", raw, tmp_path / "out2", split_by="sample")
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------
# photometric
# ---------------------------------------------------------------------------
def make_photometric(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for ident in range(5):
        for session in ("s1", "s2", "s3"):
            d = root / "data" / str(ident) / session
            d.mkdir(parents=True)
            np.save(d / "albedo.npy", rng.random((8, 8, 3), dtype=np.float32))
            np.save(d / "normal.npy", rng.random((8, 8, 3)).astype(np.float16))
            if not (ident == 4 and session == "s3"):
                np.save(d / "depth.npy", rng.random((8, 8), dtype=np.float32))
            rows.append([ident, session, "Male" if ident % 2 else "Female", ident % 2, 0, "front", "happy"])
    np.save(root / "data" / "3" / "s2" / "albedo.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", " session", "Gender", "Spectacles", "Facial_Hair", "Pose", "Emotion"])
        w.writerows(rows)
        w.writerow([1, "", "Male", 0, 0, "front", "sad"])  # empty session
        w.writerow([1, "s1", "Male", 0, 0, "front", "sad"])  # duplicate
    return root


def test_photometric(tmp_path):
    raw = make_photometric(tmp_path / "ph")
    r = create("photometric", raw, tmp_path / "out", split_by="sample")
    m = check_dataset(tmp_path / "out")
    assert m.modalities == ["albedo.npy", "depth.npy", "json", "normal.npy"]
    assert m.label_schemas["gender"] == ["Female", "Male"] and m.label_schemas["spectacles"] == ["0", "1"]
    assert set(m.label_schemas) == {"gender", "spectacles", "facial_hair", "pose", "emotion"}
    kinds = sorted(f["kind"] for f in r.report["faults"])
    assert kinds == ["bad csv row", "bad csv row", "missing file", "undecodable array"]
    assert r.samples == 13
    s = {x["__key__"]: x for x in samples_of(tmp_path / "out")}
    assert s["1_s2"]["normal.npy"].dtype == np.float16 and s["1_s2"]["json"]["gender"] == 1
    assert s["1_s2"]["json"]["session"] == "s2" and m.identities[s["1_s2"]["json"]["identity"]] == "1"
    assert m.image_stats["albedo.npy"]["mean"] and len(m.image_stats["albedo.npy"]["mean"]) == 3
    r2 = create("photometric", raw, tmp_path / "out2", split_by="sample", options=_ns(maps="depth"))
    assert r2.manifest.modalities == ["depth.npy", "json"] and r2.samples == 14


# ---------------------------------------------------------------------------
# ear
# ---------------------------------------------------------------------------
def make_ear(root: Path) -> Path:
    paths, boxes = [], []
    for subj in ("a", "b", "c"):
        for k in range(3):
            rel = f"{subj}/ear{k}.jpg"
            save(img(k * 30, size=(40, 30), mode="RGB"), root / "imgs" / rel, "JPEG")
            paths.append(rel)
            boxes.append([10, 5, 30, 25])
    boxes[1] = [-5, -5, 10, 10]  # partly outside: clipped
    paths.append("a/ear0.jpg")
    boxes.append([100, 100, 120, 130])  # outside the 40x30 image
    paths.append("c/ear1.jpg")
    boxes.append([5, 5, 2, 9])  # x2 < x1
    paths.append("c/missing.jpg")
    boxes.append([1, 1, 5, 5])
    np.save(root / "meta.npy", {"image_paths": paths, "bboxes": boxes}, allow_pickle=True)
    return root


def test_ear_boxes_and_crop(tmp_path):
    from shards.sources.ear import buffered_box

    raw = make_ear(tmp_path / "ear")
    r = create("ear", raw / "meta.npy", tmp_path / "out", split_by="identity", splits="train=0.67,test=0.33",
               options=_ns(root=raw / "imgs"))
    m = check_dataset(tmp_path / "out")
    assert m.modalities == ["image.jpg", "json"] and m.identities == ["a", "b", "c"]
    kinds = sorted(f["kind"] for f in r.report["faults"])
    assert kinds == ["bad box", "box outside image", "missing file"]
    s = {x["__key__"]: x for x in samples_of(tmp_path / "out")}
    x = s["a_ear0"]
    assert x["json"]["bbox"] == [8, 3, 32, 27] and x["json"]["bbox_raw"] == [10, 5, 30, 25]
    assert x["image.jpg"].crop(tuple(x["json"]["bbox"])).size == (24, 24)
    assert buffered_box(x["json"]["bbox_raw"], *x["image.jpg"].size, 0.0)[0] == [10, 5, 30, 25]  # another buffer
    assert s["a_ear1"]["json"]["bbox"] == [0, 0, 12, 12] and s["a_ear1"]["json"]["bbox_clipped"]
    assert (raw / "imgs/a/ear0.jpg").read_bytes() == next(
        y for y in wds.WebDataset([str(tmp_path / "out" / e.file) for v in m.splits.values() for e in v],
                                  shardshuffle=False) if y["__key__"] == "a_ear0")["image.jpg"]
    # --identity none: only sample splits
    with pytest.raises(InputError, match="no identities"):
        create("ear", raw / "meta.npy", tmp_path / "o2", options=_ns(root=raw / "imgs", identity="none"))


# ---------------------------------------------------------------------------
# facecom
# ---------------------------------------------------------------------------
def test_facecom_schemas(tmp_path):
    raw = tmp_path / "fc"
    recs = []
    for i in range(8):
        save(img(i, mode="RGB"), raw / "images" / f"{i:04d}.jpg", "JPEG")
        recs.append({"image": f"{i:04d}.jpg", "identity": f"p{i % 4}", "gender": ["female", "male"][i % 2]})
    save(img(99), raw / "images" / "unlabelled.jpg", "JPEG")
    recs.append({"image": "0001.jpg", "identity": "p1"})  # twice
    recs.append({"gender": "male"})  # no image/identity
    (raw / "annotations.json").write_text(json.dumps(recs))
    r = create("facecom", raw, tmp_path / "out", split_by="sample", splits="train=0.5,val=0.5")
    m = check_dataset(tmp_path / "out")
    assert m.label_schemas == {"gender": ["female", "male"]} and r.samples == 8
    assert [f["kind"] for f in r.report["faults"]] == ["bad annotation", "bad annotation"]
    assert any("without an annotation" in x for x in r.report["ignored"])
    # the mapping schema and integer genders
    (raw / "annotations.json").write_text(json.dumps({f"{i:04d}.jpg": {"id": f"p{i % 4}", "gender": i % 2}
                                                      for i in range(8)}))
    r = create("facecom", raw, tmp_path / "out2", split_by="sample")
    assert r.manifest.label_schemas == {"gender": ["0", "1"]}
    s = samples_of(tmp_path / "out2")
    assert all(x["json"]["gender"] == int(x["__key__"]) % 2 for x in s)


# ---------------------------------------------------------------------------
# synthetic through create, and through the loaders
# ---------------------------------------------------------------------------
def test_synthetic_create_and_stream(tmp_path, capsys):
    out = tmp_path / "syn"
    rc, o, e = cli(["create", "--format", "synthetic", "--output", str(out), "--identities", "6", "--samples", "4",
                    "--size", "16", "--twin-fraction", "0.34", "--modalities", "vis,maps", "--workers", "1",
                    "--maxcount", "7"], capsys)
    assert rc == 0, e
    m = check_dataset(out)
    assert m.twin_pairs and set(m.label_schemas) >= {"gender", "posture", "emotion"}
    assert m.modalities == ["albedo.npy", "depth.npy", "json", "normal.npy", "vis.png"]

    def tf(s, train):
        return {"x": np.asarray(s["vis.png"], np.float32).mean(), "identity": s["json"]["identity"]}

    n = m.split_size("train")
    L = build_train_loader(out, "train", tf, 2, 0, 1, 0, seed=0, epoch=0)
    assert len(list(L)) == n // 2
    E = build_eval_loader(out, "val", tf, 2, 0, 1)
    assert sum(int(b["_valid"].sum()) for b in E) == m.split_size("val")


def test_folder_split_folders_dataset_infor_and_twin_pairs_infor(tmp_path, capsys):
    """The original DCAL layout: data/{train,val,test}/person_*/ are kept as splits (not
    redrawn: a random draw would move identities), test/dataset_infor.json lists the test
    images (a foreign absolute path found by identity + file name; a missing file is a fault;
    a path escaping ROOT refuses the input: tests/shards/test_input_confinement.py),
    twin_pairs_infor.json gives the twins without --twins."""
    root = tmp_path / "data"
    layout = {"train": ["person_1", "person_2", "person_3", "person_4"], "val": ["person_5", "person_6"],
              "test": ["person_7", "person_8"]}
    for split, people in layout.items():
        for person in people:
            for k in range(3):
                save(img(len(person) + k), root / split / person / f"{k}.png", "PNG")
    save(img(99), tmp_path / "outside.png", "PNG")
    (root / "test" / "dataset_infor.json").write_text(json.dumps({
        "person_7": ["person_7/0.png", "/kaggle/input/nd-twin/test/person_7/2.png"],
        "person_8": ["person_8/1.png", "person_8/nope.png"]}))
    (root / "twin_pairs_infor.json").write_text(json.dumps(
        {"train": [["person_1", "person_2"]], "test": [{"id1": "person_7", "id2": "person_8"}]}))
    out = tmp_path / "out"
    rc, o, e = cli(["create", "--format", "folder", "--input", str(root), "--output", str(out),
                    "--splits", "train=0.5,test=0.5", "--workers", "1"], capsys)     # --splits not used
    assert rc == 0, e
    m = Manifest.load(out)
    assert sorted(m.splits) == ["test", "train", "val"]
    names = {s: sorted(x["json"]["path"] for x in samples_of(out, s)) for s in m.splits}
    assert names["train"] == sorted(f"train/{p}/{k}.png" for p in layout["train"] for k in range(3))
    assert names["val"] == sorted(f"val/{p}/{k}.png" for p in layout["val"] for k in range(3))
    assert names["test"] == ["test/person_7/0.png", "test/person_7/2.png", "test/person_8/1.png"]
    assert m.twin_pairs == [(0, 1), (6, 7)]
    rep = json.loads((out / "report.json").read_text())
    bad = [f for f in rep["faults"] if f["kind"] == "bad dataset_infor entry"]
    assert {f["detail"] for f in bad} == {"image not found: person_8/nope.png"}
    assert m.created_with["notes"]["splits_from"] == "folders"
    assert m.created_with["notes"]["dataset_infor"] == ["test/dataset_infor.json"]
