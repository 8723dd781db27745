"""InferenceEngine round trip and the eval / extract / verify commands, on a tiny DCAL
model trained for a few steps by the real trainer (one module-scoped run)."""
from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.config import load_config
from tests.conftest import PYTHON, REPO
from tests.recipes.test_dcal_twins import CONFIG, dcal_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, data dir, image folder with 2 images of each of 3 test identities)."""
    from dist_train.commands.eval_cmd import resolve_data_dir
    from dist_train.main import train

    tmp = tmp_path_factory.mktemp("dcal_inference")
    cfg = load_config(CONFIG, dcal_overrides(tmp, logging__tracking="none"))
    train(cfg, None)
    (run,) = sorted((tmp / "runs").iterdir())
    data = resolve_data_dir(cfg)
    images = tmp / "images"
    per_id: dict[str, int] = {}
    for shard in sorted((data / "test").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if not m.name.endswith(".vis.png"):
                    continue
                key = m.name.split(".")[0]
                ident = key.split("_")[0]
                if per_id.get(ident, 0) >= 2 or (ident not in per_id and len(per_id) >= 3):
                    continue
                per_id[ident] = per_id.get(ident, 0) + 1
                (images / ident).mkdir(parents=True, exist_ok=True)
                (images / ident / f"{key}.png").write_bytes(tf.extractfile(m).read())
    assert len(per_id) == 3 and all(n == 2 for n in per_id.values())
    return run, data, images


def _imgs(images: Path) -> list[Path]:
    return sorted(images.rglob("*.png"))


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The real entry point in a new process."""
    return subprocess.run([PYTHON, "-m", "dist_train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command in this process (cheaper: no interpreter + torch start-up)."""
    from dist_train.cli import main

    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, cap.out, cap.err)


@pytest.mark.integration
def test_round_trip_in_a_new_process(trained):
    run, _, images = trained
    a1, a2, b1 = _imgs(images)[0], _imgs(images)[1], _imgs(images)[2]
    ckpt = run / "checkpoints" / "latest.pt"
    script = f"""
import json
from dist_train.inference import InferenceEngine
e = InferenceEngine.from_checkpoint({str(ckpt)!r}, device="cpu")
same, other = e.verify_pair({str(a1)!r}, {str(a1)!r}), e.verify_pair({str(a1)!r}, {str(b1)!r})
feats = e.extract_features([{str(a1)!r}, {str(a2)!r}, {str(b1)!r}])
bv = e.batch_verify([({str(a1)!r}, {str(a1)!r}), ({str(a1)!r}, {str(b1)!r})])
am = e.attention_maps([{str(a1)!r}])
print(json.dumps({{"same": same, "other": other, "norms": [float(x) for x in (feats ** 2).sum(1)],
                  "shape": list(feats.shape), "bv": bv, "att": list(am.shape),
                  "att_range": [float(am.min()), float(am.max())],
                  "source": e.threshold_source, "recipe": e.recipe_name}}))
"""
    proc = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["recipe"] == "dcal_twins"
    assert out["same"]["score"] == pytest.approx(1.0, abs=1e-4)
    assert out["same"]["score"] > out["other"]["score"]
    assert out["same"]["match"] is True or out["same"]["threshold"] > 1.0
    assert out["shape"] == [3, 2 * 192] and out["norms"] == pytest.approx([1.0] * 3, abs=1e-4)
    assert [r["score"] for r in out["bv"]] == pytest.approx([out["same"]["score"], out["other"]["score"]], abs=1e-5)
    assert out["att"] == [1, 4, 4] and out["att_range"] == pytest.approx([0.0, 1.0], abs=1e-5)
    assert out["source"].startswith("validation at step")   # the threshold logged by validation


def test_exported_file_and_run_directory(trained, tmp_path):
    from dist_train.inference import InferenceEngine, load_model_file, save_exported

    run, _, images = trained
    paths = _imgs(images)[:3]
    ref = InferenceEngine.from_checkpoint(run / "checkpoints" / "latest.pt", device="cpu")
    f_ref = ref.extract_features(paths)
    from_run = InferenceEngine.from_checkpoint(run, device="cpu")       # the run's final model.pt
    assert from_run.checkpoint_kind == "exported model"
    np.testing.assert_allclose(from_run.extract_features(paths), f_ref, atol=1e-5)
    assert from_run.threshold == pytest.approx(ref.threshold)           # last validation = final step
    loaded = load_model_file(run / "checkpoints" / "latest.pt")
    out = save_exported(tmp_path / "m.pt", loaded["model"], loaded["config"], loaded["data_info"], threshold=0.123)
    e = InferenceEngine.from_checkpoint(out, device="cpu")
    assert e.threshold == pytest.approx(0.123) and e.threshold_source == "stored in the model file"
    np.testing.assert_allclose(e.extract_features(paths), f_ref, atol=1e-5)
    assert InferenceEngine.from_checkpoint(out, device="cpu", threshold=0.9).threshold == 0.9
    # arrays and PIL images are accepted as well as paths
    arr = np.asarray(Image.open(paths[0]).convert("RGB"))
    np.testing.assert_allclose(e.extract_features([arr, Image.open(paths[0])]), f_ref[[0, 0]], atol=1e-5)


def test_checkpoint_with_gpu_style_weights_loads_on_cpu(trained, tmp_path):
    """A checkpoint whose weights are bf16 (as a GPU run may leave them) loads with
    map_location on a CPU-only machine; weights_only=True refuses pickled code."""
    from dist_train.inference import CheckpointError, InferenceEngine

    run, _, images = trained
    obj = torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    obj["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in obj["model"].items()}
    torch.save(obj, tmp_path / "bf16.pt")
    e = InferenceEngine.from_checkpoint(tmp_path / "bf16.pt", device="cpu")
    assert e.extract_features(_imgs(images)[:1]).dtype == np.float32

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        InferenceEngine.from_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no stored config"):
        InferenceEngine.from_checkpoint(tmp_path / "bare.pt")


def test_verify_command_and_attention_png(trained, tmp_path):
    run, _, images = trained
    a1, _, b1 = _imgs(images)[:3]
    png = tmp_path / "att.png"
    proc = _cli("verify", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(a1), str(b1),
                "--show-attention", str(png))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "score" in proc.stdout and "threshold" in proc.stdout and "MATCH" in proc.stdout
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800 and 250 < im.size[1] < im.size[0]
    proc = _cli("verify", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(a1), str(a1), "--json",
                "--threshold", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["match"] is True and res["threshold"] == 0.5 and res["score"] == pytest.approx(1.0, abs=1e-4)


def test_eval_command_writes_metrics_and_pictures(trained, tmp_path, capsys):
    run, _, _ = trained
    out = tmp_path / "eval"
    proc = _cli_here(capsys, "eval", "--checkpoint", str(run / "checkpoints" / "latest.pt"), "--optimize-threshold",
                "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["protocol"] == "generated"
    assert m["threshold_source"].startswith("best accuracy on 'val'")
    for block in ("all_impostors", "twin_impostors"):
        assert {"auc", "eer", "tar_at_far_0.1", "tar_at_far_0.01", "tar_at_far_0.001", "acc_10fold",
                "acc_at_threshold"} <= set(m[block])
    assert m["pairs"]["genuine"] > 0 and m["pairs"]["impostor"] > 0
    for name in ("roc.png", "score_histograms.png", "hardest_errors.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300, name
    # a dataset pairs file (sample keys) instead of generated pairs
    keys = sorted({k for k in _test_keys(trained[1])})
    pairs = [{"img1": keys[0], "img2": keys[1], "label": 1}, {"img1": keys[0], "img2": keys[-1], "label": 0},
             {"img1": keys[2], "img2": keys[-2], "label": 0}, {"img1": keys[-1], "img2": keys[-2], "label": 1}]
    f = tmp_path / "test_pairs.json"
    f.write_text(json.dumps(pairs))
    proc = _cli_here(capsys, "eval", "--checkpoint", str(run / "checkpoints" / "latest.pt"), "--pairs", str(f),
                "--output", str(tmp_path / "eval2"), "--no-progress", "--threshold", "0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert m["protocol"] == str(f) and m["pairs"]["genuine"] == 2 and m["threshold"] == 0.3


def _test_keys(data: Path) -> list[str]:
    keys = []
    for shard in sorted((data / "test").glob("*.tar")):
        with tarfile.open(shard) as tf:
            keys += [m.name.split(".")[0] for m in tf if m.name.endswith(".json")]
    return keys


def test_extract_command(trained, tmp_path, capsys):
    run, _, images = trained
    out = tmp_path / "feats.npz"
    proc = _cli_here(capsys, "extract", "--checkpoint", str(run), "--images", str(images), "--output", str(out),
                "--similarity-matrix", "--plot", "pca", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    z = np.load(out)
    assert z["features"].shape == (6, 384) and len(set(z["labels"].tolist())) == 3
    assert z["similarity"].shape == (6, 6) and np.allclose(np.diag(z["similarity"]), 1.0, atol=1e-4)
    assert all(p.endswith(".png") for p in z["paths"].tolist())
    with Image.open(tmp_path / "feats_pca.png") as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_command_errors_are_one_line_exit_2(trained, tmp_path, capsys):
    run, _, images = trained
    img = str(_imgs(images)[0])
    ckpt = str(run / "checkpoints" / "latest.pt")
    cases = [
        ("verify", "--checkpoint", str(tmp_path / "missing.pt"), img, img),
        ("verify", "--checkpoint", img, img, img),                        # an image is not a checkpoint
        ("verify", "--checkpoint", ckpt, img, str(tmp_path / "nope.png")),
        ("eval", "--checkpoint", ckpt, "--split", "nosuchsplit"),
        ("eval", "--checkpoint", ckpt, "--data", str(tmp_path)),          # not a shard directory
        ("extract", "--checkpoint", ckpt, "--images", str(tmp_path / "none"), "--output", str(tmp_path / "f.npz")),
    ]
    for args in cases:
        proc = _cli_here(capsys, *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr)
