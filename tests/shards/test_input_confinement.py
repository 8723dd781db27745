"""Issue 22 point 7: ``biomtl shards create`` reads only files inside its input.
A path that a CSV, annotation, metadata file or ``dataset_infor.json`` names, or a
symlink in the tree, that leads outside the dataset is refused by one rule
(``shards.sources.inside_input``): one line, exit 2, no output folder, and the
outside file never packed. Every source is tested with every way out it can name."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.cli import run as shards_cli

SECRET_VALUE = 201  # the outside file's pixels: found in a shard = it was read


def _img(path: Path, value: int, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (10, 12, 3) if mode == "RGB" else (10, 12)
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)
    return path


def _secret(tmp_path: Path, name: str) -> Path:
    """A valid image (or array) outside the dataset: packing it would succeed."""
    p = tmp_path / "outside" / name
    if name.endswith(".npy"):
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, np.full((8, 8), SECRET_VALUE, np.float32))
        return p
    return _img(p, SECRET_VALUE)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


# --- one builder per source: (format, input, extra CLI args) with `way` out planted --------------------
def thz(tmp_path: Path, way: str):
    root = tmp_path / "thz"
    rows = []
    for ident in ("p1", "p2"):
        for k in ("01", "02"):
            a, p = f"{ident}_b1b_{k}.png", f"{ident}_n1n_{k}.png"
            _img(root / a, 10)
            _img(root / p, 20)
            rows.append({"anchor": a, "positive": p, "negative": f"{'p2' if ident == 'p1' else 'p1'}_n1n_{k}.png"})
    secret = _secret(tmp_path, "p1_b2b_09.png")
    named = {"absolute": str(secret), "dotdot": "../outside/p1_b2b_09.png", "symlink": "p1_b2b_09.png"}[way]
    if way == "symlink":
        _link(root / "p1_b2b_09.png", secret)
    rows.append({"anchor": named, "positive": "p1_n1n_01.png", "negative": "p2_n1n_01.png"})
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return "thz", root, ["--split-by", "sample"]


def facecom(tmp_path: Path, way: str):
    root = tmp_path / "fc"
    recs = []
    for i in range(4):
        _img(root / "images" / f"{i}.png", 10 * i)
        recs.append({"image": f"{i}.png", "identity": f"p{i % 2}"})
    secret = _secret(tmp_path, "s.png")
    named = {"absolute": str(secret), "dotdot": "../../outside/s.png", "symlink": "s.png"}[way]
    if way == "symlink":
        _link(root / "images" / "s.png", secret)
    recs.append({"image": named, "identity": "p0"})
    (root / "annotations.json").write_text(json.dumps(recs))
    return "facecom", root, ["--split-by", "sample"]


def photometric(tmp_path: Path, way: str):
    root = tmp_path / "ph"
    rows = [["id", "session"]]
    for ident in ("1", "2"):
        for s in ("s1", "s2"):
            d = root / "data" / ident / s
            d.mkdir(parents=True)
            np.save(d / "depth.npy", np.zeros((8, 8), np.float32))
            rows.append([ident, s])
    secret = _secret(tmp_path, "depth.npy")
    if way == "absolute":  # data / "/tmp/x" is "/tmp/x": <id>/<session> = the outside folder
        rows.append([str(secret.parent.parent), "outside"])
    elif way == "dotdot":
        rows.append(["../..", "outside"])
    else:
        _link(root / "data" / "3" / "s1", secret.parent)
        rows.append(["3", "s1"])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return "photometric", root, ["--split-by", "sample"]


def folder(tmp_path: Path, way: str):
    root = tmp_path / "faces"
    for i in range(2):
        for k in range(2):
            _img(root / f"id{i}" / f"{k}.png", 10 * i + k)
    secret = _secret(tmp_path, "s.png")
    if way == "symlink":  # an image symlinked out of the tree
        _link(root / "id0" / "s.png", secret)
    else:  # a whole identity folder symlinked out
        _link(root / "id9", secret.parent)
    return "folder", root, ["--split-by", "sample"]


def dataset_infor(tmp_path: Path, way: str):
    root = tmp_path / "dcal"
    listed: dict[str, list[str]] = {}
    for i in range(2):
        for k in range(2):
            _img(root / "train" / f"id{i}" / f"{k}.png", 10 * i + k)
            listed.setdefault(f"id{i}", []).append(f"id{i}/{k}.png")
    secret = _secret(tmp_path, "s.png")
    named = {"absolute": str(secret), "dotdot": "../../outside/s.png", "symlink": "id0/s.png"}[way]
    if way == "symlink":
        _link(root / "train" / "id0" / "s.png", secret)
    listed["id0"].append(named)
    (root / "train" / "dataset_infor.json").write_text(json.dumps(listed))
    return "folder", root, []


def cmu(tmp_path: Path, way: str):
    root = tmp_path / "cmu"
    for ident in ("an2i", "bpm"):
        for pose in ("left", "right"):
            _img(root / ident / f"{ident}_{pose}_happy_open_2.pgm", 30)
    secret = _secret(tmp_path, "an2i_up_happy_open_2.pgm")
    if way == "symlink":
        _link(root / "an2i" / "an2i_up_happy_open_2.pgm", secret)
    else:
        _link(root / "zed", secret.parent)
        secret.rename(secret.parent / "zed_up_happy_open_2.pgm")
    return "cmu", root, ["--split-by", "sample"]


def ear(tmp_path: Path, way: str):
    root = tmp_path / "ears"
    recs = []
    for ident in ("a", "b"):
        for k in range(2):
            _img(root / ident / f"{k}.png", 40 + k, "RGB")
            recs.append({"image_path": f"{ident}/{k}.png", "bbox": [1, 1, 8, 8], "identity": ident})
    secret = _secret(tmp_path, "s.png")
    named = {"absolute": str(secret), "dotdot": "../outside/s.png", "symlink": "a/s.png"}[way]
    if way == "symlink":
        _link(root / "a" / "s.png", secret)
    recs.append({"image_path": named, "bbox": [1, 1, 8, 8], "identity": "a"})
    (root / "meta.json").write_text(json.dumps(recs))
    return "ear", root / "meta.json", ["--split-by", "sample"]


CASES = [(thz, w) for w in ("absolute", "dotdot", "symlink")] + \
        [(facecom, w) for w in ("absolute", "dotdot", "symlink")] + \
        [(photometric, w) for w in ("absolute", "dotdot", "symlink")] + \
        [(dataset_infor, w) for w in ("absolute", "dotdot", "symlink")] + \
        [(ear, w) for w in ("absolute", "dotdot", "symlink")] + \
        [(folder, w) for w in ("symlink", "symlinked folder")] + \
        [(cmu, w) for w in ("symlink", "symlinked folder")]


@pytest.mark.parametrize("build,way", CASES, ids=[f"{b.__name__}-{w}" for b, w in CASES])
def test_a_path_out_of_the_input_is_refused_in_one_line(tmp_path, capsys, build, way):
    fmt, inp, extra = build(tmp_path, way)
    out = tmp_path / "out"
    rc = shards_cli(["create", "--format", fmt, "--input", str(inp), "--output", str(out), "--workers", "1",
                     "--splits", "train=1", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "outside" in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("build", [thz, facecom, photometric, dataset_infor, ear, folder, cmu])
def test_the_same_inputs_pack_without_the_way_out(tmp_path, build):
    """The refusal is about the planted path only: each builder's dataset packs when
    the planted entry stays inside (a symlink to a file inside the input is fine)."""
    from shards.build import create

    fmt, inp, _ = build(tmp_path, "symlink")
    root = inp if inp.is_dir() else inp.parent
    if fmt == "photometric":
        (root / "data" / "3" / "s1").unlink()
        _link(root / "data" / "3" / "s1", root / "data" / "1" / "s1")
    for link in [p for p in root.rglob("*") if p.is_symlink() and p.is_file()]:
        inside = next(q for q in root.rglob("*") if q.is_file() and not q.is_symlink()
                      and q.suffix == link.suffix)
        link.unlink()
        link.symlink_to(inside)
    res = create(fmt, inp, tmp_path / "ok", splits="train=1", split_by="sample")
    assert res.samples == 5 and not [f for f in res.report["faults"] if "outside" in f["kind"]]
