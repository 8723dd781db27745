"""Every image member `biomtl shards create` stores is one the recipes read, and a
sample without one says what it has and what was expected, up to the final error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_train.commands import eval_cmd
from dist_train.config import load_config
from dist_train.main import train
from recipes.base import get_recipe
from recipes.image_input import IMAGE_KEYS, MissingImageError, pick_rgb_image
from shards.cli import run as shards_cli
from shards.manifest import Manifest
from shards.reading import IMAGE_EXTS
from shards.stream import build_eval_loader, build_train_loader
from shards.writer import ShardSplitWriter
from tests.conftest import REPO, tiny_overrides

IDENTITIES, PER_IDENTITY = 4, 4


def write_folder_dataset(root: Path, suffix: str, pil_format: str) -> Path:
    """``root/<identity>/<n><suffix>``: small images in one format, so the packer keeps their bytes."""
    rng = np.random.default_rng(0)
    for i in range(IDENTITIES):
        (root / f"p{i}").mkdir(parents=True)
        for n in range(PER_IDENTITY):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"p{i}" / f"{n}{suffix}", format=pil_format)
    return root


@pytest.mark.parametrize("suffix,pil_format,member", [
    (".gif", "GIF", "image.gif"),
    (".bmp", "BMP", "image.bmp"),
    # colour netpbm (P6): the packer sniffs it as ppm whatever the suffix (the folder
    # source looks for .pgm/.png/...), and stores image.ppm
    (".pgm", "PPM", "image.ppm"),
])
def test_facecom_trains_on_every_image_member_the_packer_stores(tmp_path, suffix, pil_format, member):
    raw = write_folder_dataset(tmp_path / "raw", suffix, pil_format)
    shards = tmp_path / "shards"
    assert shards_cli(["create", "--format", "folder", "--input", str(raw), "--output", str(shards),
                       "--split-by", "sample", "--workers", "0", "--no-progress"]) == 0
    assert member in Manifest.load(shards).modalities  # the packer kept the original format
    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(
        tmp_path, data__source="shards", data__shards=str(shards), data__batch_size=4, train__max_steps=1,
        recipe__params__augment="false"))
    metrics = train(cfg, None)  # raised "split 'test': no readable sample at all" before
    assert np.isfinite(metrics["loss"]) and "test_identity_top1" in metrics, metrics
    run = next((tmp_path / "runs").iterdir())
    assert (run / "submission.csv").read_text().count("\n") > 1  # the test split was read too
    # and `biomtl eval` embeds the same members (the train split: enough samples for genuine pairs)
    out = tmp_path / "eval"
    assert eval_cmd.run(["--checkpoint", str(run / "model.pt"), "--data", str(shards), "--split", "train",
                         "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    assert (out / "metrics.json").is_file()


def test_accepted_image_keys_cover_the_decoder():
    for ext in IMAGE_EXTS:
        assert f"image.{ext}" in IMAGE_KEYS and ext in IMAGE_KEYS
    img = Image.new("L", (4, 4))
    assert pick_rgb_image({"__key__": "k", "image.gif": img, "json": {}}).mode == "RGB"
    # the synthetic shards' visible image wins over their THz image
    vis = Image.new("RGB", (4, 4), (1, 2, 3))
    assert pick_rgb_image({"thz.png": img, "vis.png": vis}) is vis


def test_missing_image_says_what_the_sample_has_and_what_was_expected():
    with pytest.raises(MissingImageError) as info:
        pick_rgb_image({"__key__": "s1_0", "image.tga": b"...", "json": {}})
    msg = str(info.value)
    assert "s1_0" in msg and "it has image.tga, json" in msg
    assert "image.<ext>" in msg and all(ext in msg for ext in ("gif", "bmp", "ppm", "png"))
    assert isinstance(info.value, KeyError)  # bad data: the streams count it as a corrupt sample


def _tga_only_shards(root: Path, n: int = 6) -> Path:
    """Shards whose samples carry their image under an extension no decoder reads."""
    with ShardSplitWriter(root, "test") as w:
        for i in range(n):
            w.write({"__key__": f"s{i}", "image.tga": b"not decoded", "json": {"identity": i % 2}})
    Manifest(splits={"test": w.close()}, identities=["a", "b"], modalities=["image.tga", "json"]).save(root)
    return root


@pytest.mark.parametrize("max_corrupt_fraction", [0.01, 0.99])
def test_the_per_sample_reason_reaches_the_final_error(tmp_path, max_corrupt_fraction):
    data = _tga_only_shards(tmp_path / "d")
    recipe = get_recipe("facecom")(
        get_recipe("facecom").Params(backbone="resnet18", img_size=32), Manifest.load(data).data_info())
    reason = r"sample 's\d' has no image member: it has image\.tga, json; expected .*image\.<ext>"
    # permissive fraction: every sample is lost and the padding row finds none either
    with pytest.raises(RuntimeError, match=r"(no readable sample at all|too many corrupt).*" + reason):
        list(build_eval_loader(data, "test", recipe.transform, 4, 0, 1, max_corrupt_fraction=max_corrupt_fraction))
    with pytest.raises(RuntimeError, match=r"(too many corrupt|no decodable sample).*" + reason):
        list(build_train_loader(data, "test", recipe.transform, 2, 0, 1, 0, seed=0, epoch=0,
                                max_corrupt_fraction=max_corrupt_fraction))
