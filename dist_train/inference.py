"""Inference from a trained checkpoint: embeddings, pair verification, attention maps.

    from dist_train.inference import InferenceEngine

    engine = InferenceEngine.from_checkpoint("runs/dcal_twins_.../checkpoints/best.pt")  # CPU or GPU
    engine.verify_pair("a.png", "b.png")      # {"score": 0.83, "match": True, "threshold": 0.41, ...}
    # ... plus the original DCAL code's names: "verification_score" (= score),
    # "verification_decision" (= match)
    feats = engine.extract_features(["a.png", "b.png", pil_image])   # [N, D] L2-normalised
    engine.batch_verify([("a.png", "b.png"), ("a.png", "c.png")])
    engine.attention_maps(["a.png"])         # DCAL: [N, H', W'] attention rollout (CLS row)

Accepted files (read weights-only, mapped to the requested device, so a
GPU-trained checkpoint loads on a CPU-only machine; their layout is
:mod:`recipes.model_file`'s):

* a trainer checkpoint (DDP);
* an exported model (``biomtl export``, ``RUN/model.pt`` written at the end of
  training, :func:`save_exported`), with an optional threshold;
* a run directory: its ``model.pt``, else ``checkpoints/best.pt``, else ``latest.pt``.

A DeepSpeed checkpoint is a directory: export it first (``biomtl export``).

The model is rebuilt from the stored config by its recipe
(:func:`dist_train.stored_recipe.recipe_from_stored`: start-only params off, the
weights come from the file), and images are preprocessed by the recipe's own
eval transform, so the engine is generic over recipes whose model follows
:class:`recipes.base.EmbeddingModel` (``embed(images) -> [B, D]``; checked on
loading). Only :meth:`InferenceEngine.attention_maps` needs its optional
``attention_rollout`` (DCAL).

Score = cosine similarity of the embeddings. Decision: ``score >= threshold``,
where the threshold is, in order: the ``threshold`` argument; the file's
``"threshold"``; the ``threshold`` the recipe's validation reported at the
checkpoint's step (``RUN/logs/validation_logs.csv``: the best balanced-accuracy
threshold on the val split's pairs; the last validation for ``RUN/model.pt``);
else :data:`DEFAULT_THRESHOLD`.
"""
from __future__ import annotations

import csv
import math
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dist_train.checkpoint import (BEST, LATEST, atomic_save, checkpoint_path, final_model_path, is_run_dir,  # noqa: E402
                                   run_dir_of)
from recipes.model_file import FormatError, StoredModel, model_file, read_stored  # noqa: E402
from shards.images import sixteen_to_8bit, to_8bit  # noqa: E402

DEFAULT_THRESHOLD = 0.5  # cosine; used only when neither the caller nor the checkpoint gives one

__all__ = ["InferenceEngine", "CheckpointError", "load_frozen_model", "load_model_file", "save_exported", "DEFAULT_THRESHOLD",
           "verification_result"]


def verification_result(score: float, threshold: float) -> dict[str, Any]:
    """One pair's result. ``verification_score`` / ``verification_decision`` are the
    original DCAL code's names for ``score`` / ``match`` (same values), so its
    scripts read these results unchanged."""
    match = bool(score >= threshold)
    return {"score": score, "match": match, "threshold": threshold,
            "verification_score": score, "verification_decision": match}


class CheckpointError(ValueError):
    """The file is missing or is not a biomtl checkpoint / exported model (one-line message)."""


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Path, StoredModel]:
    """(the file read, what it holds) for a trainer checkpoint, an exported model
    file or a run directory; the stored config and data info are there."""
    p = Path(path)
    if is_run_dir(p):  # a run directory: its final model, else best/latest
        found = next((c for c in (final_model_path(p), checkpoint_path(p, BEST), checkpoint_path(p, LATEST))
                      if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{p}: a run directory without model.pt or checkpoints/best.pt|latest.pt")
        p = found
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory (a DeepSpeed or FSDP checkpoint?); export it to one file first "
                              "with 'biomtl export'")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{p} is not a PyTorch checkpoint (or it holds pickled code, which "
                              "weights_only loading refuses)") from None
    except Exception as exc:  # truncated zip, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(exc).__name__}: {first[:200]})") from None
    try:
        stored = read_stored(obj)
    except FormatError as exc:
        raise CheckpointError(f"{p} {exc}" if str(exc).startswith("not ") else f"{p}: {exc}") from None
    if stored.config is None or stored.data_info is None:
        raise CheckpointError(f"{p} has no stored config/data_info (written by an older biomtl?); "
                              "cannot rebuild the model")
    return p, stored


def load_frozen_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Any biomtl model file (or run directory) as a frozen module with ``embed(images)``: rebuilt
    from its stored config like every inference command, no gradient, eval mode. What a recipe's
    ``frozen_model_loader`` is (a distillation teacher); :class:`CheckpointError` in one line."""
    model = InferenceEngine.from_checkpoint(path, device).model
    model.requires_grad_(False)
    return model.eval()


def save_exported(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                  data_info: Mapping[str, Any], threshold: float | None = None) -> Path:
    """Write the exported-model format (fp32 CPU tensors), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: (v.detach().float().cpu() if v.is_floating_point() else v.cpu()) for k, v in state_dict.items()}
    atomic_save(model_file(weights, config, data_info, threshold), p)
    return p


