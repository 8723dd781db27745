"""``ear_teacher`` recipe: a self-supervised ear encoder whose features other
models distil. Training never reads identity labels.

Data (one shard sample)
-----------------------
- ``biomtl shards create --format ear``: ``image.<ext>`` (the whole photo) and
  ``json`` ``bbox_raw`` (the box as given; for a folder-per-subject set like
  AMI, the whole image) and ``identity`` (used by validation metrics only);
- the built-in synthetic set with modality ``ear``: ``ear.png`` (a larger
  image with the ear somewhere in it) and ``json`` ``ear_bbox``;
- anything else with one image (``png`` from :class:`InferenceEngine`,
  ``biomtl extract``): the whole image is the ear.

``transform``: the crop is the box grown by ``buffer`` (10 %) of its size on
every side, clipped to the image borders (:func:`ear_crop`), resized to
``img_size`` (square) and normalised with the ImageNet mean/std. In training
two views are drawn, each with the switchable augmentations (``flip``;
one affine warp of ``rotation`` degrees, ``zoom`` scale range and ``shift``
translation; ``brightness``, ``contrast``, ``saturation`` factor ranges,
``hue`` shift, ``grayscale`` probability, Gaussian ``noise`` std;
``crop_jitter``: the box scaled/shifted by up to that fraction before the
resize). All are off in :class:`EarTeacherParams`, so SimSiam's two views
and the instance pseudo-labels teach nothing until they are turned on;
``configs/ear_teacher.yaml`` turns on the set measured on AMI ears
(docs/results.md). Output: ``image`` (and
``view2`` in training; training views are uint8 pixels, normalised on the
device by :class:`models.pixels.PixelInput`, evaluation images ImageNet-normalised
floats), ``key_hash`` (a stable 63-bit hash of the sample key,
:func:`key_hash`), ``identity`` (``-1`` when unknown; metrics only).

Model (:class:`EarTeacherModel` around :class:`models.ear.EarTeacherNet`)
--------------------------------------------------------------------------
``loss = reconstruction_weight * MSE(decoder(view 1), view 1)
        + simsiam_weight * SimSiam(view 1, view 2)
        + metric_weight * CE(ArcFace|CosFace(projection), pseudo-label)``
(``metric_loss: none`` drops the last term; with ``pseudo_labels: instance``
the margin term on both views is the instance-discrimination loss). The reconstruction target is
the normalised input. ``terms``: ``reconstruction``, ``simsiam``, ``metric``.
``embed`` (inference, ``biomtl extract``) returns the projection, or with
``feature_type: features`` the backbone's pooled features (768-d for
ConvNeXt-Tiny: what the original exports); ``biomtl extract --feature-type
projection|features`` picks either from any ear model.

Pseudo-labels (:meth:`EarTeacherRecipe.on_epoch_start`, :func:`assign_pseudo_labels`, :func:`instance_labels`)
--------------------------------------------------------------------------------------------------------------
Before every ``pseudo_label_every``-th epoch (epoch 0 included) each rank
embeds its share of the training split (evaluation transform, no
augmentation; every sample once over the ranks); the L2-normalised
projections and key hashes are gathered.

``pseudo_labels: instance`` (exemplar labels, Dosovitskiy et al. 2014): every
training sample is its own class (numbered in key-hash order), the head has
one row per training sample (the manifest's train split size overrides
``num_pseudo_classes``) and is re-initialised from the current embeddings at
every reassignment, so with ``pseudo_label_every: 1`` it is a memory bank of
last epoch's embeddings (Wu et al. 2018, non-parametric instance
discrimination) and the margin loss pulls the two augmented views towards
their own sample and away from all others. This is what makes the embedding
identity-bearing on AMI ears; it needs the augmentations on and a soft
softmax (``scale`` 10, ``margin`` 0: ArcFace's s 30 / m 0.3 cannot fit 350
instances and degrades the embedding).

``pseudo_labels: kmeans``: rank 0 runs scikit-learn's
``KMeans(k = min(num_pseudo_classes, samples), random_state=pseudo_label_seed,
n_init=kmeans_n_init)`` on them, sorted by key hash (so the labels depend on
the embeddings and the seed only, not on rank or loader order), and every rank
takes rank 0's result. The model stores the table (sorted key hashes ->
cluster) in its ``_extra_state``, so checkpoints, resume and ``model.pt``
carry it; rows whose key is not in the table (validation samples) have no
label and no metric loss. The margin head is re-initialised at every
reassignment: class ``c``'s weight = the normalised centroid of cluster ``c``
(the rows beyond ``k``: seeded random), so the new labels start consistent
with the head. When the training split has identities, the normalised mutual
information between pseudo-labels and identities is logged (how much identity
the clusters carry; never used for training).

Validation metrics: ``reconstruction_mse`` and the verification metrics of
:class:`recipes.verification.VerificationMetrics` on the projection (``eer``,
``auc``, ... on pairs of the val split's identities). The config keeps the 3
best checkpoints by validation ``loss``, the last one, and one every 5 epochs.
At every validation ``collage_samples`` validation crops (top row), drawn at
random from rank 0's share of the validation split, a new draw at every epoch
(as the original), reproducible from ``(experiment.seed, epoch)`` and drawn with
a generator of its own (:mod:`dist_train.picture_draw`: no global RNG moves, so
a resumed run draws the same crops and training is unchanged), and their
reconstructions (bottom row) go to TensorBoard (``val/reconstruction_collage``)
and to ``RUN/reconstruction_collages/epoch_XXXX.png`` (epochs completed);
``collage_samples: 0`` turns them off.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.ear import EarTeacherNet, simsiam_loss
from models.partial_fc import row_shard_of
from models.pixels import PixelInput
from recipes.base import ArtifactContext, DataInfo, Metrics, ParallelContext, Recipe, register, start_file
from recipes.identity_head import build_head, check_ranks, check_sharding, identity_outputs
from recipes.batch import label_column, move_batch, valid_mask
from recipes.verification import VerificationMetrics
from recipes.image_input import IMAGE_KEYS, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("biomtl.ear")

COLLAGE_TAG = "reconstruction_collage"


@dataclass
class EarTeacherParams:
    # --- network (models.ear)
    backbone: str = "convnext_tiny"          # a timm ConvNeXt
    weights_path: str = start_file()         # local pretrained weights file ("" = random)
    dims: list[int] = field(default_factory=list)     # override the ConvNeXt stage widths (small nets)
    depths: list[int] = field(default_factory=list)   # override the ConvNeXt stage depths
    img_size: int = 224
    projection_dim: int = 256
    projection_hidden: int = 1024
    predictor_hidden: int = 64
    decoder_width: int = 256
    # --- losses
    reconstruction_weight: float = 1.0
    simsiam_weight: float = 1.0
    metric_loss: Literal["arcface", "cosface", "none"] = "arcface"
    metric_weight: float = 0.1
    margin: float = 0.3
    scale: float = 30.0
    # partial_fc: the pseudo-class centres split across the training ranks (Partial FC,
    # recipes/identity_head.py), for more pseudo-classes (instance labels of a large set) than one
    # GPU holds; sample_rate < 1 samples the negative centres.
    identity_head_sharding: Literal["none", "partial_fc"] = "none"
    sample_rate: float = 1.0
    # --- pseudo-labels: k-means clusters of the training embeddings, or one class per training sample
    pseudo_labels: Literal["kmeans", "instance"] = "kmeans"
    num_pseudo_classes: int = 512            # k-means: k (capped at the samples); instance: >= training samples
    pseudo_label_every: int = 1              # epochs between reassignments
    pseudo_label_seed: int = 0
    kmeans_n_init: int = 3
    # --- data
    buffer: float = 0.1                      # box growth per side, then clipped to the image
    flip: bool = False
    rotation: float = 0.0                    # max degrees
    zoom: float = 0.0                        # scale factor in [1 - z, 1 + z] (about the centre)
    shift: float = 0.0                       # translation up to this fraction of the size, per axis
    brightness: float = 0.0                  # factor in [1 - b, 1 + b]
    contrast: float = 0.0                    # factor in [1 - c, 1 + c]
    saturation: float = 0.0                  # factor in [1 - s, 1 + s]
    hue: float = 0.0                         # shift in [-h, h] (a fraction of the hue circle, <= 0.5)
    grayscale: float = 0.0                   # probability of a grey view
    noise: float = 0.0                       # Gaussian std on the [0, 1] image
    crop_jitter: float = 0.0                 # box scale and shift up to this fraction of its size, per view
    # --- evaluation
    collage_samples: int = 8                 # random validation crops per collage, a new draw each epoch (0: none)
    # --- inference: what embed() (biomtl extract / eval / verify) returns
    feature_type: Literal["projection", "features"] = "projection"   # features: the backbone's pooled
                                                                     # features (768-d for ConvNeXt-Tiny)
    val_max_pairs: int = 200_000
    pair_seed: int = 0

    def __post_init__(self) -> None:
        if self.img_size < 16 or self.projection_dim < 1 or self.num_pseudo_classes < 1:
            raise ValueError("img_size must be >= 16, projection_dim and num_pseudo_classes >= 1")
        check_sharding(self.identity_head_sharding, self.sample_rate, self.metric_loss)
        if min(self.reconstruction_weight, self.simsiam_weight, self.metric_weight, self.rotation,
               self.brightness, self.noise, self.buffer, self.crop_jitter, self.zoom, self.shift,
               self.contrast, self.saturation, self.hue, self.grayscale) < 0:
            raise ValueError("loss weights, buffer and augmentation strengths must be >= 0")
        if self.pseudo_label_every < 1 or self.kmeans_n_init < 1 or self.collage_samples < 0:
            raise ValueError("pseudo_label_every and kmeans_n_init must be >= 1, collage_samples >= 0 (0: no collages)")
        if max(self.brightness, self.contrast, self.saturation, self.zoom) >= 1 or self.crop_jitter >= 0.5:
            raise ValueError("brightness, contrast, saturation and zoom must be < 1 (factor range [1 - x, 1 + x]) "
                             "and crop_jitter < 0.5")
        if self.hue > 0.5 or self.grayscale > 1 or self.shift >= 0.5:
            raise ValueError("hue must be <= 0.5, grayscale (a probability) <= 1 and shift < 0.5")
        if (self.dims and len(self.dims) != 4) or (self.depths and len(self.depths) != 4):
            raise ValueError("dims and depths list the 4 ConvNeXt stages (or are empty: the backbone's own)")


# ----------------------------------------------------------------------------- data

def key_hash(key: str) -> int:
    """A stable non-negative 63-bit hash of a sample key (the pseudo-label table's key)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little") & (2 ** 63 - 1)


def buffered_box(box: Sequence[float], width: int, height: int, buffer: float) -> tuple[int, int, int, int]:
    """``box`` (x1, y1, x2, y2) grown by ``buffer`` x its width/height on every side,
    clipped to the image and rounded outwards (x2/y2 exclusive)."""
    from shards.sources.ear import buffered_box as grow

    return tuple(grow(box, width, height, buffer)[0])


def _member(sample: Mapping[str, Any], base: str):
    from shards.reading import IMAGE_EXTS

    for k, v in sample.items():
        name, _, ext = str(k).partition(".")
        if name == base and ext.lower() in IMAGE_EXTS:
            return v
    return None


def ear_image_and_box(sample: Mapping[str, Any]) -> tuple[Any, list[float]]:
    """The full image and the raw ear box of a decoded sample (see the module doc)."""
    meta = sample.get("json") or {}
    img = _member(sample, "ear")
    if img is not None and meta.get("ear_bbox") is not None:
        return img, [float(v) for v in meta["ear_bbox"]]
    img = _member(sample, "image")
    if img is None:
        img = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if img is None:
        raise KeyError(f"sample {sample.get('__key__')!r} has no image (ear.<ext>, image.<ext>, png ...; "
                       f"has {sorted(sample)})")
    box = meta.get("bbox_raw", meta.get("bbox"))
    if box is None:  # no box: the whole image is the ear
        box = [0.0, 0.0, float(img.size[0]), float(img.size[1])]
    return img, [float(v) for v in box]


def ear_crop(sample: Mapping[str, Any], buffer: float):
    """The buffered, border-clipped ear crop (PIL RGB)."""
    img, box = ear_image_and_box(sample)
    return img.convert("RGB").crop(buffered_box(box, img.size[0], img.size[1], buffer))


def jittered(box: Sequence[float], jitter: float) -> list[float]:
    """``box`` scaled by a factor in ``[1 - jitter, 1 + jitter]`` (each side length) and
    shifted by up to ``jitter`` x its size (global RNG, seeded per sample)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + random.uniform(-jitter, jitter) * w
    cy = (y1 + y2) / 2 + random.uniform(-jitter, jitter) * h
    w, h = w * random.uniform(1 - jitter, 1 + jitter), h * random.uniform(1 - jitter, 1 + jitter)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalise(t: torch.Tensor) -> torch.Tensor:
    return (t - _MEAN.to(t.device)) / _STD.to(t.device)


def to_pixels(t: torch.Tensor) -> torch.Tensor:
    """A view in [0, 1] as the 8-bit pixels the DataLoader workers hand over (a
    quarter of float32's bytes; the model's :class:`models.pixels.PixelInput`
    normalises them on the training device). Rounded to the nearest level: the
    view moves by at most half a level of the 8-bit image it was cut from."""
    return t.clamp(0, 1).mul(255).round_().to(torch.uint8)


def unnormalise(t: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] (clamped), for pictures."""
    shape = (1, 3, 1, 1) if t.dim() == 4 else (3, 1, 1)
    return (t.float() * _STD.to(t.device).view(shape) + _MEAN.to(t.device).view(shape)).clamp(0, 1)


def augment_view(t: torch.Tensor, p: EarTeacherParams) -> torch.Tensor:
    """One random view of a ``[3, S, S]`` image in [0, 1] (global RNGs: seeded per sample
    by the stream)."""
    from torchvision.transforms import functional as TF

    if p.flip and random.random() < 0.5:
        t = TF.hflip(t)
    if p.rotation > 0 or p.zoom > 0 or p.shift > 0:
        size = t.shape[-1]
        t = TF.affine(t, angle=random.uniform(-p.rotation, p.rotation),
                      translate=[round(random.uniform(-p.shift, p.shift) * size) for _ in range(2)],
                      scale=random.uniform(1 - p.zoom, 1 + p.zoom), shear=[0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
    if p.brightness > 0:
        t = t * random.uniform(1 - p.brightness, 1 + p.brightness)
    if p.contrast > 0:
        t = TF.adjust_contrast(t.clamp(0, 1), random.uniform(1 - p.contrast, 1 + p.contrast))
    if p.saturation > 0:
        t = TF.adjust_saturation(t.clamp(0, 1), random.uniform(1 - p.saturation, 1 + p.saturation))
    if p.hue > 0:
        t = TF.adjust_hue(t.clamp(0, 1), random.uniform(-p.hue, p.hue))
    if p.grayscale > 0 and random.random() < p.grayscale:
        t = TF.rgb_to_grayscale(t.clamp(0, 1), num_output_channels=3)
    if p.noise > 0:
        t = t + torch.randn_like(t) * p.noise
    return t.clamp(0, 1)


# ----------------------------------------------------------------------------- pseudo-labels

def assign_pseudo_labels(keys: np.ndarray, embeddings: np.ndarray, num_classes: int, seed: int,
                         n_init: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means on L2-normalised ``embeddings``: ``(sorted keys, label per key, centroids [k, D])``.
    Rows are sorted by key first, so the result depends on (keys, embeddings, seed) only."""
    from sklearn.cluster import KMeans

    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    x = np.asarray(embeddings, dtype=np.float64)[order]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = max(1, min(int(num_classes), len(keys)))
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return keys, km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def instance_labels(keys: np.ndarray, embeddings: np.ndarray, num_classes: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exemplar pseudo-labels (Dosovitskiy et al. 2014): every sample its own class, numbered
    in key order; the "centroids" are the L2-normalised embeddings themselves, so the head
    re-initialised from them is a memory bank of the current embeddings (Wu et al. 2018).
    Same return as :func:`assign_pseudo_labels`."""
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    if len(keys) > num_classes:
        raise ValueError(f"pseudo_labels: instance needs num_pseudo_classes >= the training samples "
                         f"({len(keys)} > {num_classes})")
    x = np.asarray(embeddings, dtype=np.float64)[order]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return keys[order], np.arange(len(keys), dtype=np.int64), x.astype(np.float32)


# ----------------------------------------------------------------------------- model

class EarTeacherModel(nn.Module):
    """``forward(batch)`` -> loss, terms, ``embedding`` (projection of view 1),
    ``reconstruction``, ``reconstruction_mse`` (per row)."""

    def __init__(self, p: EarTeacherParams, parallel: ParallelContext = ParallelContext()):
        super().__init__()
        self.p = p
        self.net = EarTeacherNet(p.backbone, p.weights_path, p.img_size, p.projection_dim, p.projection_hidden,
                                 p.predictor_hidden, p.decoder_width, p.dims, p.depths)
        self.head = (build_head(p.metric_loss, p.identity_head_sharding, p.sample_rate, p.projection_dim,
                                p.num_pseudo_classes, p.scale, p.margin, parallel)
                     if p.metric_loss != "none" else None)
        # sorted key hashes and their labels: buffers, so the lookup runs where the model does
        # (no copy to the host inside a step); not persistent: the extra state below carries them
        self.pixels = PixelInput(IMAGENET_MEAN, IMAGENET_STD)  # training views arrive as 8-bit pixels
        self.register_buffer("table_keys", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("table_labels", torch.zeros(0, dtype=torch.long), persistent=False)

    # The pseudo-label table travels in the state dict ("_extra_state": [2, N] int64).
    def get_extra_state(self) -> torch.Tensor:
        return torch.stack([self.table_keys, self.table_labels]).cpu()

    def set_extra_state(self, state: torch.Tensor) -> None:
        state = torch.as_tensor(state).long().reshape(2, -1)
        self._set_table(state[0], state[1])

    def set_pseudo_labels(self, keys: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self._set_table(torch.as_tensor(np.asarray(keys, np.int64)[order]),
                        torch.as_tensor(np.asarray(labels, np.int64)[order]))

    def _set_table(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        # called between steps (on_epoch_start, loading), never inside forward
        device = self.table_keys.device
        self.table_keys, self.table_labels = keys.to(device).clone(), labels.to(device).clone()

    def pseudo_labels(self, hashes: torch.Tensor) -> torch.Tensor:
        """The label of every row's key hash, ``-1`` where the table has none."""
        hashes = hashes.long().reshape(-1).to(self.table_keys.device)
        if self.table_keys.numel() == 0:
            return torch.full_like(hashes, -1)
        pos = torch.searchsorted(self.table_keys, hashes).clamp(max=self.table_keys.numel() - 1)
        return torch.where(self.table_keys[pos] == hashes, self.table_labels[pos], torch.full_like(hashes, -1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Inference features: the projection, or the backbone's pooled features
        (``feature_type: features``, what the original exports)."""
        return self.features(images) if self.p.feature_type == "features" else self.projection(images)

    def projection(self, images: torch.Tensor) -> torch.Tensor:
        """What the pseudo-label head and SimSiam train, whatever ``feature_type`` says."""
        return self.net.embed(self.pixels(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (before the projector)."""
        return self.net.encoder.forward_head(self.net.encoder.forward_features(self.pixels(images)), pre_logits=True)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        p = self.p
        x = self.pixels(batch["image"])  # (the reconstruction target: the normalised view)
        out = self.net(x)
        zero = out["projection"].float().sum() * 0.0
        per_row = ((out["reconstruction"].float() - x.float()) ** 2).flatten(1).mean(1)
        terms = {"reconstruction": per_row.mean()}
        if "view2" in batch:  # training: two views (identical when the augmentations are off)
            out2 = self.net(self.pixels(batch["view2"]), reconstruct=False)
            terms["simsiam"] = simsiam_loss(out["prediction"], out2["projection"], out2["prediction"],
                                            out["projection"])
            z = torch.cat([out["projection"], out2["projection"]])
            rows = torch.cat([batch["key_hash"], batch["key_hash"]])
        else:
            terms["simsiam"] = zero + 0.0 * out["prediction"].float().sum()
            z, rows = out["projection"], batch.get("key_hash")
        if self.head is not None:
            labels = (self.pseudo_labels(rows) if rows is not None
                      else torch.full((z.shape[0],), -1, dtype=torch.long)).to(z.device)
            terms["metric"], _ = identity_outputs(self.head, z, labels, 0.0, self.training)
        else:
            terms["metric"] = zero
        loss = (p.reconstruction_weight * terms["reconstruction"] + p.simsiam_weight * terms["simsiam"]
                + p.metric_weight * terms["metric"])
        return {"loss": loss, "terms": terms, "embedding": out["projection"],
                "reconstruction": out["reconstruction"], "reconstruction_mse": per_row.detach()}


# ----------------------------------------------------------------------------- metrics

class EarMetrics(Metrics):
    NAMES = frozenset(("reconstruction_mse",)) | VerificationMetrics.NAMES

    def __init__(self, max_pairs: int = 200_000, seed: int = 0):
        self.verification = VerificationMetrics(max_pairs, seed)
        self.mse: list[np.ndarray] = []

    def update(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        self.verification.update(outputs, batch)
        mse = outputs["reconstruction_mse"].detach().float().cpu().numpy()
        self.mse.append(mse[valid_mask(batch, mse.shape[0])])

    def state(self) -> dict[str, Any]:
        return {"verification": self.verification.state(),
                "mse": np.concatenate(self.mse) if self.mse else np.zeros(0)}

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        mse = np.concatenate([s["mse"] for s in states])
        out = {"reconstruction_mse": float(mse.mean()) if mse.size else float("nan")}
        out.update(VerificationMetrics.compute([s["verification"] for s in states]))
        return out


# ----------------------------------------------------------------------------- pictures

ROW_LABELS = ("input", "reconstruction")


def collage(originals: torch.Tensor, reconstructions: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """``[3, H, W]``: the ``n`` originals in the top row, their reconstructions below
    (both ``[n, 3, S, S]`` in [0, 1]); white ``padding`` around every tile, and a
    white strip on the left naming the rows (:data:`ROW_LABELS`)."""
    from torchvision.utils import make_grid

    n = originals.shape[0]
    grid = make_grid(torch.cat([originals, reconstructions]).float().cpu(), nrow=n, padding=padding, pad_value=1.0)
    return _label_rows(grid, ROW_LABELS)


def _label_rows(grid: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """``grid`` with a white strip on its left holding one black label per
    (equal-height) row, centred on the row: a picture that says what it shows."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for text in labels]
    width = max(b[2] - b[0] for b in boxes) + 8
    height = grid.shape[1]
    strip = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(strip)
    band = height / len(labels)
    for i, (text, box) in enumerate(zip(labels, boxes)):
        y = band * i + (band - (box[3] - box[1])) / 2 - box[1]
        draw.text((4 - box[0], y), text, fill=0, font=font)
    left = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).expand(3, -1, -1)
    return torch.cat([left, grid], dim=2)


# ----------------------------------------------------------------------------- recipe

@register
class EarTeacherRecipe(Recipe):
    name = "ear_teacher"
    Params = EarTeacherParams

    def __init__(self, params: EarTeacherParams, data_info: DataInfo):
        train_samples = int(data_info.split_sizes.get("train", 0))
        if params.pseudo_labels == "instance" and train_samples:  # one head row per training sample
            params = dataclasses.replace(params, num_pseudo_classes=train_samples)
        super().__init__(params, data_info)

    # --- data
    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        from torchvision.transforms import functional as TF

        p = self.params
        img, box = ear_image_and_box(sample)
        img = img.convert("RGB")

        def crop(b: Sequence[float]) -> torch.Tensor:
            c = img.crop(buffered_box(b, img.size[0], img.size[1], p.buffer))
            return TF.pil_to_tensor(c.resize((p.img_size, p.img_size), resample=2)).float() / 255.0  # bilinear

        base = crop(box)
        meta = sample.get("json") or {}
        ident = meta.get("identity", -1)
        out = {"key_hash": torch.tensor(key_hash(sample.get("__key__", "")), dtype=torch.long),
               "identity": torch.tensor(-1 if ident is None else int(ident), dtype=torch.long)}
        if train:
            jit = p.crop_jitter > 0
            out["image"] = to_pixels(augment_view(crop(jittered(box, p.crop_jitter)) if jit else base, p))
            out["view2"] = to_pixels(augment_view(crop(jittered(box, p.crop_jitter)) if jit else base, p))
        else:
            out["image"] = normalise(base)
        return out

    # --- model
    def use_ranks(self, parallel: ParallelContext) -> None:
        check_ranks(self.params.identity_head_sharding, self.params.num_pseudo_classes, parallel)
        super().use_ranks(parallel)

    def build_model(self) -> nn.Module:
        return EarTeacherModel(self.params, self.parallel)

    def feature_types(self) -> tuple[str, ...]:
        return tuple(sorted(("projection", "features"), key=lambda t: t != self.params.feature_type))

    def embed_as(self, model: nn.Module, images: torch.Tensor, feature_type: str) -> torch.Tensor:
        return model.features(images) if feature_type == "features" else model.projection(images)

    # --- pseudo-labels
    @torch.no_grad()
    def on_epoch_start(self, model: nn.Module, epoch: int, ctx: ArtifactContext) -> None:
        p = self.params
        if model.head is None or epoch % p.pseudo_label_every != 0:
            return
        device = next(model.parameters()).device
        keys, embs, idents = [], [], []
        for batch in ctx.loaders["train"]:
            n = batch["image"].shape[0]
            valid = valid_mask(batch, n)
            z = model.projection(move_batch(batch, device)["image"]).float().cpu().numpy()
            keys.append(label_column(batch, "key_hash", n)[valid])
            embs.append(z[valid])
            idents.append(label_column(batch, "identity", n)[valid])
        parts = ctx.gather((np.concatenate(keys), np.concatenate(embs), np.concatenate(idents)))
        result = None
        if ctx.is_main:
            all_keys = np.concatenate([k for k, _, _ in parts])
            all_emb = np.concatenate([e for _, e, _ in parts])
            all_ids = np.concatenate([i for _, _, i in parts])
            if p.pseudo_labels == "instance":
                sorted_keys, labels, centroids = instance_labels(all_keys, all_emb, p.num_pseudo_classes)
            else:
                sorted_keys, labels, centroids = assign_pseudo_labels(all_keys, all_emb, p.num_pseudo_classes,
                                                                      p.pseudo_label_seed, p.kmeans_n_init)
            result = (sorted_keys, labels, centroids)
            ids = all_ids[np.argsort(all_keys, kind="stable")]
            if p.pseudo_labels == "kmeans" and (ids >= 0).all() and len(np.unique(ids)) > 1:
                from sklearn.metrics import normalized_mutual_info_score

                log.info("epoch %d: %d pseudo-labels over %d samples; NMI with the (unused) identities %.3f",
                         epoch, len(np.unique(labels)), len(labels), normalized_mutual_info_score(ids, labels))
        sorted_keys, labels, centroids = ctx.gather(result)[0]
        model.set_pseudo_labels(sorted_keys, labels)
        reinit_head(model.head, centroids, p.pseudo_label_seed + epoch)


    # --- evaluation
    def new_metrics(self) -> Metrics:
        return EarMetrics(self.params.val_max_pairs, self.params.pair_seed)

    @classmethod
    def validation_metric_names(cls, params: EarTeacherParams) -> frozenset[str]:
        return EarMetrics.NAMES

    def validation_picture_rows(self) -> int:
        return self.params.collage_samples   # a new random draw of validation crops at every epoch

    def validation_images(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        n = min(self.params.collage_samples, batch["image"].shape[0])
        if n == 0:
            return {}
        return {COLLAGE_TAG: collage(unnormalise(batch["image"][:n].detach()),
                                     unnormalise(outputs["reconstruction"][:n].detach()))}

    def validation_image_file(self, tag: str, epoch: int) -> str | None:
        return f"reconstruction_collages/epoch_{epoch:04d}.png" if tag == COLLAGE_TAG else None


def reinit_head(head: nn.Module, centroids: np.ndarray, seed: int) -> None:
    """Class ``c``'s weight = the normalised centroid ``c``; rows past the centroids: seeded
    Xavier (never targets, still negatives). A head sharded across ranks takes its own rows
    of that same matrix."""
    w = head.weight  # the margin heads normalise their weights: only directions matter
    shard = row_shard_of(w)
    total, first = (shard.total, shard.offset) if shard is not None else (w.shape[0], 0)
    bound = (6.0 / (total + w.shape[1])) ** 0.5
    fresh = (torch.rand(total, w.shape[1], generator=torch.Generator().manual_seed(seed)) * 2 - 1) * bound
    c = torch.as_tensor(centroids, dtype=torch.float32)[:total]
    fresh[: c.shape[0]] = F.normalize(c, dim=1)
    w.data.copy_(fresh[first:first + w.shape[0]].to(w.device, w.dtype))
