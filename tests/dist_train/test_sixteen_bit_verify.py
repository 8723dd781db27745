"""Issue 22 point 2, inference side: `biomtl verify` (and the engine, the demo) of two
different people's 16-bit faces gives what their 8-bit originals give. Before, both
decoded to all-white pictures: `score 1.0, match true`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.config import load_config
from tests.conftest import REPO, tiny_overrides
from tests.shards.test_sixteen_bit import as_16bit, orl_face


@pytest.fixture(scope="module")
def faces_and_run(tmp_path_factory):
    from dist_train.main import train

    tmp = tmp_path_factory.mktemp("sixteen_bit")
    train(load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp, train__max_steps=2)), None)
    (run,) = sorted((tmp / "runs").iterdir())
    files = {}
    for person in (1, 2):
        a8 = orl_face(person)
        files[person, 8] = tmp / f"s{person}_8bit.png"
        Image.fromarray(a8).save(files[person, 8])
        files[person, 16] = tmp / f"s{person}_16bit.png"
        as_16bit(a8).save(files[person, 16])
    return run, files


def test_verify_of_16bit_faces_matches_the_8bit_originals(faces_and_run, capsys):
    from dist_train.cli import main

    run, files = faces_and_run
    scores = {}
    for bits in (8, 16):
        capsys.readouterr()
        assert main(["verify", "--checkpoint", str(run), str(files[1, bits]), str(files[2, bits]), "--json",
                     "--device", "cpu"]) == 0
        scores[bits] = json.loads(capsys.readouterr().out)["score"]
    eps = torch.finfo(torch.float32).eps
    assert scores[16] == pytest.approx(scores[8], abs=16 * eps)  # the same pixels reach the model
    assert scores[8] < 1 - 1e3 * eps  # two people: not the all-white pictures' score 1.0


def test_engine_and_demo_see_the_8bit_pixels(faces_and_run):
    from dist_train.commands.demo_cmd import read_upload
    from dist_train.inference import InferenceEngine

    run, files = faces_and_run
    engine = InferenceEngine.from_checkpoint(run, device="cpu")
    f8 = engine.extract_features([files[1, 8], files[2, 8]])
    f16 = engine.extract_features([files[1, 16], files[2, 16],
                                   np.asarray(as_16bit(orl_face(1))).astype(np.uint16)])
    eps = torch.finfo(torch.float32).eps
    np.testing.assert_allclose(f16[:2], f8, atol=16 * eps)
    np.testing.assert_allclose(f16[2], f8[0], atol=16 * eps)  # a uint16 array is scaled, not wrapped
    assert np.array_equal(np.asarray(read_upload(str(files[2, 16]), "image 1"))[..., 0], orl_face(2))


def test_verify_refuses_an_image_whose_range_is_unknown(faces_and_run, capsys, tmp_path):
    from dist_train.cli import main

    run, files = faces_and_run
    tif = tmp_path / "floats.tif"  # 0..255 as floats: not the 0..1 convention, refused rather than guessed
    Image.fromarray(orl_face(1).astype(np.float32), "F").save(tif)
    capsys.readouterr()
    rc = main(["verify", "--checkpoint", str(run), str(tif), str(files[2, 8]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "floats.tif" in err and "[0, 1]" in err, err
