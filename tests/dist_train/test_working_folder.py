"""Commands write nothing into the folder the shell stands in: a run's eval goes under the
run, the synthetic data under the output folder (or $BIOMTL_CACHE), everything else where
the user said."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_train.cli import main as biomtl
from dist_train.config import CACHE_ENV, load_config, synthetic_cache_dir
from tests.conftest import REPO, tiny_overrides


def test_synthetic_cache_folder_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    cfg = load_config(REPO / "configs" / "facecom.yaml", [f"experiment.output_dir={tmp_path / 'out'}"])
    assert synthetic_cache_dir(cfg) == tmp_path / "out" / "cache"
    assert synthetic_cache_dir(cfg, tmp_path / "elsewhere") == tmp_path / "elsewhere" / "cache"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    assert synthetic_cache_dir(cfg) == tmp_path / "env-cache"
    named = load_config(REPO / "configs" / "facecom.yaml", [f"data.synthetic.cache_dir={tmp_path / 'named'}"])
    assert synthetic_cache_dir(named) == tmp_path / "named"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.integration
def test_train_eval_extract_predict_from_a_read_only_working_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    out = tmp_path / "out"
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for person in ("p1", "p2"):
        (images / person).mkdir(parents=True)
        for i in range(2):  # grey PGM, as the ORL/CMU sets
            Image.fromarray(rng.integers(0, 256, (40, 32), dtype=np.uint8)).save(images / person / f"{i}.pgm")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cwd.chmod(0o555)  # a write here fails for a normal user; for root the listing below still catches it
    try:
        overrides = [o for o in tiny_overrides(out, data__synthetic__samples_per_identity=30) if not o.startswith("data.synthetic.cache_dir=")]
        assert biomtl(["train", "--config", str(REPO / "configs" / "facecom.yaml"), *overrides]) == 0
        run = next(p for p in (out / "runs").iterdir() if p.name != "cache")
        assert biomtl(["eval", "--checkpoint", str(run), "--no-progress"]) == 0
        assert biomtl(["extract", "--checkpoint", str(run / "model.pt"), "--images", str(images),
                       "--output", str(out / "emb.npz"), "--no-progress"]) == 0
        assert biomtl(["predict", "--checkpoint", str(run), "--input", str(images),
                       "--output", str(out / "pred.csv"), "--no-progress"]) == 0
    finally:
        cwd.chmod(0o755)
    assert _files(cwd) == []
    assert (out / "runs" / "cache").is_dir()  # the synthetic set, in the output folder
    assert (run / "eval" / "test" / "metrics.json").is_file()  # the run's eval, under the run


def test_eval_output_belongs_to_the_run_or_sits_beside_the_model_file(tmp_path: Path) -> None:
    from dist_train.commands.eval_cmd import default_output

    run = tmp_path / "runs" / "exp_20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    for given in (run, run / "model.pt", run / "checkpoints" / "best.pt"):
        assert default_output(given, "test") == run.resolve() / "eval" / "test", given
    loose = tmp_path / "models" / "face.pt"
    assert default_output(loose, "val") == loose.parent / "face_eval" / "val"
    assert default_output(Path("face.pt"), "test").is_absolute()  # beside the file, named in full
