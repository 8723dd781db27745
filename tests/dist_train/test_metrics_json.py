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
    shown = capsys.readouterr()
    assert "n/a: no gender labels in the split" in shown.out + shown.err  # the table (rich wraps long rows)
