"""Writes the RecordIO test data of ``tests/shards/test_recordio.py`` with MXNet itself.

Run with a Python that has MXNet and Pillow (not biomtl's venv), e.g.::

    python3 -m venv /tmp/mxvenv && /tmp/mxvenv/bin/pip install mxnet "numpy<1.24" pillow
    /tmp/mxvenv/bin/python tests/data/recordio/make_fixtures.py /work/shared/data/orl_faces

(the committed files were written by mxnet 1.9.1). Two datasets, from real ORL faces
re-encoded small:

* ``ms1m/``: insightface's layout (``train.rec``, ``train.idx``, ``property``):
  record 0 has ``flag=2`` and label ``(first identity record, end)``; images are the
  keys ``1 .. label[0]-1`` (JPEG, scalar labels), one of them (``VECTOR_KEY``) with
  a vector label ``[identity, 0.5]``, one (``SPLIT_KEY``) holding MXNet's magic twice
  at 4-byte aligned places of its payload (a JPEG comment), so MXNet's writer splits
  it into a start, a middle and an end chunk; then one identity record per identity
  (label ``(first image key, end)``), which are not images.
* ``plain/``: no header record: record 0 is an image (flag 0), every key of the
  index is an image (PNG), labels 10 and 11.

``expected.json`` holds, per dataset and record key, the identity label, the
sha256 of the image bytes and the ORL file they came from.
"""
import hashlib
import io
import json
import sys
from pathlib import Path

import mxnet as mx
from PIL import Image

HERE = Path(__file__).resolve().parent
MAGIC = (0xCED7230A).to_bytes(4, "little")
VECTOR_KEY = 5
SPLIT_KEY = 7


def encode(path: Path, size, fmt: str) -> bytes:
    img = Image.open(path).convert("L").resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def with_magic_comment(jpeg: bytes) -> bytes:
    """A JPEG comment segment right after SOI holding the magic at JPEG offsets 8 and 16:
    with the 24-byte IRHeader in front both are 4-byte aligned in the record's payload."""
    text = b"xx" + MAGIC + b"abcd" + MAGIC + b"biomtl"
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def write(folder: Path, records: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    w = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    for key, label, payload in records:
        w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, label, key, 0), payload))
    w.close()


def main(orl: Path) -> None:
    expected = {"ms1m": {}, "plain": {}}
    people, per = ["s1", "s2", "s3", "s4"], 3
    images, ranges, key = [], [], 1
    for ident, person in enumerate(people):
        first = key
        for k in range(1, per + 1):
            data = encode(orl / person / f"{k}.pgm", (46, 56), "JPEG")
            if key == SPLIT_KEY:
                data = with_magic_comment(data)
            label = [float(ident), 0.5] if key == VECTOR_KEY else float(ident)
            images.append((key, label, data))
            expected["ms1m"][str(key)] = {"label": ident, "sha256": hashlib.sha256(data).hexdigest(),
                                          "source": f"{person}/{k}.pgm"}
            key += 1
        ranges.append((first, key))
    first_id = key
    identity_records = [(first_id + i, [float(a), float(b)], b"") for i, (a, b) in enumerate(ranges)]
    header = (0, [float(first_id), float(first_id + len(people))], b"")
    write(HERE / "ms1m", [header] + images + identity_records)
    (HERE / "ms1m" / "property").write_text(f"{len(people)},56,46\n")

    plain = []
    for key, (person, k, label) in enumerate([("s5", 1, 10), ("s5", 2, 10), ("s6", 1, 11), ("s6", 2, 11)]):
        data = encode(orl / person / f"{k}.pgm", (23, 28), "PNG")
        plain.append((key, float(label), data))
        expected["plain"][str(key)] = {"label": label, "sha256": hashlib.sha256(data).hexdigest(),
                                       "source": f"{person}/{k}.pgm"}
    write(HERE / "plain", plain)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
