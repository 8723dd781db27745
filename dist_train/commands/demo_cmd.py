"""``biomtl demo``: a local web page (Gradio) over a trained checkpoint.

    biomtl demo --checkpoint RUN [--gallery DIR] [--host 127.0.0.1] [--port 7860]

Tab "Verify a pair": two face images -> the cosine score, the decision at the
model's threshold (as ``biomtl verify``: same engine, same files, same
number) and, for DCAL checkpoints, the attention rollout over each image.
Tab "Nearest identities": a query image against the images of ``--gallery``
(identity = first sub-folder, as ``biomtl extract``): the closest identities
(best score per identity) and their closest images.

The page binds to 127.0.0.1 unless ``--host`` says otherwise (anyone who can
reach it can run the model on their images); Gradio's analytics are off and
nothing is shared. Uploads that are not readable images (PNG, JPEG, PGM,
BMP, TIFF, WebP), not regular files, or larger than
:data:`dist_train.image_files.MAX_IMAGE_PIXELS` (40 Mpx, read from the header
before decoding) are refused with a one-line message on the page naming the
file. Uploads (and Gradio's other temp files) live in a temp folder of this
process, removed when the demo ends (Ctrl-C, SIGTERM). Needs the optional
extra ``pip install 'biomtl[demo]'`` (Gradio).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.commands import fail
from dist_train.commands.extract_cmd import IMAGE_SUFFIXES, find_images

DISPLAY = 224  # pixels of the pictures on the page


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Serve a local web page to try a checkpoint: "
                                 "pair verification with attention maps, nearest identities of a gallery.")
    ap.add_argument("--checkpoint", required=True, help="run directory, trainer checkpoint or exported model file")
    ap.add_argument("--gallery", default=None, help="folder of images, identity = first sub-folder (second tab)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the checkpoint's)")
    ap.add_argument("--top-k", type=int, default=5, help="identities shown in the second tab")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return ap


class DemoError(ValueError):
    """An input the page refuses (shown as the page's error message)."""


def read_upload(path: Any, what: str):
    """The uploaded file as a PIL image, read by the bounded opener of every
    command (regular files only, pixels checked from the header), or
    :class:`DemoError` naming it."""
    from dist_train.image_files import MAX_IMAGE_PIXELS, ImageFileError, NotAnImage, read_image_file

    if path is None:
        raise DemoError(f"{what}: no file uploaded")
    p = Path(path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", ""))
    try:
        return read_image_file(p).convert("RGB")
    except NotAnImage:
        raise DemoError(f"{what}: {p.name} is not an image (expected "
                        f"{', '.join(s.lstrip('.').upper() for s in sorted(IMAGE_SUFFIXES))}, "
                        f"at most {MAX_IMAGE_PIXELS // 1_000_000} Mpx)") from None
    except ImageFileError as exc:  # a FIFO, too many pixels: the upload's own name, not the temp path
        raise DemoError(f"{what}: {p.name}: {exc.cause}") from None


def display_size(width: int, height: int) -> tuple[int, int]:
    """The picture's size on the page: its longer side :data:`DISPLAY`, its aspect ratio kept."""
    scale = DISPLAY / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay(image, heat: np.ndarray | None) -> np.ndarray:
    """``image`` at the display size (aspect ratio kept), with the attention map (in [0, 1],
    over the model's input, stretched back to the image's shape) laid over it. An RGB array:
    Gradio sends it to the browser as PNG, whatever the file was (PGM, TIFF...)."""
    from matplotlib import colormaps
    from PIL import Image

    size = display_size(*image.size)
    view = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)
    if heat is None:
        return view.astype(np.uint8)
    h = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.BILINEAR),
                   dtype=np.float32) / 255.0
    colour = colormaps["inferno"](h)[..., :3] * 255.0
    return (0.45 * view + 0.55 * colour).clip(0, 255).astype(np.uint8)


def preview(file: Any) -> np.ndarray | None:
    """An upload as the page shows it before anything runs (browsers show no PGM); None
    when there is no file or it is not an image (Verify / Search then say why)."""
    if file is None:
        return None
    try:
        return overlay(read_upload(file, "upload"), None)
    except DemoError:
        return None


