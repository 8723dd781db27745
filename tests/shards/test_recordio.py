"""``biomtl shards create --format recordio``: insightface's MXNet RecordIO read without MXNet.

The ``.rec``/``.idx`` files under ``tests/data/recordio/`` were written by MXNet
1.9.1 itself (``mx.recordio.MXIndexedRecordIO`` + ``mx.recordio.pack`` in a side
virtual environment, ``tests/data/recordio/make_fixtures.py``) from real ORL
faces: the reader is checked against an independent writer. ``expected.json``
holds, per record key, the label and the sha256 of the image bytes MXNet packed.
Broken inputs are made here by damaging copies of those files.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
from pathlib import Path

import pytest
import webdataset as wds

from PIL import Image

from shards.build import create
from shards.manifest import Manifest
from shards.sources import InputError
from shards.stream import build_train_loader
from tests.shards.test_sources import check_dataset, cli, samples_of

DATA = Path(__file__).resolve().parent.parent / "data" / "recordio"
EXPECTED = json.loads((DATA / "expected.json").read_text())
MAGIC = 0xCED7230A
SPLIT_KEY, VECTOR_KEY = 7, 5  # (make_fixtures.py)


def copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / name, tmp_path / name))


def offsets(ds: Path) -> dict[int, int]:
    return {int(k): int(o) for k, o in (line.split("\t") for line in (ds / "train.idx").read_text().splitlines())}


def chunk_flags(rec: bytes, offset: int) -> list[int]:
    """The continuation flags of the chunks of the record at ``offset`` (read here, from the format)."""
    flags = []
    while True:
        magic, lrec = struct.unpack_from("<II", rec, offset)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        if flags[-1] in (0, 3):
            return flags
        offset += 8 + ((lrec & (2 ** 29 - 1)) + 3) // 4 * 4


def by_record(out: Path) -> dict[int, dict]:
    """Record key -> the sample as stored (image bytes undecoded, json parsed)."""
    m = Manifest.load(out)
    urls = [str(out / e.file) for v in m.splits.values() for e in v]
    got = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        s["json"] = json.loads(s["json"])
        got[s["json"]["record"]] = s
    return got


def assert_refused(argv: list[str], out: Path, capsys, *needles: str) -> str:
    rc, _, err = cli(argv + ["--output", str(out), "--workers", "1", "--no-progress"], capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


@pytest.fixture(scope="module")
def ms1m(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "ms1m"
    create("recordio", DATA / "ms1m", out, workers=1)
    return out


def test_insightface_layout_packs_every_image_with_its_bytes_and_identity(ms1m):
    m = check_dataset(ms1m)  # (shards verify included)
    assert m.modalities == ["image.jpg", "json"] and m.created_with["source"] == "recordio"
    assert m.identities == ["id_0", "id_1", "id_2", "id_3"]
    got = by_record(ms1m)
    # record 0's header range: images are keys 1 .. label[0]-1; record 0 and the identity records are not images
    assert sorted(got) == sorted(int(k) for k in EXPECTED["ms1m"]) == list(range(1, 13))
    for key, want in EXPECTED["ms1m"].items():
        s = got[int(key)]
        assert hashlib.sha256(s["image.jpg"]).hexdigest() == want["sha256"], key
        assert s["json"]["identity_name"] == f"id_{want['label']}"
        assert m.identities[s["json"]["identity"]] == f"id_{want['label']}"
        assert s["__key__"] == f"id_{want['label']}_{key}"
    report = json.loads((ms1m / "report.json").read_text())
    assert report["written"] == 12 and report["faults"] == []
    assert report["ignored"] == ["record 0 (header) and 4 identity record(s)"]
    assert m.created_with["notes"]["header0"] == [13, 17]
    assert m.created_with["notes"]["property"] == {"num_classes": 4, "height": 56, "width": 46}
    assert m.image_stats["image.jpg"]["width"]["min"] == 46 and m.image_stats["image.jpg"]["height"]["max"] == 56
    decoded = {s["json"]["record"]: s["image.jpg"] for s in samples_of(ms1m)}  # what training decodes
    for key, s in got.items():
        assert decoded[key].tobytes() == Image.open(io.BytesIO(s["image.jpg"])).convert("L").tobytes()


def test_split_record_and_vector_label(ms1m):
    rec = (DATA / "ms1m" / "train.rec").read_bytes()
    idx = offsets(DATA / "ms1m")
    # what the fixture holds, read from the format here: MXNet split record 7 at the two magics
    assert chunk_flags(rec, idx[SPLIT_KEY]) == [1, 2, 3]
    assert chunk_flags(rec, idx[VECTOR_KEY]) == [0]
    assert struct.unpack_from("<I", rec, idx[VECTOR_KEY] + 8)[0] == 2  # IRHeader flag: 2 label values
    got = by_record(ms1m)
    split = got[SPLIT_KEY]["image.jpg"]
    assert split.count(struct.pack("<I", MAGIC)) == 2  # the magic put back between the chunks
    assert hashlib.sha256(split).hexdigest() == EXPECTED["ms1m"][str(SPLIT_KEY)]["sha256"]
    assert got[SPLIT_KEY]["image.jpg"] is not None and got[SPLIT_KEY]["json"]["identity_name"] == "id_2"
    assert got[VECTOR_KEY]["json"]["identity_name"] == "id_1"  # label [1.0, 0.5]: the first value


def test_plain_layout_every_key_is_an_image_and_a_rec_file_is_an_input(tmp_path, capsys):
    out = tmp_path / "plain"
    rc, _, err = cli(["create", "--format", "recordio", "--input", str(DATA / "plain" / "train.rec"), "--output",
                      str(out), "--split-by", "sample", "--splits", "train=0.5,val=0.5", "--workers", "1",
                      "--no-progress"], capsys)
    assert rc == 0, err
    m = check_dataset(out)
    assert m.modalities == ["image.png", "json"] and m.identities == ["id_10", "id_11"]
    got = by_record(out)
    assert sorted(got) == [0, 1, 2, 3]
    for key, want in EXPECTED["plain"].items():
        assert hashlib.sha256(got[int(key)]["image.png"]).hexdigest() == want["sha256"]
        assert got[int(key)]["json"]["identity_name"] == f"id_{want['label']}"
    rc, o, _ = cli(["verify", str(out)], capsys)
    assert rc == 0 and o.startswith("OK")


def test_workers_do_not_change_the_shards(ms1m, tmp_path):
    create("recordio", DATA / "ms1m", tmp_path / "w2", workers=2)
    a, b = Manifest.load(ms1m), Manifest.load(tmp_path / "w2")
    assert [[e.sha256 for e in v] for v in a.splits.values()] == [[e.sha256 for e in v] for v in b.splits.values()]


def _no_idx(ds: Path) -> None:
    (ds / "train.idx").unlink()


def _offset_past_end(ds: Path) -> None:
    size = (ds / "train.rec").stat().st_size
    with open(ds / "train.idx", "a") as f:
        f.write(f"17\t{size + 40}\n")


def _bad_first_magic(ds: Path) -> None:
    rec = bytearray((ds / "train.rec").read_bytes())
    rec[0:4] = b"PK\x03\x04"
    (ds / "train.rec").write_bytes(bytes(rec))


def _truncated(ds: Path) -> None:
    rec = (ds / "train.rec").read_bytes()
    (ds / "train.rec").write_bytes(rec[: max(offsets(ds).values()) + 20])  # inside the last record


def _bad_index_line(ds: Path) -> None:
    with open(ds / "train.idx", "a") as f:
        f.write("17 one-hundred\n")


def _bad_header_range(ds: Path) -> None:
    # record 0 says the images run to key 30: the index has 17 records
    rec = bytearray((ds / "train.rec").read_bytes())
    struct.pack_into("<2f", rec, 8 + 24, 30.0, 34.0)
    (ds / "train.rec").write_bytes(bytes(rec))


@pytest.mark.parametrize("damage, needles", [
    (_no_idx, ["train.idx not found"]),
    (_offset_past_end, ["train.idx:18", "past the end of", "train.rec"]),
    (_bad_first_magic, ["train.rec", "not an MXNet RecordIO file"]),
    (_truncated, ["train.rec", "truncated"]),
    (_bad_index_line, ["train.idx:18", "key<TAB>offset"]),
    (_bad_header_range, ["train.rec", "record 0", "lacks"]),
])
def test_structural_faults_refuse_the_input_in_one_line(tmp_path, capsys, damage, needles):
    ds = copy("ms1m", tmp_path)
    damage(ds)
    assert_refused(["create", "--format", "recordio", "--input", str(ds)], tmp_path / "out", capsys, *needles)


def test_files_outside_the_input_are_not_read(tmp_path, capsys):
    ds = copy("ms1m", tmp_path)
    elsewhere = tmp_path / "elsewhere.rec"
    (ds / "train.rec").rename(elsewhere)
    (ds / "train.rec").symlink_to(elsewhere)
    assert_refused(["create", "--format", "recordio", "--input", str(ds)], tmp_path / "out", capsys,
                   "train.rec", "outside the input")
    assert_refused(["create", "--format", "recordio", "--input", str(ds / "property")], tmp_path / "out", capsys,
                   "neither a folder nor a .rec file")


def test_corrupt_records_are_counted_and_named(tmp_path, capsys):
    ds = copy("ms1m", tmp_path)
    idx = offsets(ds)
    rec = bytearray((ds / "train.rec").read_bytes())
    rec[idx[3]:idx[3] + 4] = b"\0\0\0\0"                           # no magic: a corrupt record
    payload = idx[9] + 8                                            # (one chunk)
    rec[payload + 24 + 64: idx[10]] = bytes(idx[10] - payload - 24 - 64)  # JPEG tables gone: undecodable
    struct.pack_into("<f", rec, idx[11] + 8 + 4, -1.0)             # IRHeader label -1
    (ds / "train.rec").write_bytes(bytes(rec))
    (ds / "property").write_text("3,56,46\n")                      # so id 3 (keys 10..12) is out of range
    out = tmp_path / "out"
    rc, _, err = cli(["create", "--format", "recordio", "--input", str(ds), "--output", str(out), "--workers", "1",
                      "--no-progress"], capsys)
    assert rc == 0, err
    faults = {f["where"]: f for f in json.loads((out / "report.json").read_text())["faults"]}
    assert {w: f["kind"] for w, f in faults.items()} == {
        "train.rec[3]": "corrupt record", "train.rec[9]": "undecodable image", "train.rec[10]": "bad label",
        "train.rec[11]": "bad label", "train.rec[12]": "bad label"}
    assert "no RecordIO magic" in faults["train.rec[3]"]["detail"]
    assert "-1.0" in faults["train.rec[11]"]["detail"] and "3 classes" in faults["train.rec[12]"]["detail"]
    assert "corrupt record" in err and "train.rec[3]" in err and "train.rec[9]" in err
    assert sorted(by_record(out)) == [1, 2, 4, 5, 6, 7, 8]
    check_dataset(out)
    # --strict: any of them fails the run, nothing written
    rc, _, err = cli(["create", "--format", "recordio", "--input", str(ds), "--output", str(tmp_path / "strict"),
                      "--strict", "--workers", "1", "--no-progress"], capsys)
    assert rc == 1 and "--strict" in err and not (tmp_path / "strict").exists()


def test_nothing_readable_is_one_line(tmp_path):
    ds = copy("plain", tmp_path)
    (ds / "property").write_text("1,28,23\n")  # labels 10 and 11: none is a class
    with pytest.raises(InputError, match=r"no readable image records \(4 corrupt; first: bad label"):
        create("recordio", ds, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_packed_recordio_streams_and_trains(tmp_path):
    out = tmp_path / "ms1m"
    create("recordio", DATA / "ms1m", out, workers=1, split_by="sample", splits="train=0.75,val=0.25")
    m = Manifest.load(out)

    def tf(sample, train):
        return {"size": sample["image.jpg"].size[0], "identity": sample["json"]["identity"]}

    batches = list(build_train_loader(out, "train", tf, 3, 0, 1, 0, seed=0, epoch=0))
    assert len(batches) == m.split_size("train") // 3 and all(b["size"].tolist() == [46] * 3 for b in batches)

    from dist_train.config import load_config
    from dist_train.main import train
    from recipes.base import get_recipe
    from tests.recipes.test_example_recipe import TinyRecipe  # (its import registers tiny_example)

    assert get_recipe("tiny_example") is TinyRecipe

    cfg = load_config(None, [
        "experiment.name=rec", f"experiment.output_dir={tmp_path / 'runs'}", "data.source=shards",
        f"data.shards={out}", "data.batch_size=3", "recipe.name=tiny_example", "recipe.params.img_size=8",
        "train.max_steps=2", "train.precision=fp32", "checkpoint.monitor=acc", "checkpoint.mode=max",
        "logging.progress=false", "logging.plot=false"])
    metrics = train(cfg, None)
    assert 0.0 <= metrics["acc"] <= 1.0
    run = next((tmp_path / "runs").iterdir())
    assert (run / "model.pt").is_file()
    assert len((run / "logs" / "train_logs.csv").read_text().splitlines()) == 3  # header + 2 optimizer steps
