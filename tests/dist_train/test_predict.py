"""``biomtl predict`` on a FaceCom model file (an untrained tiny model: the test checks
the format and the numbers against the model's own forward, not accuracy)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, tiny_overrides
from tests.tolerance import module_atol, softmax_atol


@pytest.fixture(scope="module")
def facecom_model(tmp_path_factory) -> Path:
    from dist_train.config import load_config, recipe_params, resolved_config_dict
    from dist_train.inference import save_exported
    from recipes.base import get_recipe
    from shards.manifest import DataInfo

    tmp = tmp_path_factory.mktemp("predict")
    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp))
    info = DataInfo(identities=tuple(f"person_{i}" for i in range(7)), twin_pairs=(),
                    label_schemas={"gender": ["female", "male"]}, modalities=("vis.png",))
    torch.manual_seed(0)
    model = get_recipe("facecom")(recipe_params(cfg), info).build_model()
    return save_exported(tmp / "model.pt", model.state_dict(), resolved_config_dict(cfg), info.to_dict())


def _images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"id{i % 2}" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_folder_matches_the_model_and_skips_bad_images(facecom_model, tmp_path, capsys):
    from dist_train.cli import main
    from dist_train.inference import InferenceEngine
    from recipes.facecom import SUBMISSION_COLUMNS

    images = _images(tmp_path / "in", 5)
    (tmp_path / "in" / "id0" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "predictions.csv"
    rc = main(["predict", "--checkpoint", str(facecom_model), "--input", str(tmp_path / "in"),
               "--output", str(out), "--no-progress", "--batch-size", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipped id0/broken.png" in err
    with out.open() as fh:
        header = next(csv.reader(fh))
    assert header == SUBMISSION_COLUMNS + ["top5_identities", "top5_confidences"]
    rows = _read(out)
    assert [r["key"] for r in rows] == sorted(p.relative_to(tmp_path / "in").as_posix() for p in images)
    # the numbers are the model's own softmax outputs for each image
    engine = InferenceEngine.from_checkpoint(facecom_model, device="cpu")
    probs = engine.head_probabilities(engine.preprocess([tmp_path / "in" / rows[0]["key"]]))
    top = np.argsort(-probs["identity"][0])[:5]
    assert rows[0]["identity"] == f"person_{top[0]}"
    # printed with 4 decimals (half a unit of the last); the command ran the image in a batch of 2,
    # other kernels than this batch of 1: the logits within the network's bound, a probability moving
    # by at most half the logits' error (the softmax Jacobian's rows sum to <= 1/2), plus its own rounding
    p = probs["identity"][0].astype(np.float64)
    logit_err = module_atol(engine.model, {"image": engine.preprocess([tmp_path / "in" / rows[0]["key"]])})
    tol = 0.5e-4 + 0.5 * logit_err + softmax_atol(p.size, float(np.log(p.max() / p.min())))
    assert float(rows[0]["confidence"]) == pytest.approx(probs["identity"][0, top[0]], rel=0, abs=tol)
    assert rows[0]["top5_identities"].split(";") == [f"person_{i}" for i in top]
    assert rows[0]["gender"] == ["female", "male"][int(probs["gender"][0].argmax())]
    confs = [float(c) for c in rows[0]["top5_confidences"].split(";")]
    assert confs == sorted(confs, reverse=True) and confs[0] == float(rows[0]["confidence"])


def test_predict_csv_list_and_refusals(facecom_model, tmp_path, capsys):
    from dist_train.cli import main

    images = _images(tmp_path / "in", 2)
    listing = tmp_path / "list.csv"
    listing.write_text("path,note\n" + f"in/{images[1].relative_to(tmp_path / 'in').as_posix()},x\n"
                       + f"{images[0]},y\nin/missing.png,z\n")
    out = tmp_path / "p.csv"
    rc = main(["predict", "--checkpoint", str(facecom_model), "--input", str(listing), "--output", str(out),
               "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [r["key"] for r in _read(out)] == [f"in/{images[1].relative_to(tmp_path / 'in').as_posix()}",
                                              str(images[0])]
    assert "skipped in/missing.png: image not found" in err
    # nothing readable: exit 2, one line, nothing written
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nnope.png\n")
    rc = main(["predict", "--checkpoint", str(facecom_model), "--input", str(bad), "--output",
               str(tmp_path / "none.csv"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing written" in err.strip().splitlines()[-1]
    assert not (tmp_path / "none.csv").exists()
