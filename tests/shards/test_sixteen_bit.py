"""Issue 22 point 2: high-bit-depth grey images (16-bit ``I;16``/``I;16B``, 32-bit ``I``,
float ``F``) decode to the 8-bit pixels they stand for, everywhere one decoder
(``shards.images``) is used: packing, the shard reader, the recipes' image input and
inference (``biomtl verify``: tests/dist_train/test_sixteen_bit_verify.py). Pillow's own
``convert`` clips them at 255: a 16-bit face became an all-white picture."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from recipes.image_input import pick_rgb_image
from shards.build import create
from shards.images import UnsupportedImage, open_image, to_8bit
from shards.manifest import Manifest
from shards.reading import decode_sample, read_images_by_key
from tests.conftest import shared_dataset


def orl_face(person: int, shot: int = 1) -> np.ndarray:
    """A real 8-bit face (ORL, 92x112 grey)."""
    with Image.open(shared_dataset("orl_faces") / f"s{person}" / f"{shot}.pgm") as im:
        return np.asarray(im.convert("L"))


def as_16bit(a8: np.ndarray, mode: str = "I;16") -> Image.Image:
    """The same picture with 16-bit samples: v * 257 (0..255 -> 0..65535)."""
    a16 = a8.astype(np.uint16) * 257
    if mode == "I;16B":
        return Image.frombytes("I;16B", (a8.shape[1], a8.shape[0]), a16.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(a16.astype(np.int32), "I")
    return Image.fromarray(a16)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_faces_come_back_as_their_8bit_pixels(mode):
    a8 = orl_face(1)
    img = as_16bit(a8, mode)
    assert img.mode == mode
    assert np.array_equal(np.asarray(to_8bit(img)), a8)
    assert np.asarray(img.convert("L")).mean() > 250 > a8.mean()  # what Pillow alone does: white


def test_a_16bit_png_file_and_pgm_decode_to_the_8bit_pixels(tmp_path):
    a8 = orl_face(2)
    png = tmp_path / "face16.png"
    as_16bit(a8).save(png)
    with Image.open(png) as im:
        assert im.mode == "I;16"  # really stored with 16 bits
    assert np.array_equal(np.asarray(open_image(png)), a8)
    pgm = tmp_path / "face16.pgm"  # maxval 65535: Pillow opens it as "I"
    pgm.write_bytes(b"P5\n92 112\n65535\n" + (a8.astype(">u2") * 257).tobytes())
    assert np.array_equal(np.asarray(open_image(pgm)), a8)


def test_float_images_in_0_1_map_and_others_are_refused_in_one_line():
    a8 = orl_face(3)
    f = Image.fromarray(a8.astype(np.float32) / 255.0, "F")
    assert np.array_equal(np.asarray(to_8bit(f)), a8)
    for bad in (Image.fromarray(a8.astype(np.float32), "F"),                      # 0..255 floats
                Image.fromarray(np.full((4, 4), np.nan, np.float32), "F"),
                Image.fromarray(np.full((4, 4), 70000, np.int32), "I"),           # beyond 16 bits
                Image.fromarray(np.full((4, 4), -3, np.int32), "I")):
        with pytest.raises(UnsupportedImage) as e:
            to_8bit(bad, "x.tif")
        assert str(e.value).startswith("x.tif: ") and "\n" not in str(e.value)


def test_packed_16bit_faces_decode_in_training_like_the_8bit_originals(tmp_path):
    """Two people, 16-bit PNGs packed by `shards create`: the reader, the recipes'
    image input and the manifest statistics give what the 8-bit originals give."""
    originals = {}
    for tag, root, to_file in (("8", tmp_path / "raw8", lambda a: Image.fromarray(a)),
                               ("16", tmp_path / "raw16", as_16bit)):
        for person in (1, 2):
            for shot in (1, 2):
                a8 = orl_face(person, shot)
                originals[f"s{person}_{shot}"] = a8
                p = root / f"s{person}" / f"{shot}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                to_file(a8).save(p)
        create("folder", root, tmp_path / f"shards{tag}", splits="train=1", split_by="sample")
    assert Manifest.load(tmp_path / "shards16").image_stats["image.png"]["mean"] == \
        Manifest.load(tmp_path / "shards8").image_stats["image.png"]["mean"]
    import webdataset as wds

    m = Manifest.load(tmp_path / "shards16")
    raw = list(wds.WebDataset([str(tmp_path / "shards16" / e.file) for e in m.splits["train"]], shardshuffle=False))
    assert len(raw) == 4
    for s in raw:
        assert Image.open(io.BytesIO(s["image.png"])).mode == "I;16"  # the shard keeps the 16-bit original
        sample = decode_sample(s)
        a8 = originals[sample["__key__"]]
        assert np.array_equal(np.asarray(sample["image.png"]), a8)
        assert np.array_equal(np.asarray(pick_rgb_image(sample))[..., 0], a8)
    pictures = read_images_by_key(tmp_path / "shards16", "train", ["s1_1", "s2_2"])
    assert np.array_equal(np.asarray(pictures["s2_2"]), originals["s2_2"])
