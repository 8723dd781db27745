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
from tests.tolerance import cosine_atol, dot_atol, module_atol, ops_rtol


class _Branches(torch.nn.Module):
    """DCAL's two branch outputs (before their normalisation) as one forward, for module_atol."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        br = self.model.branches(images)
        return torch.cat([br["sa"], br["glca"]], 1)


def _feature_bounds(engine, items) -> tuple[float, float]:
    """(per component, per score) bounds between the engine's features of the same images batched
    otherwise (other kernels). Each branch output errs by <= module_atol per component, so by
    sqrt(192) that in norm; normalising a branch of norm >= n turns that into <= 2 sqrt(192) delta / n
    in a unit half; the 384-feature (two unit halves, renormalised: its own rounding chain) carries
    both halves' errors / sqrt(2) and the renormalisation's. A score of two such features: both
    errors plus the 384-cosine's own rounding (tests/tolerance.py)."""
    import copy
    import math

    x = engine.preprocess(list(items))
    delta = module_atol(_Branches(engine.model), x)
    with torch.no_grad():
        br = copy.deepcopy(engine.model).double().branches(x.double())
    n = min(float(br["sa"].norm(dim=1).amin()), float(br["glca"].norm(dim=1).amin()))
    half = 2 * math.sqrt(192) * delta / n
    feature = 2 * half / math.sqrt(2) + ops_rtol(2 * (384 + 2))
    return feature, 2 * feature + cosine_atol(384)


def _self_score_atol(d: int = 384) -> float:
    """|f . f - 1| for a float32 L2-normalised f: its normalisation (d squares summed, sqrt,
    divide) twice over in the square, and the dot's own rounding."""
    return 2 * ops_rtol(d + 2) + dot_atol(d)


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
    # the same image twice in one batch: at most two batch rows' kernels apart, then f . f
    from dist_train.inference import InferenceEngine

    _, score_atol = _feature_bounds(InferenceEngine.from_checkpoint(ckpt, device="cpu"), [a1, a1, b1])
    assert out["same"]["score"] == pytest.approx(1.0, rel=0, abs=score_atol + _self_score_atol())
    assert out["same"]["score"] > out["other"]["score"]
    assert out["same"]["match"] is True or out["same"]["threshold"] > 1.0
    assert out["shape"] == [3, 2 * 192] and out["norms"] == pytest.approx([1.0] * 3, rel=0, abs=_self_score_atol())
    # batch_verify embeds [a1, b1], verify_pair [a1, a1] and [a1, b1]: other batches, other kernels
    assert [r["score"] for r in out["bv"]] == pytest.approx([out["same"]["score"], out["other"]["score"]], rel=0,
                                                            abs=score_atol)
    # min-max scaling: (lo - lo) / (hi - lo) and (hi - lo) / (hi - lo) are 0 and 1 exactly
    assert out["att"] == [1, 4, 4] and out["att_range"] == [0.0, 1.0]
    assert out["source"].startswith("validation at step")   # the threshold logged by validation


