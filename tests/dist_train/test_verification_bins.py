"""insightface's verification ``.bin`` sets: the restricted reader, the protocol
(flip-summed embeddings, 10-fold accuracy as insightface's ``verification.py``),
``biomtl eval --bin`` and ``data.val_bins`` during training. The bins are built
here from ORL pairs (``../shared/data/orl_faces``), written as insightface writes
them: a pickle of ``(list of encoded images, list of issame bools)``."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import KFold

from tests.conftest import PYTHON, REPO, shared_dataset, tiny_overrides

FACECOM = REPO / "configs" / "facecom.yaml"


# ----------------------------------------------------------------------------- building bins

def _encoded(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)  # as insightface's sets: JPEG bytes
    return buf.getvalue()


def orl_pairs(n_same: int = 10, n_diff: int = 10) -> tuple[list[bytes], list[bool]]:
    """Same-person pairs (two photos of subject k) and different-person pairs
    (subject k with subject k + 1), interleaved as in LFW's pair lists."""
    orl = shared_dataset("orl_faces")
    images, issame = [], []
    for k in range(max(n_same, n_diff)):
        if k < n_same:
            images += [_encoded(orl / f"s{k + 1}" / "1.pgm"), _encoded(orl / f"s{k + 1}" / "2.pgm")]
            issame.append(True)
        if k < n_diff:
            images += [_encoded(orl / f"s{k + 1}" / "3.pgm"), _encoded(orl / f"s{k + 2}" / "4.pgm")]
            issame.append(False)
    return images, issame


def write_py3_bin(path: Path, images: list, issame: list, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps((images, issame), protocol=protocol))
    return path


def write_py2_bin(path: Path, images: list[bytes], issame: list[bool]) -> Path:
    """The opcodes Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes:
    each image a ``str`` (SHORT_BINSTRING / BINSTRING), the flags NEWTRUE/NEWFALSE."""
    out = bytearray(b"\x80\x02")                       # PROTO 2
    out += b"]("                                       # EMPTY_LIST, MARK
    for data in images:
        out += (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data
    out += b"e]("                                      # APPENDS, EMPTY_LIST, MARK
    out += b"".join(b"\x88" if x else b"\x89" for x in issame)
    out += b"e\x86."                                   # APPENDS, TUPLE2, STOP
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="module")
def orl_bin(tmp_path_factory) -> Path:
    """20 pairs, 12 same-person: the labels are not periodic, so a set whose halves
    came back in the wrong order would pair the wrong images with the wrong labels."""
    images, issame = orl_pairs(12, 8)
    return write_py3_bin(tmp_path_factory.mktemp("bins") / "orl_pairs.bin", images, issame)


# ----------------------------------------------------------------------------- the reader

def test_python2_python3_and_protocol_2_bins_read_the_same(tmp_path: Path) -> None:
    from shards.verification_bins import read_bin

    images, issame = orl_pairs(3, 2)
    files = [write_py3_bin(tmp_path / "py3.bin", images, issame),
             write_py3_bin(tmp_path / "py3_protocol2.bin", images, issame, protocol=2),  # _codecs.encode bytes
             write_py2_bin(tmp_path / "py2.bin", images, issame)]
    for path in files:
        vbin = read_bin(path)
        assert list(vbin.images) == images, path.name
        assert vbin.issame.tolist() == issame, path.name
        assert len(vbin) == 5 and vbin.name == path.stem


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_reduce_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    from shards.verification_bins import BinFormatError, read_bin

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"\xff\xd8", _Payload(marker)], [True]), protocol=2))
    with pytest.raises(BinFormatError, match=r"evil.bin: not a verification .bin: refused to load (posix|os)\.system"):
        read_bin(evil)
    assert not marker.exists()
    # a class (here one that only builds an object) and a codec call other than bytes are refused too
    from collections import OrderedDict

    (tmp_path / "cls.bin").write_bytes(pickle.dumps((OrderedDict(), []), protocol=2))
    with pytest.raises(BinFormatError, match="refused to load collections.OrderedDict"):
        read_bin(tmp_path / "cls.bin")
    codec = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "codec.bin").write_bytes(codec)
    with pytest.raises(BinFormatError, match=r"encode\(str, 'latin1'\)"):
        read_bin(tmp_path / "codec.bin")