class Demo:
    """What the page calls; plain Python, so it is tested without a browser too."""

    def __init__(self, engine: Any, gallery: Path | None = None, threshold: float | None = None, top_k: int = 5):
        self.engine = engine
        self.threshold = engine.threshold if threshold is None else float(threshold)
        self.threshold_source = engine.threshold_source if threshold is None else "--threshold"
        self.top_k = top_k
        self.gallery = gallery
        self._gallery_table: tuple[list[Path], list[str], np.ndarray] | None = None

    @property
    def has_attention(self) -> bool:
        from recipes.base import has_attention_rollout

        return has_attention_rollout(self.engine.model)

    def verify(self, file1: Any, file2: Any) -> dict[str, Any]:
        images = [read_upload(file1, "image 1"), read_upload(file2, "image 2")]
        # the files themselves go to the engine: the same bytes and decoding as `biomtl verify`
        files = [str(file1), str(file2)]
        result = self.engine.verify_pair(files[0], files[1], threshold=self.threshold)
        maps = self.engine.attention_maps(files) if self.has_attention else [None, None]
        decision = ("MATCH: same identity" if result["match"] else "NO MATCH: different identities")
        return {**result, "decision": f"{decision} (threshold {self.threshold:.4f}, {self.threshold_source})",
                "views": [overlay(img, m) for img, m in zip(images, maps)]}

    def gallery_table(self) -> tuple[list[Path], list[str], np.ndarray]:
        if self._gallery_table is None:
            if self.gallery is None:
                raise DemoError("no gallery: start the demo with --gallery DIR (one sub-folder per identity)")
            paths = find_images(self.gallery)
            if not paths:
                raise DemoError(f"--gallery {self.gallery}: no images found")
            labels = [p.relative_to(self.gallery).parts[0] if len(p.relative_to(self.gallery).parts) > 1 else ""
                      for p in paths]
            self._gallery_table = (paths, labels, self.engine.extract_features(paths))
        return self._gallery_table

    def nearest(self, query_file: Any) -> tuple[list[list[Any]], list[tuple[str, str]]]:
        """``([[rank, identity, best score, images], ...], [(RGB picture, caption)] of the best images)``."""
        read_upload(query_file, "query image")
        paths, labels, feats = self.gallery_table()
        scores = feats @ self.engine.extract_features([str(query_file)])[0]
        best: dict[str, int] = {}
        for i in np.argsort(-scores, kind="stable"):
            best.setdefault(labels[i], int(i))
        ranked = list(best.items())[:self.top_k]
        rows = [[r + 1, ident or "(no folder)", round(float(scores[i]), 4), labels.count(ident)]
                for r, (ident, i) in enumerate(ranked)]
        # pictures, not paths: a browser shows no PGM (ORL, CMU), so the page gets PNGs
        shown = [(overlay(read_upload(paths[i], "gallery image"), None), f"{ident or '(no folder)'}: {scores[i]:.4f}")
                 for ident, i in ranked]
        return rows, shown


def on_page(call: Any, *args: Any) -> Any:
    """``call(*args)`` for the page: a refused input (a :class:`DemoError`, or
    the engine's one-line ``ValueError``/``OSError``) becomes ``gr.Error`` with
    that line, shown on the page; Gradio logs no traceback for it."""
    import gradio as gr

    try:
        return call(*args)
    except (DemoError, ValueError, OSError) as exc:
        raise gr.Error((str(exc).splitlines() or [type(exc).__name__])[0]) from None