def test_exported_file_and_run_directory(trained, tmp_path):
    from dist_train.inference import InferenceEngine, load_model_file, save_exported

    run, _, images = trained
    paths = _imgs(images)[:3]
    ref = InferenceEngine.from_checkpoint(run / "checkpoints" / "latest.pt", device="cpu")
    f_ref = ref.extract_features(paths)
    from_run = InferenceEngine.from_checkpoint(run, device="cpu")       # the run's final model.pt
    assert from_run.checkpoint_kind == "exported model"
    # the exported fp32 weights are the checkpoint's: the same kernels on the same batch, exact
    np.testing.assert_array_equal(from_run.extract_features(paths), f_ref)
    assert from_run.threshold == ref.threshold                           # last validation = final step
    _, loaded = load_model_file(run / "checkpoints" / "latest.pt")
    out = save_exported(tmp_path / "m.pt", loaded.model, loaded.config, loaded.data_info, threshold=0.123)
    e = InferenceEngine.from_checkpoint(out, device="cpu")
    assert e.threshold == 0.123 and e.threshold_source == "stored in the model file"
    np.testing.assert_array_equal(e.extract_features(paths), f_ref)
    assert InferenceEngine.from_checkpoint(out, device="cpu", threshold=0.9).threshold == 0.9
    # arrays and PIL images are accepted as well as paths
    arr = np.asarray(Image.open(paths[0]).convert("RGB"))
    # the same pixels as the path, in a batch of the same shape: exact
    np.testing.assert_array_equal(e.extract_features([arr, Image.open(paths[0])]), e.extract_features(paths[:1] * 2))


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
    from dist_train.inference import InferenceEngine

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
    _, score_atol = _feature_bounds(InferenceEngine.from_checkpoint(run / "checkpoints" / "best.pt", device="cpu"),
                                    [a1, a1])
    assert res["match"] is True and res["threshold"] == 0.5
    assert res["score"] == pytest.approx(1.0, rel=0, abs=score_atol + _self_score_atol())


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
    # f . f of each float32 unit feature: no network in between
    assert z["similarity"].shape == (6, 6) and np.allclose(np.diag(z["similarity"]), 1.0, rtol=0,
                                                           atol=_self_score_atol())
    assert all(p.endswith(".png") for p in z["paths"].tolist())
    with Image.open(tmp_path / "feats_pca.png") as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_extract_feature_types_of_dcal(trained, tmp_path, capsys):
    """The original's ``--feature_type combined`` and each class token alone; another
    value is one line naming the choices, exit 2, nothing written."""
    run, _, images = trained
    feats = {}
    for kind in ("sa", "glca", "combined"):
        out = tmp_path / f"{kind}.npz"
        proc = _cli_here(capsys, "extract", "--checkpoint", str(run), "--images", str(images), "--output", str(out),
                         "--feature-type", kind, "--no-progress")
        assert proc.returncode == 0, proc.stderr[-3000:]
        z = np.load(out)
        feats[kind] = z["features"]
        assert str(z["feature_type"]) == kind
    assert feats["sa"].shape == feats["glca"].shape == (6, 192) and feats["combined"].shape == (6, 384)
    # combined = [n(sa), n(glca)] / sqrt(2), renormalised: the halves differ from the tokens alone by the
    # two normalisations' rounding (tests/tolerance.py)
    atol = 2 * ops_rtol(2 * (384 + 2))
    assert np.allclose(feats["combined"][:, :192] * np.sqrt(2), feats["sa"], rtol=0, atol=atol)
    assert np.allclose(feats["combined"][:, 192:] * np.sqrt(2), feats["glca"], rtol=0, atol=atol)
    assert not np.allclose(feats["sa"], feats["glca"], rtol=0, atol=100 * atol)
    out = tmp_path / "bad.npz"
    proc = _cli_here(capsys, "extract", "--checkpoint", str(run), "--images", str(images), "--output", str(out),
                     "--feature-type", "features", "--no-progress")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == "error: --feature-type features: recipe dcal_twins gives " \
                                                "combined|sa|glca" and not out.exists()


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


def test_results_carry_the_original_field_names(trained, capsys):
    from dist_train.inference import InferenceEngine

    run, _, images = trained
    a, _, b = _imgs(images)[:3]
    e = InferenceEngine.from_checkpoint(run, device="cpu")
    for r in [e.verify_pair(a, b)] + e.batch_verify([(a, a), (a, b)]):
        assert r["verification_score"] == r["score"] and r["verification_decision"] is r["match"]
    proc = _cli_here(capsys, "verify", "--checkpoint", str(run), str(a), str(b), "--json")
    res = json.loads(proc.stdout)
    assert res["verification_score"] == res["score"] and res["verification_decision"] == res["match"]