@pytest.mark.parametrize("content, match", [
    (([b"a", b"b", b"c"], [True, False]), "3 images for 2 issame flags"),
    (([b"a", b"b"], [True]), "needs both same-person and different-person pairs"),
    (([b"a", "b"], [True]), "every image must be encoded bytes"),
    (([b"a", b"b"], [2]), "every issame flag must be a bool"),
    ({"images": []}, "expected a pickled pair"),
])
def test_bad_shapes_are_one_line(tmp_path: Path, content, match) -> None:
    from shards.verification_bins import BinFormatError, read_bin

    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(BinFormatError, match=match) as info:
        read_bin(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "trunc.bin").write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    with pytest.raises(BinFormatError, match="trunc.bin: not a verification .bin: pickle data was truncated"):
        read_bin(tmp_path / "trunc.bin")


# ----------------------------------------------------------------------------- the protocol

def _direct_kfold(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """insightface's computation written out plainly: sklearn KFold without shuffle,
    every grid threshold, predict same when distance < threshold."""
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(d.size)):
        train_acc = [np.mean((d[train] < t) == y[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((d[test] < best) == y[test]))
    return float(np.mean(accs)), float(np.std(accs))


def test_kfold_accuracy_known_picture() -> None:
    """100 pairs, 10 per fold: same-person at distance 0.4, different at 1.6, but one
    same-person pair of fold 0 at 1.0. Held out, fold 0 gets the first perfect
    threshold of the other folds (0.41) and misses it (0.9); every other fold's
    training set holds it, so their threshold is the first above 1.0 (1.01) and
    they score 1.0: mean 0.99, std 0.03."""
    from recipes.bin_verification import THRESHOLDS, kfold_accuracy

    y = np.arange(100) % 2 == 0
    d = np.where(y, 0.4, 1.6)
    d[2] = 1.0
    mean, std, chosen = kfold_accuracy(d, y)
    assert mean == pytest.approx(0.99) and std == pytest.approx(0.03)
    assert chosen[0] == THRESHOLDS[41] and (chosen[1:] == THRESHOLDS[101]).all()
    assert (mean, std) == pytest.approx(_direct_kfold(d, y))


def test_kfold_accuracy_matches_the_direct_computation_on_uneven_folds() -> None:
    """105 pairs (sklearn's first 5 folds one longer), random distances: the
    counts are integers divided by the same sizes, so the results are equal."""
    from recipes.bin_verification import kfold_accuracy

    rng = np.random.default_rng(3)
    y = rng.random(105) < 0.5
    d = np.clip(np.where(y, rng.normal(0.9, 0.35, 105), rng.normal(1.5, 0.35, 105)), 0, 4)
    mean, std, _ = kfold_accuracy(d, y)
    assert (mean, std) == _direct_kfold(d, y)


@pytest.fixture(scope="module")
def tiny_facecom(tmp_path_factory):
    from dist_train.config import load_config, recipe_params
    from recipes.base import get_recipe
    from shards.manifest import DataInfo

    tmp = tmp_path_factory.mktemp("model")
    cfg = load_config(FACECOM, tiny_overrides(tmp))
    info = DataInfo(identities=tuple(f"p{i}" for i in range(4)), twin_pairs=(),
                    label_schemas={"gender": ["female", "male"]}, modalities=("vis.png",))
    torch.manual_seed(0)
    recipe = get_recipe("facecom")(recipe_params(cfg), info)
    return recipe, recipe.build_model().eval()


def test_flip_sums_the_two_embeddings_and_changes_them(tiny_facecom, orl_bin) -> None:
    from recipes.bin_verification import bin_embeddings, decode_image
    from shards.verification_bins import read_bin
    from tests.tolerance import unit_roundoff

    recipe, model = tiny_facecom
    images = [decode_image(b, recipe.transform, "x") for b in read_bin(orl_bin).images[:6]]
    x = torch.stack(images)
    with_flip = bin_embeddings(model.embed, images, 6, flip=True)
    without = bin_embeddings(model.embed, images, 6, flip=False)
    with torch.no_grad():  # the same batch through the same weights: exact
        summed = (model.embed(x).double() + model.embed(torch.flip(x, dims=[-1])).double()).numpy()
    assert np.array_equal(with_flip, summed / np.linalg.norm(summed, axis=1, keepdims=True))
    assert np.abs(with_flip - without).max() > 1e4 * unit_roundoff(torch.float32)  # the flip really enters
    # the flip-sum does not depend on which of the two is the original
    mirrored = bin_embeddings(model.embed, [torch.flip(i, dims=[-1]) for i in images], 6, flip=True)
    np.testing.assert_array_equal(mirrored, bin_embeddings(lambda t: model.embed(torch.flip(t, dims=[-1])),
                                                           images, 6, flip=True))
    assert np.abs(mirrored - with_flip).max() <= np.abs(with_flip - without).max()


# ----------------------------------------------------------------------------- training and biomtl eval --bin

def _train_with_bins(tmp_path: Path, orl_bin: Path) -> Path:
    from dist_train.main import train
    from dist_train.preflight import load_checked_config

    cfg = load_checked_config(FACECOM, tiny_overrides(
        tmp_path, data__val_bins=f"[{orl_bin}]", checkpoint__monitor="orl_pairs_acc", checkpoint__mode="max",
        train__max_steps=2, train__val_every_steps=1))
    train(cfg, None)
    (run,) = sorted((tmp_path / "runs").iterdir())
    return run


@pytest.mark.integration
def test_val_bins_are_logged_monitored_and_eval_bin_reports_them(tmp_path: Path, orl_bin: Path, capsys) -> None:
    from dist_train.cli import main
    from dist_train.inference import InferenceEngine
    from recipes.bin_verification import bin_embeddings, bin_metrics, decode_image
    from shards.verification_bins import read_bin

    run = _train_with_bins(tmp_path, orl_bin)
    with (run / "logs" / "validation_logs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:  # an accuracy over 20 pairs in 10 folds of 2: multiples of 1/20
        acc = float(row["orl_pairs_acc"])
        assert 0.0 <= acc <= 1.0 and acc * 20 == pytest.approx(round(acc * 20))
        assert 0.0 <= float(row["orl_pairs_eer"]) <= 1.0 and float(row["orl_pairs_acc_std"]) >= 0.0
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["monitor"] == "orl_pairs_acc"
    assert best["best"] == pytest.approx(max(float(r["orl_pairs_acc"]) for r in rows))
    assert (run / "checkpoints" / "best.pt").is_file()

    checkpoint = run / "checkpoints" / "latest.pt"
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(checkpoint), "--bin", str(orl_bin), "--device", "cpu",
               "--batch-size", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((run / "eval" / "bins" / "bins.json").read_text())
    m = report["sets"]["orl_pairs"]
    assert report["flip"] is True and m["pairs"] == 20 and m["same_pairs"] == 12
    assert "orl_pairs: 20 pairs" in out and f"{m['acc']:.4f} ± {m['acc_std']:.4f}" in out
    # the report is the protocol on this checkpoint's embeddings (same batches: exact) ...
    engine = InferenceEngine.from_checkpoint(checkpoint, "cpu")
    vbin = read_bin(orl_bin)
    images = [decode_image(b, engine.recipe.transform, "x") for b in vbin.images]
    expected = bin_metrics(bin_embeddings(engine.model.embed, images, 8), vbin)
    assert m["acc"] == expected["acc"] and m["acc_std"] == expected["acc_std"] and m["eer"] == expected["eer"]
    # ... and what the last validation logged for the same weights (same batches of 8, rounded to 6 digits)
    assert float(rows[-1]["orl_pairs_acc"]) == pytest.approx(m["acc"], rel=1e-6)
    assert float(rows[-1]["orl_pairs_eer"]) == pytest.approx(m["eer"], rel=1e-6, abs=1e-12)
    rc = main(["eval", "--checkpoint", str(checkpoint), "--bin", str(orl_bin), "--device", "cpu", "--no-flip",
               "--output", str(tmp_path / "noflip"), "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "noflip" / "bins.json").read_text())["flip"] is False


# ----------------------------------------------------------------------------- bad input, end to end

def test_eval_refuses_a_payload_and_mismatched_lists_before_anything_runs(tmp_path: Path, capsys) -> None:
    from dist_train.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_Payload(marker), b"x"], [True]), protocol=4))
    uneven = write_py3_bin(tmp_path / "uneven.bin", [b"a", b"b", b"c"], [True, False])
    for path, words in ((evil, "refused to load"), (uneven, "3 images for 2 issame flags")):
        rc = main(["eval", "--checkpoint", str(tmp_path / "no-model.pt"), "--bin", str(path),
                   "--output", str(tmp_path / "out"), "--no-progress"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and str(path) in err[0] and words in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_training_with_a_bad_val_bin_is_one_line_exit_2_and_no_run_dir(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_Payload(marker), b"x"], [True]), protocol=2))
    uneven = write_py3_bin(tmp_path / "uneven.bin", [b"a", b"b", b"c"], [True, False])
    cases = [(dict(data__val_bins=f"[{evil}]"), "data.val_bins"),
             (dict(data__val_bins=f"[{uneven}]"), "3 images for 2 issame flags"),
             (dict(data__val_bins=f"[{tmp_path / 'missing.bin'}]"), "data.val_bins: file not found")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for overrides, words in cases:
        proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(FACECOM),
                               *tiny_overrides(tmp_path, **overrides)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_bin_names_are_accepted_as_monitor_by_the_preflight(tmp_path: Path, orl_bin: Path) -> None:
    from dist_train.config import ConfigError
    from dist_train.preflight import load_checked_config

    cfg = load_checked_config(FACECOM, tiny_overrides(tmp_path, data__val_bins=f"[{orl_bin}]",
                                                      checkpoint__monitor="orl_pairs_eer"))
    assert cfg.data.val_bins == [str(orl_bin)]
    with pytest.raises(ConfigError, match=r"'orl_pairs_accuracy' is not a validation metric .*did you mean "
                                          r"'orl_pairs_acc'"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path, data__val_bins=f"[{orl_bin}]",
                                                    checkpoint__monitor="orl_pairs_accuracy"))
    with pytest.raises(ConfigError, match="checkpoint.monitor: 'orl_pairs_acc' is not a validation metric"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path, checkpoint__monitor="orl_pairs_acc"))