def _threshold_from_run(model_file: Path, step: int | None) -> float | None:
    """The validation ``threshold`` logged beside a run's file: at ``step`` for a
    trainer checkpoint (``RUN/checkpoints/*.pt``), the last one for ``RUN/model.pt``."""
    model_file = model_file.resolve()
    run = run_dir_of(model_file)
    if run is None:
        run, step = model_file.parent, None
    csv_path = run / "logs" / "validation_logs.csv"
    if not csv_path.is_file() or (step is None and model_file.name != final_model_path(run).name):
        return None
    with csv_path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("step")]
    if step is not None:
        rows = [r for r in rows if int(float(r["step"])) == int(step)]
    for r in reversed(rows):
        try:
            value = float(r.get("threshold") or "nan")
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return None


def _to_pil(item: Any):
    from PIL import Image

    if isinstance(item, Image.Image):
        return to_8bit(item)
    if isinstance(item, (str, os.PathLike)):
        from dist_train.image_files import read_image_file

        return read_image_file(item)  # regular files only, pixels bounded; ImageFileError is a ValueError
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype == np.uint16:  # 16-bit pixels: scaled like a 16-bit file, not wrapped
            arr = sixteen_to_8bit(arr)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8) if arr.max() <= 1.0 else arr.astype(np.uint8)
        return Image.fromarray(arr)
    raise TypeError(f"expected an image path, a PIL image or a uint8 array, got {type(item).__name__}")


