"""The ear source (issue 14): subject folders without boxes (AMI), metadata paths
that lead outside the dataset, and the synthetic ear modality."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import create
from shards.sources import InputError
from tests.conftest import shared_dataset


def _samples(out: Path) -> dict[str, dict]:
    import webdataset as wds

    from shards.manifest import Manifest

    m = Manifest.load(out)
    files = [str(out / e.file) for v in m.splits.values() for e in v]
    return {s["__key__"]: s for s in wds.WebDataset(files, shardshuffle=False)}


def _subjects(root: Path, n: int = 3, per: int = 2) -> Path:
    for i in range(n):
        for k in range(per):
            p = root / f"{i:03d}" / f"{i:03d}_v{k}_ear.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((30, 20, 3), 40 * i + k, np.uint8)).save(p)
    return root


def test_subject_folders_pack_whole_image_boxes_with_identities(tmp_path):
    root = _subjects(tmp_path / "ami")
    r = create("ear", root, tmp_path / "out", splits="train=0.67,test=0.33", split_by="identity")
    s = _samples(tmp_path / "out")
    assert len(s) == 6 and not r.report["faults"]
    meta = json.loads(s["000_000_v0_ear"]["json"])
    assert meta["bbox_raw"] == [0.0, 0.0, 20.0, 30.0] and meta["bbox"] == [0, 0, 20, 30]   # buffer clipped away
    assert s["000_000_v0_ear"]["image.jpg"] == (root / "000" / "000_v0_ear.jpg").read_bytes()
    names = {json.loads(x["json"])["identity"] for x in s.values()}
    assert names == {0, 1, 2}


@pytest.mark.parametrize("way_out", ["../secret.jpg", "absolute", "link.jpg"])
def test_metadata_paths_outside_the_root_refuse_the_input(tmp_path, way_out):
    """The one rule of every source (issue 22): refused in one line, nothing written
    (was: a fault per entry, the rest packed). An absolute path inside the root is fine."""
    root = _subjects(tmp_path / "ds")
    secret = tmp_path / "secret.jpg"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(secret)
    (root / "link.jpg").symlink_to(secret)
    meta = root / "meta.json"
    meta.write_text(json.dumps([
        {"image_path": "000/000_v0_ear.jpg", "bbox": [1, 1, 10, 10], "identity": "a"},
        {"image_path": "000/000_v1_ear.jpg", "bbox": [1, 1, 10, 10], "identity": "a"},
        {"image_path": str(root / "001" / "001_v0_ear.jpg"), "bbox": [1, 1, 5, 5], "identity": "c"},
    ]))
    r = create("ear", meta, tmp_path / "ok", splits="train=1", split_by="sample")
    assert len(_samples(tmp_path / "ok")) == 3 and not r.report["faults"]
    records = json.loads(meta.read_text())
    records.append({"image_path": str(secret) if way_out == "absolute" else way_out, "bbox": [1, 1, 5, 5],
                    "identity": "b"})
    meta.write_text(json.dumps(records))
    with pytest.raises(InputError, match="leads outside the input"):
        create("ear", meta, tmp_path / "out", splits="train=1", split_by="sample")
    assert not (tmp_path / "out").exists()


def test_a_root_option_with_a_folder_input_is_refused(tmp_path):
    import argparse

    root = _subjects(tmp_path / "ami")
    with pytest.raises(InputError, match="--root"):
        create("ear", root, tmp_path / "out", options=argparse.Namespace(root=root))
    assert not (tmp_path / "out").exists()


def test_ami_ears_pack_as_subject_folders(tmp_path):
    data = shared_dataset("ami_ears")
    subjects = sorted(p.name for p in data.iterdir() if p.is_dir())[:3]
    small = tmp_path / "ami3"
    for s in subjects:                                    # three subjects, copied
        shutil.copytree(data / s, small / s)
    r = create("ear", small, tmp_path / "out", splits="train=0.67,test=0.33", split_by="identity")
    samples = _samples(tmp_path / "out")
    assert len(samples) == 21 and not r.report["faults"]
    meta = json.loads(samples[f"{subjects[0]}_{subjects[0]}_back_ear"]["json"])
    assert meta["bbox_raw"] == [0.0, 0.0, 492.0, 702.0]


def test_the_originals_train_and_val_files_keep_their_split(tmp_path):
    """``--input train_teacher.npy --val-input val_teacher.npy`` (the original's two files, dicts
    {'image_paths', 'bboxes'}): the train and val splits are those files, not a ratio."""
    import argparse

    root = _subjects(tmp_path / "ds", n=4, per=2)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    train, val = names[:5], names[5:]
    for path, part in ((root / "train_teacher.npy", train), (root / "val_teacher.npy", val)):
        np.save(path, {"image_paths": part, "bboxes": [[1, 1, 15, 25]] * len(part)}, allow_pickle=True)
    opts = argparse.Namespace(val_input=root / "val_teacher.npy")
    r = create("ear", root / "train_teacher.npy", tmp_path / "out", splits="train=0.5,test=0.5", options=opts)
    m = r.manifest
    assert set(m.splits) == {"train", "val"} and m.created_with["notes"]["splits_from"] == "--input / --val-input"
    from tests.shards.test_sources import samples_of

    for split, part in (("train", train), ("val", val)):
        assert sorted(x["json"]["path"] for x in samples_of(tmp_path / "out", split)) == part
    with pytest.raises(InputError, match="--val-input"):
        create("ear", root, tmp_path / "out2", options=opts)          # a folder --input has no val file
    assert not (tmp_path / "out2").exists()
    (tmp_path / "o3").mkdir()
    shutil.copy(root / "val_teacher.npy", tmp_path / "o3" / "val_teacher.npy")
    with pytest.raises(InputError, match="inside the output"):      # the val file is an input too
        create("ear", root / "train_teacher.npy", tmp_path / "o3",
               options=argparse.Namespace(val_input=tmp_path / "o3" / "val_teacher.npy"))
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["val_teacher.npy"]