@pytest.mark.parametrize("n, world", [(40, 1), (40, 2), (40, 3), (12000, 7), (2, 4)])
def test_ranks_embed_equal_slices_that_gather_back_in_order(n: int, world: int) -> None:
    from dist_train.val_bins import rank_slice

    slices = [rank_slice(n, r, world) for r in range(world)]
    assert [i for mine, _ in slices for i in mine] == list(range(n))  # rank order = image order, each once
    assert len({len(padded) for _, padded in slices}) == 1  # the same number of forwards on every rank


@pytest.mark.integration
def test_two_ranks_score_the_bin_as_one_process_does(tmp_path: Path, orl_bin: Path, capsys) -> None:
    """torchrun, 2 ranks: each embeds half the images, the gather puts them back in
    file order (a wrong order would pair the wrong images and change every number).
    ``biomtl eval --bin`` on the same weights in one process: embeddings from other
    batch compositions (float noise far below the gaps of 20 scores and of the
    0.01 threshold grid), so the counts-based accuracy and the EER agree up to the
    CSV's 6 significant digits."""
    from dist_train.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(FACECOM), *tiny_overrides(tmp_path, data__val_bins=f"[{orl_bin}]", train__max_steps=1,
                                                    checkpoint__monitor="orl_pairs_acc", checkpoint__mode="max")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    with (run / "logs" / "validation_logs.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    rc = main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--bin", str(orl_bin),
               "--device", "cpu", "--no-progress", "--batch-size", "8"])
    assert rc == 0
    m = json.loads((run / "eval" / "bins" / "bins.json").read_text())["sets"]["orl_pairs"]
    assert float(row["orl_pairs_acc"]) == pytest.approx(m["acc"], rel=1e-6)
    assert float(row["orl_pairs_eer"]) == pytest.approx(m["eer"], rel=1e-6, abs=1e-12)