def build_app(demo: Demo):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def on_verify(f1: Any, f2: Any):
        r = on_page(demo.verify, f1, f2)
        return f"{r['score']:.6f}", r["decision"], r["views"][0], r["views"][1]

    def on_nearest(q: Any):
        return on_page(demo.nearest, q)

    file_types = sorted(IMAGE_SUFFIXES)
    with gr.Blocks(title="biomtl demo") as app:
        gr.Markdown(f"### biomtl: {demo.engine.describe()}")
        with gr.Tab("Verify a pair"):
            with gr.Row():
                f1 = gr.File(label="image 1", file_types=file_types, type="filepath", elem_id="image1")
                f2 = gr.File(label="image 2", file_types=file_types, type="filepath", elem_id="image2")
            with gr.Row():  # what was uploaded, as PNG (the browser shows no PGM)
                p1 = gr.Image(label="image 1", interactive=False, elem_id="preview1", format="png")
                p2 = gr.Image(label="image 2", interactive=False, elem_id="preview2", format="png")
            f1.change(preview, [f1], [p1])
            f2.change(preview, [f2], [p2])
            button = gr.Button("Verify", variant="primary", elem_id="verify")
            with gr.Row():  # text, empty until a pair was scored (a Number shows 0 before anything ran)
                score = gr.Textbox(label="cosine score", interactive=False, elem_id="score")
                decision = gr.Textbox(label="decision", interactive=False, elem_id="decision")
            what = "attention rollout (DCAL, CLS row)" if demo.has_attention else "as the model sees it"
            with gr.Row():
                v1 = gr.Image(label=f"image 1: {what}", interactive=False, elem_id="view1", format="png")
                v2 = gr.Image(label=f"image 2: {what}", interactive=False, elem_id="view2", format="png")
            button.click(on_verify, [f1, f2], [score, decision, v1, v2])
        with gr.Tab("Nearest identities"):
            gr.Markdown(f"Gallery: `{demo.gallery}`" if demo.gallery else
                        "No gallery: start with `--gallery DIR` (one sub-folder per identity).")
            with gr.Row():
                q = gr.File(label="query image", file_types=file_types, type="filepath", elem_id="query")
                pq = gr.Image(label="query", interactive=False, elem_id="preview_query", format="png")
            q.change(preview, [q], [pq])
            search = gr.Button("Search", variant="primary", elem_id="search")
            table = gr.Dataframe(headers=["rank", "identity", "best score", "images"], interactive=False,
                                 elem_id="nearest")
            pictures = gr.Gallery(label="closest image of each identity", columns=5, elem_id="nearest_images",
                                  format="png", object_fit="contain")
            search.click(on_nearest, [q], [table, pictures])
    return app


def start(argv: list[str] | None = None, prog: str = "biomtl demo", block: bool = True) -> Any:
    """Parse, load, serve. Returns the exit code, or (``block=False``) the running app (end it with :func:`stop`)."""
    import importlib.util

    args = build_parser(prog).parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        return fail("biomtl demo needs the optional extra: pip install 'biomtl[demo]' (Gradio)")
    gallery = Path(args.gallery) if args.gallery else None
    if gallery is not None and not gallery.is_dir():
        return fail(f"--gallery: not a folder: {gallery}")
    if not 0 < args.port < 65536:
        return fail(f"--port must be in 1..65535, got {args.port}")
    temp = _own_temp_dir()
    try:
        from dist_train.inference import CheckpointError, InferenceEngine

        try:
            engine = InferenceEngine.from_checkpoint(args.checkpoint, args.device)
        except CheckpointError as exc:
            _drop_temp_dir(temp)
            return fail(str(exc))
        app = build_app(Demo(engine, gallery, args.threshold, args.top_k))
        app.biomtl_temp = temp
        allowed = [str(gallery.resolve())] if gallery is not None else None
        app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                   prevent_thread_lock=True, allowed_paths=allowed, quiet=not block)
    except BaseException:
        _drop_temp_dir(temp)
        raise
    if block:  # SIGTERM (kill, a service manager) ends the process like Ctrl-C: through stop()
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"biomtl demo: {engine.describe()} on http://{args.host}:{args.port}", flush=True)
    if not block:
        return app
    try:
        app.block_thread()
    finally:
        stop(app)
    return 0


def stop(app: Any) -> None:
    """Close the page and remove this run's uploads (its own temp folder)."""
    try:
        app.close()
    finally:
        _drop_temp_dir(getattr(app, "biomtl_temp", None))


def _own_temp_dir() -> tuple[str, str | None]:
    """A temp folder of this process alone for Gradio's files (uploads, its
    caches), inside ``GRADIO_TEMP_DIR`` if set, and made Gradio's before it is
    imported (it reads the variable at import and when the app is built)."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    if previous:  # Gradio makes its temp folder when missing: so do we, for ours inside it
        os.makedirs(previous, exist_ok=True)
    own = tempfile.mkdtemp(prefix="biomtl-demo-", dir=previous)
    os.environ["GRADIO_TEMP_DIR"] = own
    atexit.register(shutil.rmtree, own, True)  # also when a caller of block=False never calls stop()
    return own, previous


def _drop_temp_dir(temp: tuple[str, str | None] | None) -> None:
    if temp is None:
        return
    own, previous = temp
    shutil.rmtree(own, ignore_errors=True)
    if os.environ.get("GRADIO_TEMP_DIR") == own:
        if previous is None:
            del os.environ["GRADIO_TEMP_DIR"]
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def run(argv: list[str] | None = None, prog: str = "biomtl demo") -> int:
    return start(argv, prog, block=True)
