"""Issue 33: a training label outside its classifier is refused on the data path, once per
sample (the losses skip it with tensor ops and no longer check it per step)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recipes.base import DataInfo
from recipes.facecom import FaceComParams, FaceComRecipe
from recipes.labels import class_label
from shards.reading import DATA_ERRORS
from tests.recipes.test_photometric import _recipe as photometric_recipe
from tests.recipes.test_photometric import _sample as photometric_sample
from tests.recipes.test_thz import _recipe as thz_recipe
from tests.recipes.test_thz import _sample as thz_sample


def test_class_label_reads_the_first_key_present_and_checks_only_when_asked():
    assert class_label({"identity": 3}, "identity", 4, check=True) == 3
    assert class_label({"identity": None, "id": 2}, ("identity", "id"), 4, check=True) == 2
    assert class_label({}, "identity", 4, check=True) == -1                 # unlabelled
    assert class_label({"identity": -1}, "identity", 4, check=True) == -1
    with pytest.raises(ValueError, match="identity=4 is outside the 4 classes"):
        class_label({"identity": 4}, "identity", 4, check=True)
    assert class_label({"identity": 9}, "identity", 4, check=False) == 9    # evaluation: unseen identities


def _face(identity: int, gender: int = 0) -> dict:
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    return {"vis.png": img, "json": {"identity": identity, "gender": gender}, "__key__": "k"}


def test_training_transforms_refuse_a_label_the_manifest_cannot_have():
    face = FaceComRecipe(FaceComParams(backbone="resnet18", img_size=32, embedding_dim=16),
                         DataInfo(identities=("a", "b"), twin_pairs=(), label_schemas={"gender": ("f", "m")},
                                  modalities=("vis",)))
    assert int(face.transform(_face(1), train=True)["identity"]) == 1
    with pytest.raises(ValueError, match="identity=2"):
        face.transform(_face(2), train=True)
    assert issubclass(ValueError, DATA_ERRORS)  # what the stream counts as a corrupt sample, naming its shard
    with pytest.raises(ValueError, match="gender=2"):
        face.transform(_face(0, gender=2), train=True)
    assert int(face.transform(_face(2), train=False)["identity"]) == 2

    thz = thz_recipe()
    sample = thz_sample(0, 0)
    sample["json"] = {**sample["json"], "posture": 5}      # 5 postures: 0..4
    with pytest.raises(ValueError, match="posture=5"):
        thz.transform(sample, train=True)
    assert int(thz.transform(sample, train=False)["posture"]) == 5

    photometric = photometric_recipe(augment=False)
    sample = photometric_sample(0, 0)
    sample["json"] = {**sample["json"], "identity": 4}     # 4 identities in the tests' DataInfo
    with pytest.raises(ValueError, match="identity=4"):
        photometric.transform(sample, train=True)
