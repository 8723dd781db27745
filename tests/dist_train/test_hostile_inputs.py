"""What a user types, from a hostile-testing pass (issue 22): no command writes
onto one of its inputs, whatever the spelling; image files are opened bounded
(regular files only, pixels checked from the header); verification labels are
exactly 0 or 1. Each refusal is one ``error:`` line, exit 2, nothing written."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_train.cli import main
from tests.dist_train.test_predict import facecom_model  # noqa: F401 - the fixture (an exported tiny model)


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(list(args))
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _image(path: Path, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------
# Output onto input (point 5)


@pytest.fixture
def trainer_run(tmp_path: Path, facecom_model: Path) -> Path:  # noqa: F811
    """A run directory whose checkpoints/latest.pt is a loadable model file."""
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copy(facecom_model, ckpt / "latest.pt")
    return tmp_path / "run"


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink", "run_dir"])
def test_export_never_replaces_the_checkpoint_it_reads(trainer_run: Path, capsys, spelling: str) -> None:
    latest = trainer_run / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    checkpoint, output = str(latest), str(latest)
    if spelling == "dotted":
        output = str(trainer_run / "checkpoints" / ".." / "checkpoints" / "." / "latest.pt")
    elif spelling == "symlink":
        (trainer_run / "link.pt").symlink_to(latest)
        output = str(trainer_run / "link.pt")
    elif spelling == "hardlink":
        os.link(latest, trainer_run / "hard.pt")
        output = str(trainer_run / "hard.pt")
    elif spelling == "run_dir":
        checkpoint = str(trainer_run)
    rc, lines = _run(capsys, "export", "--checkpoint", checkpoint, "--output", output)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --output ") and \
        "the input --checkpoint" in lines[0], lines
    assert latest.read_bytes() == before
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]  # no temp file either


def test_export_to_another_file_still_works(trainer_run: Path, tmp_path: Path, capsys) -> None:
    rc, lines = _run(capsys, "export", "--checkpoint", str(trainer_run), "--output", str(tmp_path / "model.pt"))
    assert rc == 0 and (tmp_path / "model.pt").is_file(), lines


@pytest.mark.parametrize("spelling", ["same", "symlink"])
def test_predict_never_overwrites_its_input_list(facecom_model: Path, tmp_path: Path, capsys,  # noqa: F811
                                                 spelling: str) -> None:
    _image(tmp_path / "a.png")
    listing = tmp_path / "list.csv"
    listing.write_text("path\na.png\n")
    output = listing
    if spelling == "symlink":
        (tmp_path / "out").mkdir()
        output = tmp_path / "out" / "preds.csv"
        output.symlink_to(listing)
    rc, lines = _run(capsys, "predict", "--checkpoint", str(facecom_model), "--input", str(listing),
                     "--output", str(output), "--no-progress")
    assert rc == 2 and lines == [f"error: --output {output} is the input --input {listing}; write the output "
                                 f"somewhere else (an input is never overwritten)"]
    assert listing.read_text() == "path\na.png\n"


def test_verify_attention_picture_never_overwrites_an_image(facecom_model: Path, tmp_path: Path,  # noqa: F811
                                                           capsys) -> None:
    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png", 32)
    before = b.read_bytes()
    rc, lines = _run(capsys, "verify", "--checkpoint", str(facecom_model), str(a), str(b),
                     "--show-attention", str(tmp_path / "." / "b.png"))
    assert rc == 2 and len(lines) == 1 and "is the input image2" in lines[0], lines
    assert b.read_bytes() == before


def test_extract_plot_never_overwrites_an_image(facecom_model: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    images = [_image(tmp_path / "imgs" / "s1" / f"{i}.png") for i in range(3)]
    before = images[0].read_bytes()
    rc, lines = _run(capsys, "extract", "--checkpoint", str(facecom_model), "--images", str(tmp_path / "imgs"),
                     "--output", str(tmp_path / "f.npz"), "--plot", "pca", "--plot-output", str(images[0]),
                     "--no-progress")
    assert rc == 2 and len(lines) == 1 and "--plot-output" in lines[0] and "the input --images" in lines[0], lines
    assert images[0].read_bytes() == before and not (tmp_path / "f.npz").exists()


def test_eval_output_is_not_the_data_or_the_pairs(facecom_model: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    pairs = tmp_path / "pairs.json"
    pairs.write_text("[]")
    rc, lines = _run(capsys, "eval", "--checkpoint", str(facecom_model), "--pairs", str(pairs),
                     "--output", str(pairs))
    assert rc == 2 and len(lines) == 1 and "is the input --pairs" in lines[0], lines
    assert pairs.read_text() == "[]"
    (tmp_path / "data").mkdir()
    rc, lines = _run(capsys, "eval", "--checkpoint", str(facecom_model), "--data", str(tmp_path / "data"),
                     "--output", str(tmp_path / "data" / "report"))
    assert rc == 2 and len(lines) == 1 and "is inside the input --data" in lines[0], lines
    assert list((tmp_path / "data").iterdir()) == []


# ---------------------------------------------------------------------------
# Verification labels are exactly 0 or 1 (point 11)


@pytest.mark.parametrize("label", [2, -1, 0.9, "1", True, None])
def test_a_pair_label_other_than_0_or_1_is_refused(label) -> None:
    from recipes.verification import pairs_from_rows

    rows = [{"img1": "a", "img2": "b", "label": 1}, {"img1": "a", "img2": "c", "label": label}]
    with pytest.raises(ValueError, match=r"pairs.json: pair 1: label must be 0 \(impostor\) or 1 \(genuine\)"):
        pairs_from_rows(rows, ["a", "b", "c"], source="pairs.json")


def test_labels_0_and_1_still_read() -> None:
    from recipes.verification import pairs_from_rows

    rows = [{"img1": "a", "img2": "b", "label": 1}, {"img1": "a", "img2": "c", "label": 0},
            {"img1": "b", "img2": "c", "label": 1.0}]
    assert pairs_from_rows(rows, ["a", "b", "c"]).label.tolist() == [True, False, True]


def test_eval_of_image_pairs_with_label_2_is_one_line(facecom_model: Path, tmp_path: Path,  # noqa: F811
                                                      capsys) -> None:
    for i in range(4):
        _image(tmp_path / f"p{i % 2}" / f"{i}.png", 32 + i)
    rows = [["p0/0.png", "p0/2.png", 1], ["p0/0.png", "p1/1.png", 0], ["p1/1.png", "p1/3.png", 2]]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    rc, lines = _run(capsys, "eval", "--checkpoint", str(facecom_model), "--pairs", str(tmp_path / "pairs.json"),
                     "--threshold", "0.5", "--output", str(tmp_path / "out"), "--no-progress")
    assert rc == 2 and len(lines) == 2 and "pair 2: label must be 0 (impostor) or 1 (genuine), got 2" in lines[-1], \
        lines
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Image files: regular files only, pixels bounded from the header (point 9)


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (what a
    decompression bomb looks like before decoding)."""
    import struct
    import zlib

    _image(path, 8)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def _within(seconds: float, call, *args):
    """``call(*args)`` on a thread; fails (instead of hanging the suite) when it blocks."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = call(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{call.__name__} blocked for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("width, height", [(13_000, 13_000), (20_000, 20_000), (7_000, 6_000)])
def test_too_many_pixels_are_refused_from_the_header(tmp_path: Path, width: int, height: int) -> None:
    from dist_train.image_files import MAX_IMAGE_PIXELS, ImageFileError, read_image_file

    assert width * height > MAX_IMAGE_PIXELS
    bomb = _png_declaring(tmp_path / "bomb.png", width, height)
    with pytest.raises(ImageFileError, match=r"bomb.png: .*refused before decoding") as err:
        read_image_file(bomb)
    assert "\n" not in str(err.value)


def test_an_image_within_the_bound_reads(tmp_path: Path) -> None:
    from dist_train.image_files import read_image_file

    img = read_image_file(_image(tmp_path / "a.png", 40))
    assert img.size == (40, 40) and img.mode == "RGB"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    from dist_train.image_files import ImageFileError, read_image_file

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageFileError, match="pipe.png: not a regular file"):
        _within(30, read_image_file, fifo)
    with pytest.raises(ImageFileError, match="not a regular file"):
        read_image_file(tmp_path)


@pytest.fixture
def demo(facecom_model: Path):  # noqa: F811
    from dist_train.commands.demo_cmd import Demo
    from dist_train.inference import InferenceEngine

    return Demo(InferenceEngine.from_checkpoint(facecom_model, device="cpu"))


def test_demo_refuses_a_fifo_and_a_bomb_naming_the_upload(demo, tmp_path: Path) -> None:
    from dist_train.commands.demo_cmd import DemoError

    a = _image(tmp_path / "a.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DemoError, match=r"^image 2: pipe.png: not a regular file"):
        _within(30, demo.verify, str(a), str(fifo))
    bomb = _png_declaring(tmp_path / "bomb.png", 13_000, 13_000)
    with pytest.raises(DemoError, match=r"^image 1: bomb.png: 13000x13000 pixels is more than the 40,000,000 "):
        demo.verify(str(bomb), str(a))


def test_the_page_shows_the_one_line_as_a_gradio_error(demo, tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio", reason="optional extra: pip install 'biomtl[demo]'")
    from dist_train.commands.demo_cmd import on_page

    a, bomb = _image(tmp_path / "a.png"), _png_declaring(tmp_path / "bomb.png", 20_000, 20_000)
    with pytest.raises(gr.Error) as err:
        on_page(demo.verify, str(a), str(bomb))
    assert str(err.value.message).startswith("image 2: bomb.png: the image declares more than 40,000,000 pixels")


def test_predict_skips_a_bomb_and_a_fifo_in_one_line_each(facecom_model: Path, tmp_path: Path,  # noqa: F811
                                                          capsys) -> None:
    _image(tmp_path / "in" / "a.png")
    _png_declaring(tmp_path / "in" / "bomb.png", 13_000, 13_000)
    os.mkfifo(tmp_path / "in" / "pipe.png")
    (tmp_path / "list.csv").write_text("path\nin/a.png\nin/bomb.png\nin/pipe.png\n")
    rc = _within(120, main, ["predict", "--checkpoint", str(facecom_model), "--input", str(tmp_path / "list.csv"),
                             "--output", str(tmp_path / "p.csv"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipped in/bomb.png: " in err and "refused before decoding" in err
    assert "skipped in/pipe.png: " in err and "not a regular file" in err
    with (tmp_path / "p.csv").open(newline="") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == ["in/a.png"]


@pytest.mark.integration  # starts the Gradio server in a new process
def test_demo_removes_its_uploads_when_it_ends(facecom_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """SIGTERM ends `biomtl demo` through its cleanup: the folder of uploads is gone."""
    import signal
    import socket
    import subprocess

    pytest.importorskip("gradio", reason="optional extra: pip install 'biomtl[demo]'")
    from tests.conftest import PYTHON, REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path / "gradio_tmp"
    temp.mkdir()
    proc = subprocess.Popen([PYTHON, "-m", "dist_train.cli", "demo", "--checkpoint", str(facecom_model),
                             "--port", str(port), "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "GRADIO_TEMP_DIR": str(temp)})
    try:
        for line in proc.stdout:  # Gradio's own lines, then ours once the page serves
            if line.startswith("biomtl demo:"):
                break
        assert line.startswith("biomtl demo:"), proc.stderr.read()
        (upload_dir,) = temp.iterdir()  # this process's own folder
        (upload_dir / "upload.png").write_bytes(b"an upload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(temp.iterdir()) == []


def test_eval_of_an_unreadable_split_is_one_line(facecom_model: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    from tests.dist_train.test_bad_input import _half_corrupt_shards

    data = _half_corrupt_shards(tmp_path / "data")
    rc, lines = _run(capsys, "eval", "--checkpoint", str(facecom_model), "--data", str(data), "--split", "val",
                     "--output", str(tmp_path / "out"), "--no-progress")
    assert rc == 2 and lines[-1].startswith("error: too many corrupt samples in split 'val'"), lines
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "out").exists()