def test_eval_pairs_file_of_image_paths(trained, tmp_path, capsys):
    """The original's test_pairs.json names image files; eval embeds them from disk (no split)."""
    from dist_train.inference import InferenceEngine
    from sklearn.metrics import roc_auc_score

    run, _, images = trained
    files = _imgs(images)                                   # 3 identity folders x 2 images
    rel = [p.relative_to(images).as_posix() for p in files]
    rows = [{"img1": rel[0], "img2": rel[1], "label": 1}, {"img1": rel[2], "img2": rel[3], "label": 1},
            {"img1": rel[0], "img2": rel[2], "label": 0}, {"img1": rel[1], "img2": rel[4], "label": 0},
            [rel[4], rel[5], 1], {"img1": str(files[3]), "img2": rel[5], "label": 0, "twin": True}]
    pairs_file = images / "test_pairs.json"                 # relative paths: from the file's folder
    pairs_file.write_text(json.dumps(rows))
    proc = _cli_here(capsys, "eval", "--checkpoint", str(run), "--pairs", str(pairs_file),
                     "--output", str(tmp_path / "out"), "--no-progress", "--threshold", "0.5")
    pairs_file.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["pairs"]["genuine"] == 3 and m["pairs"]["impostor"] == 3 and m["pairs"]["twin_impostor"] == 1
    assert m["samples"] == 6 and m["identities"] == 3 and m["threshold"] == 0.5
    engine = InferenceEngine.from_checkpoint(run, device="cpu")
    scores = [r["score"] for r in engine.batch_verify(
        [(files[0], files[1]), (files[2], files[3]), (files[0], files[2]), (files[1], files[4]),
         (files[4], files[5]), (files[3], files[5])])]
    assert m["all_impostors"]["auc"] == pytest.approx(roc_auc_score([1, 1, 0, 0, 1, 0], scores), abs=1e-6)
    with Image.open(tmp_path / "out" / "hardest_errors.png") as im:
        assert im.format == "PNG"
    # a path that is no file: one line, exit 2
    bad = tmp_path / "bad_pairs.json"
    bad.write_text(json.dumps([{"img1": "nope/1.png", "img2": rel[0], "label": 1}]))
    proc = _cli_here(capsys, "eval", "--checkpoint", str(run), "--pairs", str(bad), "--image-root", str(images))
    assert proc.returncode == 2 and "image not found: nope/1.png" in proc.stderr


def test_predict_refuses_a_checkpoint_without_gender_head(trained, tmp_path, capsys):
    run, _, images = trained
    proc = _cli_here(capsys, "predict", "--checkpoint", str(run), "--input", str(images),
                     "--output", str(tmp_path / "p.csv"), "--no-progress")
    assert proc.returncode == 2 and "needs a FaceCom checkpoint" in proc.stderr
    assert not (tmp_path / "p.csv").exists()


def test_demo_functions_verify_refuse_and_search(trained, tmp_path):
    """What the demo page calls, without a browser: the same score as the engine, attention
    pictures, non-images refused naming the file, nearest identities of the gallery."""
    from dist_train.commands.demo_cmd import Demo, DemoError
    from dist_train.inference import InferenceEngine

    run, _, images = trained
    a, _, b = _imgs(images)[:3]
    engine = InferenceEngine.from_checkpoint(run, device="cpu")
    demo = Demo(engine, gallery=images)
    r = demo.verify(str(a), str(b))
    assert r["score"] == engine.verify_pair(a, b)["score"]      # the demo calls verify_pair on the same files
    assert r["decision"].startswith("MATCH" if r["match"] else "NO MATCH")
    assert all(v.shape == (224, 224, 3) and v.dtype == np.uint8 for v in r["views"])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DemoError, match="image 2: notes.png is not an image"):
        demo.verify(str(a), str(text))
    rows, shown = demo.nearest(str(b))
    # itself is in the gallery (embedded in another batch), shown rounded to 4 decimals
    _, score_atol = _feature_bounds(engine, [b])
    assert rows[0][1] == b.parent.name
    assert rows[0][2] == pytest.approx(1.0, rel=0, abs=0.5e-4 + score_atol + _self_score_atol())
    assert len(rows) == 3 and [row[0] for row in rows] == [1, 2, 3] and shown[0][1].startswith(b.parent.name)
    with Image.open(b) as im:  # the picture itself (the page gets a PNG, whatever the file), not its path
        assert np.array_equal(shown[0][0], np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR)))
    with pytest.raises(DemoError, match="--gallery"):
        Demo(engine).nearest(str(b))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pgm_faces(images: Path, folder: Path) -> Path:
    """The fixture's images as grey PGM files of ORL's 92 x 112 shape (a browser shows no PGM)."""
    for png in _imgs(images):
        out = folder / png.relative_to(images).with_suffix(".pgm")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as im:
            im.convert("L").resize((92, 112), Image.BILINEAR).save(out)
    return folder


def _shown_images(page, selector: str) -> list[tuple[int, int]]:
    """(natural width, natural height) of every picture under ``selector`` once all have
    loaded; a picture the browser cannot decode has a natural width of 0."""
    page.wait_for_function("(s) => { const im = [...document.querySelectorAll(s + ' img')];"
                           " return im.length > 0 && im.every(i => i.complete); }", arg=selector, timeout=120_000)
    sizes = page.eval_on_selector_all(selector + " img", "im => im.map(i => [i.naturalWidth, i.naturalHeight])")
    return [tuple(size) for size in sizes]