class InferenceEngine:
    """A recipe model in eval mode on one device, with its preprocessing."""

    def __init__(self, model: torch.nn.Module, recipe: Any, config: Any, device: torch.device,
                 threshold: float, threshold_source: str, batch_size: int = 64):
        self.model = model.eval()
        self.recipe = recipe
        self.config = config
        self.device = device
        self.threshold = float(threshold)
        self.threshold_source = threshold_source
        self.batch_size = int(batch_size)

    # --- loading -----------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        threshold: float | None = None, batch_size: int = 64) -> "InferenceEngine":
        from dist_train.stored_recipe import StoredRecipeError, recipe_from_stored
        from recipes.base import EmbeddingModel

        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        found, loaded = load_model_file(path, dev)
        try:
            rebuilt = recipe_from_stored(loaded.config, loaded.data_info)
        except StoredRecipeError as exc:
            raise CheckpointError(f"{path}: cannot rebuild the model from its stored config: {exc}") from None
        cfg, recipe = rebuilt.cfg, rebuilt.recipe
        model = recipe.build_model()
        try:
            model.load_state_dict(loaded.model)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit the model built from its config: "
                                  f"{str(exc).splitlines()[0]}") from None
        model.to(dev)
        if not isinstance(model, EmbeddingModel):  # what every inference command needs
            raise CheckpointError(f"{path}: recipe {recipe.name!r}: its model has no embed(images) (see "
                                  "recipes.base.EmbeddingModel); no embeddings or verification possible")
        if threshold is not None:
            thr, source = float(threshold), "argument"
        elif loaded.threshold is not None:
            thr, source = loaded.threshold, "stored in the model file"
        elif (t := _threshold_from_run(found, loaded.step)) is not None:
            at = f"step {loaded.step}" if loaded.step is not None else "the last step"
            thr, source = t, f"validation at {at}: best accuracy on val pairs"
        else:
            thr, source = DEFAULT_THRESHOLD, "default"
        engine = cls(model, recipe, cfg, dev, thr, source, batch_size)
        engine.checkpoint_kind = loaded.kind
        engine.step = loaded.step
        return engine

    @property
    def recipe_name(self) -> str:
        return type(self.recipe).name

    # --- preprocessing ---------------------------------------------------------------
    def preprocess(self, items: Sequence[Any]) -> torch.Tensor:
        """Paths / PIL images / arrays -> ``[N, 3, S, S]`` with the recipe's eval transform."""
        rows = []
        for item in items:
            sample = {"png": _to_pil(item), "json": {}, "__key__": "inference"}
            rows.append(self.recipe.transform(sample, train=False)["image"])
        return torch.stack(rows)

    def _batches(self, items: Sequence[Any], batch_size: int | None) -> Iterable[torch.Tensor]:
        bs = batch_size or self.batch_size
        for s in range(0, len(items), bs):
            yield self.preprocess(items[s:s + bs]).to(self.device)

    # --- embeddings ----------------------------------------------------------------------
    @torch.no_grad()
    def embed_tensor(self, images: torch.Tensor, feature_type: str | None = None) -> torch.Tensor:
        """``[B, D]`` L2-normalised float32 embeddings of preprocessed images (of the
        recipe's ``feature_type``, one of :meth:`feature_types`; None: ``embed``)."""
        images = images.to(self.device)
        e = (self.model.embed(images) if feature_type is None
             else self.recipe.embed_as(self.model, images, feature_type)).float()
        return torch.nn.functional.normalize(e, dim=1)

    def feature_types(self) -> tuple[str, ...]:
        """The feature kinds this model gives (the first: what ``embed`` returns)."""
        return tuple(self.recipe.feature_types())

    def extract_features(self, items: Sequence[Any] | Any, batch_size: int | None = None,
                         progress: bool = False, feature_type: str | None = None) -> np.ndarray:
        """``[N, D]`` L2-normalised embeddings (cosine similarity = dot product)."""
        if feature_type is not None and feature_type not in self.feature_types():
            raise ValueError(f"--feature-type {feature_type}: recipe {self.recipe_name} gives "
                             f"{'|'.join(self.feature_types())}")
        if not isinstance(items, (list, tuple)):
            items = [items]
        from dist_train.progress import progress_bar

        bs = batch_size or self.batch_size
        out = []
        with progress_bar(progress, "extracting features", math.ceil(len(items) / bs)) as advance:
            for batch in self._batches(items, bs):
                out.append(self.embed_tensor(batch, feature_type).cpu().numpy())
                advance()
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    # --- verification ------------------------------------------------------------------------
    def verify_pair(self, img1: Any, img2: Any, threshold: float | None = None) -> dict[str, Any]:
        f = self.extract_features([img1, img2])
        score = float(np.dot(f[0], f[1]))
        thr = self.threshold if threshold is None else float(threshold)
        return verification_result(score, thr)

    def batch_verify(self, pairs: Sequence[tuple[Any, Any]], threshold: float | None = None,
                     batch_size: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
        """Verify many pairs; each distinct path is embedded once."""
        thr = self.threshold if threshold is None else float(threshold)
        uniq: dict[Any, int] = {}
        items: list[Any] = []
        index = []
        for a, b in pairs:
            row = []
            for x in (a, b):
                key = str(x) if isinstance(x, (str, os.PathLike)) else id(x)
                if key not in uniq:
                    uniq[key] = len(items)
                    items.append(x)
                row.append(uniq[key])
            index.append(row)
        if not index:
            return []
        f = self.extract_features(items, batch_size, progress)
        idx = np.asarray(index)
        scores = np.einsum("ij,ij->i", f[idx[:, 0]], f[idx[:, 1]])
        return [verification_result(float(s), thr) for s in scores]

    # --- classification heads ----------------------------------------------------------------
    def load_images(self, items: Sequence[Any]) -> tuple[list[int], list[torch.Tensor], list[tuple[int, str]]]:
        """Preprocess each item on its own: ``(indices of the good ones, their tensors,
        [(index, one-line reason)] of those that cannot be read)``."""
        good, tensors, bad = [], [], []
        for i, item in enumerate(items):
            try:
                tensors.append(self.preprocess([item])[0])
            except (OSError, ValueError, TypeError) as exc:
                bad.append((i, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                continue
            good.append(i)
        return good, tensors, bad

    @torch.no_grad()
    def head_probabilities(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """``{head: [B, classes] softmax}`` for every ``<head>_logits`` output of the
        model's eval forward (FaceCom: ``gender``, ``identity``)."""
        out = self.model({"image": images.to(self.device)})
        return {k[:-len("_logits")]: v.float().softmax(1).cpu().numpy()
                for k, v in out.items() if k.endswith("_logits") and torch.is_tensor(v) and v.dim() == 2}

    # --- DCAL ---------------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, items: Sequence[Any] | Any, upsample: bool = False) -> np.ndarray:
        """Attention rollout (CLS row over the patch grid), ``[N, H', W']`` scaled
        to [0, 1] per image; ``upsample`` gives ``[N, S, S]`` at the model's input size."""
        from recipes.base import has_attention_rollout

        if not has_attention_rollout(self.model):
            raise TypeError(f"recipe {self.recipe_name!r}: the model has no attention rollout (DCAL only)")
        if not isinstance(items, (list, tuple)):
            items = [items]
        maps = []
        for batch in self._batches(items, None):
            m = self.model.attention_rollout(batch).float()
            if upsample:
                m = torch.nn.functional.interpolate(m[:, None], size=batch.shape[-2:], mode="bilinear",
                                                    align_corners=False)[:, 0]
            lo = m.flatten(1).min(1).values[:, None, None]
            hi = m.flatten(1).max(1).values[:, None, None]
            maps.append(((m - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy())
        return np.concatenate(maps)

    def describe(self) -> str:
        at = f", step {self.step}" if self.step is not None else ""
        return (f"{self.recipe_name} ({self.checkpoint_kind}{at}) on {self.device}; "
                f"threshold {self.threshold:.4f} ({self.threshold_source})")
