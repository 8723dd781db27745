"""Metrics JSON files are strict JSON (no bare NaN), and a metric that cannot be computed
says why: in the final table and under ``not_computed`` in ``final_metrics.json``."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from recipes.metrics_json import NotComputed, json_text, not_computed_reasons
from tests.conftest import REPO, shared_dataset


def strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_text_is_strict_and_keeps_the_numbers() -> None:
    metrics = {"eer": np.float32(0.25), "auc": float("nan"), "n": np.int64(3), "inf": float("inf"),
               "why": NotComputed("no gender labels"), "nested": [np.float64(-math.inf), 1.5], "_private": 1}
    parsed = strict_json(json_text(metrics))
    assert parsed == {"eer": 0.25, "auc": None, "n": 3, "inf": None, "why": None, "nested": [None, 1.5]}


def test_not_computed_is_nan_with_its_reason_across_a_gather() -> None:
    value = pickle.loads(pickle.dumps(NotComputed("no co-twin impostor pairs")))
    assert math.isnan(value) and value.reason == "no co-twin impostor pairs"
    assert not_computed_reasons({"a": 1.0, "b": value, "c": float("nan")}) == {"b": "no co-twin impostor pairs"}


def test_facecom_metrics_without_gender_labels_say_why() -> None:
    from recipes.facecom import FaceComMetrics

    state = {"g_true": np.full(4, -1), "g_pred": np.zeros(4, np.int64), "i_true": np.array([0, 1, 0, 1]),
             "i_pred": np.array([0, 1, 1, 1]), "i_top5": np.ones(4, bool)}
    out = FaceComMetrics.compute([state])
    assert out["identity_top1"] == 0.75
    assert isinstance(out["gender_acc"], NotComputed) and "gender" in out["gender_acc"].reason
    assert isinstance(out["combined"], NotComputed) and "gender_macro_f1" in out["combined"].reason


@pytest.mark.integration
def test_face_verification_cnn_on_orl_reports_eer_and_strict_json(tmp_path: Path, capsys) -> None:
    """configs/face_verification/cnn.yaml on ORL shards (identity-disjoint test split, no gender
    labels): the test metrics hold an EER, final_metrics.json parses strictly."""
    from dist_train.cli import main as biomtl
    from dist_train.config import load_config
    from dist_train.main import train

    orl = shared_dataset("orl_faces")
    shards = tmp_path / "orl"
    assert biomtl(["shards", "create", "--format", "folder", "--input", str(orl), "--output", str(shards),
                   "--split-by", "identity"]) == 0
    cfg = load_config(REPO / "configs" / "face_verification" / "cnn.yaml", [
        f"data.shards={shards}", f"experiment.output_dir={tmp_path / 'runs'}", "train.max_steps=2",
        "recipe.params.img_size=32", "train.precision=fp32", "logging.progress=false", "logging.plot=false"])
    train(cfg, None)
    run = next((tmp_path / "runs").iterdir())
    final = strict_json((run / "final_metrics.json").read_text())
    assert 0.0 <= final["test_eer"] <= 1.0 and 0.0 <= final["test_auc"] <= 1.0
    assert final["test_gender_acc"] is None
    assert final["not_computed"]["test_gender_acc"] == "no gender labels in the split"
    assert final["not_computed"]["test_twin_eer"] == "no co-twin impostor pairs"
    assert final["test_identity_top1"] is None                      # was 0.0: no test identity is trained on
    assert final["not_computed"]["test_identity_top1"].startswith("identity-disjoint split")
    shown = capsys.readouterr()
    assert "n/a: no gender labels in the split" in shown.out + shown.err  # the table (rich wraps long rows)


def test_identity_metrics_of_an_identity_disjoint_split_say_why_not_zero() -> None:
    """Test identities the classifier never trained on: top-1 would be 0.0 whatever the
    model; it is not computed, with the reason, and null in JSON. Rows of trained
    identities alone count where a split mixes both."""
    import torch

    from recipes.facecom import FaceComMetrics

    def run(identities: list[int]) -> dict:
        metrics = FaceComMetrics(trained=[0, 1, 2])
        logits = torch.zeros(len(identities), 6)
        logits[torch.arange(len(identities)), torch.tensor(identities)] = 5.0   # always right
        metrics.update({"gender_logits": torch.zeros(len(identities), 2), "identity_logits": logits},
                       {"identity": torch.tensor(identities), "gender": torch.tensor([0, 1] * (len(identities) // 2))})
        return FaceComMetrics.compute([metrics.state()])

    disjoint = run([3, 4, 5, 3])
    assert isinstance(disjoint["identity_top1"], NotComputed) and "identity-disjoint" in disjoint["identity_top1"].reason
    assert strict_json(json_text(disjoint))["identity_top1"] is None
    assert not_computed_reasons(disjoint)["identity_macro_f1"] == disjoint["identity_top1"].reason
    assert disjoint["gender_acc"] == 0.5                                  # the other metrics as before
    mixed = run([0, 4, 1, 5])
    assert mixed["identity_top1"] == 1.0 and mixed["identity_top5"] == 1.0   # over identities 0 and 1 only
    assert run([0, 1, 2, 0])["identity_top1"] == 1.0


def test_the_training_split_identities_reach_the_recipe(tmp_path: Path) -> None:
    """``biomtl shards create`` records each split's identity labels; the trainer's
    DataInfo carries the training split's (None for a manifest without them)."""
    from shards.manifest import DataInfo, Manifest
    from dist_train.cli import main as biomtl

    out = tmp_path / "syn"
    assert biomtl(["shards", "create", "--format", "synthetic", "--identities", "6", "--samples", "2", "--size", "16",
                   "--splits", "train=0.5,test=0.5", "--split-by", "identity", "--seed", "1",
                   "--output", str(out)]) == 0
    manifest = Manifest.load(out)
    train = set(manifest.data_info("train").trained_identities)
    test = set(manifest.data_info("test").trained_identities)
    assert train and test and not train & test and train | test == set(range(6))
    assert manifest.data_info().trained_identities is None
    stored = DataInfo.from_dict(manifest.data_info("train").to_dict())
    assert set(stored.trained_identities) == train
    assert DataInfo.from_dict({**stored.to_dict(), "trained_identities": None}).trained_identities is None


def test_photometric_identity_top1_of_an_identity_disjoint_split_says_why() -> None:
    import torch

    from recipes.photometric import PhotometricMetrics

    def run(identities: list[int]) -> dict:
        metrics = PhotometricMetrics(["gender"], verification=False, trained=[0, 1])
        n = len(identities)
        logits = torch.zeros(n, 4)
        logits[torch.arange(n), torch.tensor(identities)] = 5.0                  # always right
        metrics.update({"identity_logits": logits, "gender_logits": torch.zeros(n, 2)},
                       {"identity": torch.tensor(identities), "gender": torch.zeros(n, dtype=torch.long)})
        return PhotometricMetrics.compute([metrics.state()])

    disjoint = run([2, 3, 2])
    assert isinstance(disjoint["identity_top1"], NotComputed) and "identity-disjoint" in disjoint["identity_top1"].reason
    assert strict_json(json_text(disjoint))["identity_top1"] is None
    assert disjoint["score"] == disjoint["gender_acc"] == 1.0                  # the attributes alone
    assert run([0, 3, 1])["identity_top1"] == 1.0                               # trained identities only