@pytest.mark.integration
def test_demo_page_in_a_headless_browser(trained, tmp_path, capsys, monkeypatch):
    """The real page in Debian's Chromium (Playwright drives it; no browser download), both
    tabs with grey PGM files (ORL and CMU are PGM; a browser shows none): no score before a
    run, previews of the uploads, the score shown is `biomtl verify`'s, a file that is not an
    image is refused with the page's message, the nearest identities' pictures show, aspect
    ratios kept. The screenshot is kept under the test's tmp dir and copied to $CI_ARTIFACTS
    when that is set."""
    import os
    import shutil

    pytest.importorskip("gradio", reason="optional extra: pip install 'biomtl[demo]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium not installed (apt-get install chromium; .ci/run does)")
    from dist_train.commands import demo_cmd

    run, _, images = trained
    gallery = _as_pgm_faces(images, tmp_path / "pgm")
    a, _, b = sorted(gallery.rglob("*.pgm"))[:3]
    expected = json.loads(_cli_here(capsys, "verify", "--checkpoint", str(run), str(a), str(b), "--json",
                                    "--device", "cpu").stdout)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    app = demo_cmd.start(["--checkpoint", str(run), "--gallery", str(gallery), "--port", str(_free_port()),
                          "--device", "cpu"], block=False)
    assert not isinstance(app, int), capsys.readouterr().err
    shot = tmp_path / "demo_page.png"
    portrait = [(184, 224)]  # 92 x 112 at a longer side of 224
    try:
        assert app.server_name == "127.0.0.1"                    # localhost unless --host says otherwise
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 1000})
                page.goto(app.local_url)
                page.locator("#verify").wait_for(timeout=60_000)
                assert page.locator("#score textarea").input_value() == ""  # no score before anything ran
                for sel, view, img in (("#image1", "#preview1", a), ("#image2", "#preview2", b)):
                    page.locator(f"{sel} input[type=file]").set_input_files(str(img))
                    page.locator(f"{sel} a[data-testid=download-link]").wait_for(timeout=60_000)  # uploaded
                    assert _shown_images(page, view) == portrait
                page.click("#verify")
                page.wait_for_function("() => { const e = document.querySelector('#decision textarea');"
                                       " return e && e.value !== ''; }", timeout=120_000)
                shown = float(page.locator("#score textarea").input_value())
                decision = page.locator("#decision textarea").input_value()
                # the page shows 6 decimals: half a unit of the last one, plus the float's own rounding
                assert shown == pytest.approx(expected["score"], rel=0, abs=0.5e-6 + 1e-12)
                assert decision.startswith("MATCH" if expected["match"] else "NO MATCH")
                assert f"{expected['threshold']:.4f}" in decision
                assert _shown_images(page, "#view1") == portrait and _shown_images(page, "#view2") == portrait
                page.screenshot(path=str(shot), full_page=True)
                fake = tmp_path / "fake.png"
                fake.write_text("a text file with an image name")
                page.locator("#image2 button[aria-label=Clear]").click()
                page.locator("#image2 input[type=file]").set_input_files(str(fake))
                page.locator("#image2 a[data-testid=download-link]").wait_for(timeout=60_000)
                page.click("#verify")
                page.get_by_text("image 2: fake.png is not an image").first.wait_for(timeout=60_000)

                page.get_by_role("tab", name="Nearest identities").click()
                page.locator("#query input[type=file]").set_input_files(str(b))
                assert _shown_images(page, "#preview_query") == portrait
                page.click("#search")
                pictures = _shown_images(page, "#nearest_images")
                assert len(pictures) == 3 and all(size == portrait[0] for size in pictures), pictures
                assert page.locator("#nearest").get_by_text(b.parent.name).count() >= 1
                page.screenshot(path=str(tmp_path / "demo_nearest.png"), full_page=True)
            finally:
                browser.close()
    finally:
        app.close()
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size[0] >= 1200
    if os.environ.get("CI_ARTIFACTS"):
        Path(os.environ["CI_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["CI_ARTIFACTS"]) / shot.name)
