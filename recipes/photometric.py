"""Photometric-stereo multi-task face recognition: ``photometric_mtl`` (one
modality) and ``photometric_concat`` (albedo + normal + depth networks whose
identity embeddings are concatenated).

Data (one shard sample; the built-in synthetic set with modality ``maps`` and
``biomtl shards create --format photometric`` write the same members)
----------------------------------------------------------------------------
- ``albedo.npy`` (HxWx3, or HxW), ``normal.npy`` (HxWx3, unit normals),
  ``depth.npy`` (HxW); ``photometric_mtl`` also reads a grey image
  (``modality: image``: the first of :data:`recipes.image_input.IMAGE_KEYS`, e.g.
  CMU faces' ``image.png``);
- ``json``: ``identity`` and the attributes under their own names or an alias:
  ``gender``, ``emotion`` (``expression``), ``pose`` (``posture``),
  ``facial_hair``, ``spectacles`` (``sunglasses``); ``-1``/missing = unlabelled.
  An attribute is a task when the manifest has a label schema for it (its class
  count); listed attributes the data lacks are left out (logged).

``transform`` -> ``{"image" | "albedo", "normal", "depth": float [C, S, S], "identity",
<attribute>...: long}``: albedo and grey images scaled to about zero mean / unit
range, normals as they are, depth standardised per sample; training adds
:class:`models.photometric.ArrayAugment` (rectangle crop, Gaussian noise).
The grey image (``modality: image``, 8-bit captures) is resized and rounded to 8
bits in both transforms; training hands those ``uint8`` pixels out of the
DataLoader workers (with ``noise_seed``: the noise is added on the device,
:func:`models.photometric.seeded_noise`) and the model normalises them with the
evaluation transform's arithmetic, so unaugmented it sees the evaluation floats
exactly. The maps are float by nature and leave the workers as float32 (exact);
``maps_8bit: true`` hands them over as 8 bits per value, each channel of each
sample over its own range (``<input>_range``), turned back into floats by the
model: every value moves by at most 1/510 of that range.

Model (:class:`PhotometricModel`)
---------------------------------
Per modality a :class:`models.photometric.PhotometricEncoder` (``ir_se``,
``cbam_resnet`` or timm ``convnextv2_*``; with ``separation`` the Feature
Separation Module splits identity / non-identity parts). The identity parts
(``embedding_dim`` each; 3x for concat) go to MagLinear + MagFace; the
non-identity parts to one linear head per attribute with focal loss; with
``adversarial_weight > 0`` (and separation) adversarial attribute heads read the
identity part through a gradient reversal layer (lambda schedule
``2/(1+exp(-gamma p)) - 1``, ``p`` = the fraction of the run done: training
forward passes / the run's (``train.max_steps`` or ``train.epochs``, told by the
trainer as :attr:`recipes.base.Recipe.train_forwards`; ``grl_steps`` is gone)), so the
identity part sheds attribute information. ``task_weighting: uncertainty``
weights identity and attribute losses by learned log-variances
(:class:`models.losses.DynamicLossWeights`); ``fixed`` uses ``task_weights``.
``terms``: ``identity`` (MagFace CE + g), ``magface_g``, each attribute, ``adv_<attribute>``.

Metrics: ``identity_top1``, ``identity_macro_f1``; per attribute ``<a>_acc``,
``<a>_macro_f1``, ``<a>_auc`` (one-vs-rest ROC AUC, macro over the classes
present, sklearn); ``attr_mean_acc``; ``score`` = mean of identity top-1 and the
attribute accuracies; verification (``eer``, ``auc``, ``tar_at_far_*``,
:class:`recipes.verification.VerificationMetrics`) on pairs generated from the
split when ``verification`` is on: identity-disjoint only when the data were
split by identity (``split_by: identity``); on a closed-set split the pairs are
among training identities. ``write_artifacts``: the test metrics and
``plots/confusion_matrices.png`` (one panel per task).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone
from models.heads import MagLinear
from models.losses import DynamicLossWeights, FocalLoss, MagFaceLoss, masked_cross_entropy, masked_mean_of_sum
from models.partial_fc import ShardedMarginHead
from models.photometric import (ArrayAugment, CbamResNet, GradientReversal, IRSE, PhotometricEncoder,
                                TimmFeatures, dequantise_map, quantise_map, seeded_noise)
from models.pixels import PixelInput
from recipes.base import (ArtifactContext, DataInfo, Metrics, ParallelContext, Recipe, RecipeDataError, register,
                          start_file, start_option)
from recipes.batch import label_column, move_batch, valid_mask
from recipes.identity_head import build_head, check_ranks, check_sharding, identity_outputs, top_identities
from recipes.verification import VerificationMetrics
from recipes.image_input import IMAGE_KEYS
from recipes.labels import class_label
from recipes.metrics_json import NotComputed

log = logging.getLogger("biomtl.photometric")

MAPS = ("albedo", "normal", "depth")
MAP_CHANNELS = {"albedo": 3, "normal": 3, "depth": 1, "image": 1}
# The grey image (modality ``image``: 8-bit captures such as CMU faces) to about [-2, 2]:
# (x / 255 - 0.5) / 0.25, with one arithmetic for the evaluation transform (here) and for
# the 8-bit training batches (on the device), so both give the network the same floats.
GREY_MEAN, GREY_STD = (0.5,), (0.25,)
GREY_PIXELS = PixelInput(GREY_MEAN, GREY_STD)
# attribute -> label names it may have in a dataset (first found in the manifest's schemas wins)
ATTRIBUTE_ALIASES: dict[str, tuple[str, ...]] = {
    "gender": ("gender",), "emotion": ("emotion", "expression"), "pose": ("pose", "posture"),
    "facial_hair": ("facial_hair",), "spectacles": ("spectacles", "sunglasses")}


class MissingModalityError(RecipeDataError):
    """The data lack a member the recipe needs (one-line message)."""


@dataclass
class PhotometricParams:
    modality: Literal["albedo", "normal", "depth", "image"] = "albedo"  # photometric_mtl only
    backbone: Literal["ir_se", "cbam_resnet", "convnextv2"] = "cbam_resnet"
    img_size: int = 64                       # IR-SE: divisible by 16 (112 is the classic IR-SE-50)
    embedding_dim: int = 512                 # identity embedding per modality
    separation: bool = True                  # Feature Separation Module (identity / non-identity parts)
    nonid_dim: int = 256
    dropout: float = 0.0
    # ir_se
    irse_blocks: list[int] = field(default_factory=lambda: [3, 4, 14, 3])   # IR-SE-50
    irse_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    # cbam_resnet
    cbam_width: int = 32
    cbam_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    # convnextv2 (timm)
    convnext_name: str = "convnextv2_atto"
    pretrained: bool = start_option()        # timm hub weights (network or the HF cache; never a silent fallback)
    weights_path: str = start_file()
    # identity: MagFace
    magface_s: float = 64.0
    magface_l_a: float = 10.0
    magface_u_a: float = 110.0
    magface_l_m: float = 0.45
    magface_u_m: float = 0.8
    magface_lambda_g: float = 35.0
    # partial_fc: the MagFace centres split across the training ranks (Partial FC,
    # recipes/identity_head.py), for identities that do not fit one GPU; sample_rate < 1 samples
    # the negative centres.
    identity_head_sharding: Literal["none", "partial_fc"] = "none"
    sample_rate: float = 1.0
    identity_class_weights: list[float] = field(default_factory=list)   # [] = equal
    # attributes
    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTE_ALIASES))
    focal_gamma: float = 2.0
    focal_alpha: float = 1.0
    attribute_class_weights: dict[str, list[float]] = field(default_factory=dict)
    adversarial_weight: float = 0.1          # GRL attribute heads on the identity part (needs separation)
    grl_gamma: float = 10.0
    # task weighting
    task_weighting: Literal["uncertainty", "fixed"] = "uncertainty"
    task_weights: dict[str, float] = field(default_factory=dict)   # fixed: {identity: 1, gender: 1, ...}
    # augmentation
    augment: bool = True
    p_crop: float = 0.5
    crop_scale_min: float = 0.8
    p_noise: float = 0.3
    noise_std: float = 0.05
    # the albedo / normal / depth maps leave the DataLoader workers as 8 bits per value (a quarter
    # of float32's bytes): each channel of each sample quantised over its own range, so every
    # value the network sees moves by at most 1/510 of that range (off: float32, exact)
    maps_8bit: bool = False
    # evaluation
    verification: bool = True
    val_max_pairs: int = 200_000
    pair_seed: int = 0

    def __post_init__(self) -> None:
        if self.img_size < 16 or self.embedding_dim < 1 or self.nonid_dim < 1:
            raise ValueError("img_size must be >= 16, embedding_dim and nonid_dim >= 1")
        check_sharding(self.identity_head_sharding, self.sample_rate, "magface")
        if self.backbone == "ir_se" and (self.img_size % 16 or len(self.irse_blocks) != 4
                                         or len(self.irse_widths) != 4):
            raise ValueError(f"ir_se needs img_size divisible by 16 (got {self.img_size}) and four "
                             "irse_blocks / irse_widths")
        if self.backbone == "cbam_resnet" and (self.cbam_width < 1 or not self.cbam_blocks):
            raise ValueError("cbam_width must be >= 1 and cbam_blocks non-empty")
        if self.backbone == "convnextv2" and not self.convnext_name.startswith("convnextv2_"):
            raise ValueError(f"convnext_name must be a timm convnextv2_* model, got {self.convnext_name!r}")
        if self.pretrained and self.weights_path:
            raise ValueError("set either pretrained (timm hub) or weights_path (local file), not both")
        if (self.pretrained or self.weights_path) and self.backbone != "convnextv2":
            raise ValueError("pretrained / weights_path are for backbone convnextv2 (ir_se and cbam_resnet start "
                             "from random weights)")
        unknown = [a for a in self.attributes if a not in ATTRIBUTE_ALIASES]
        if unknown:
            raise ValueError(f"attributes: unknown {unknown} (known: {', '.join(ATTRIBUTE_ALIASES)})")
        bad = [k for k in self.attribute_class_weights if k not in self.attributes]
        if bad:
            raise ValueError(f"attribute_class_weights: {bad} not among attributes {self.attributes}")
        bad = [k for k in self.task_weights if k not in ("identity", *self.attributes)]
        if bad:
            raise ValueError(f"task_weights: {bad} not among identity, {', '.join(self.attributes)}")
        if min([self.adversarial_weight, self.focal_gamma, self.focal_alpha, *self.task_weights.values(),
                *self.identity_class_weights,
                *(w for ws in self.attribute_class_weights.values() for w in ws)], default=0.0) < 0:
            raise ValueError("loss weights, class weights, focal gamma/alpha must be >= 0")
        for name, p in (("p_crop", self.p_crop), ("p_noise", self.p_noise)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError("crop_scale_min must be in (0, 1]")
        MagFaceLoss(self.magface_s, self.magface_l_a, self.magface_u_a, self.magface_l_m, self.magface_u_m,
                    self.magface_lambda_g)  # raises on an impossible range

    def magface_loss(self, weight: torch.Tensor | None = None) -> MagFaceLoss:
        return MagFaceLoss(self.magface_s, self.magface_l_a, self.magface_u_a, self.magface_l_m,
                           self.magface_u_m, self.magface_lambda_g, weight)


# ----------------------------------------------------------------------------- model

def build_encoder(p: PhotometricParams, in_chans: int) -> PhotometricEncoder:
    if p.backbone == "ir_se":
        bb: nn.Module = IRSE(in_chans, p.img_size, p.embedding_dim, p.irse_blocks, p.irse_widths, p.dropout)
    elif p.backbone == "cbam_resnet":
        bb = CbamResNet(in_chans, p.embedding_dim, p.cbam_width, p.cbam_blocks)
    else:
        weights: bool | str = p.weights_path or p.pretrained
        model, feat = build_backbone(p.convnext_name, weights, in_chans=in_chans)
        bb = TimmFeatures(model, feat)
    return PhotometricEncoder(bb, p.embedding_dim, p.separation, p.nonid_dim, p.dropout)


class PhotometricModel(nn.Module):
    """``forward(batch)`` -> ``loss``, ``terms``, ``embedding`` (the concatenated identity
    parts), ``identity_logits`` (``s * cos``, no margin), ``<attribute>_logits``."""

    def __init__(self, p: PhotometricParams, inputs: Sequence[tuple[str, int]], num_identities: int,
                 attributes: Sequence[tuple[str, int]], train_forwards: int | None = None,
                 parallel: ParallelContext = ParallelContext()):
        super().__init__()
        self.inputs = [k for k, _ in inputs]
        self.attributes = [a for a, _ in attributes]
        self.encoders = nn.ModuleDict({k: build_encoder(p, c) for k, c in inputs})
        emb_dim = sum(e.embedding_dim for e in self.encoders.values())
        attr_dim = sum(e.attr_dim for e in self.encoders.values())
        self.identity_head = (MagLinear(emb_dim, max(1, num_identities), p.magface_l_a, p.magface_u_a)
                              if p.identity_head_sharding == "none" else
                              build_head("magface", p.identity_head_sharding, p.sample_rate, emb_dim,
                                         max(1, num_identities), p.magface_s, None, parallel))
        id_w = torch.tensor(p.identity_class_weights, dtype=torch.float32) if p.identity_class_weights else None
        if id_w is not None and id_w.numel() != max(1, num_identities):
            raise ValueError(f"identity_class_weights has {id_w.numel()} values for {num_identities} identities")
        self.magface = p.magface_loss(id_w)
        self.attr_heads = nn.ModuleDict({a: nn.Linear(attr_dim, c) for a, c in attributes})
        self.focal = nn.ModuleDict()
        for a, c in attributes:
            w = p.attribute_class_weights.get(a)
            if w and len(w) != c:
                raise ValueError(f"attribute_class_weights.{a} has {len(w)} values for {c} classes")
            self.focal[a] = FocalLoss(p.focal_gamma, torch.tensor(w, dtype=torch.float32) if w else None,
                                      alpha=p.focal_alpha)
        self.adv_weight = p.adversarial_weight if p.separation and attributes else 0.0
        if self.adv_weight > 0:
            # lambda follows the fraction of the run done; a model built outside a run
            # (inference, tests) has no run: full strength from the first forward
            self.grl = GradientReversal(train_forwards or 1, p.grl_gamma)
            self.adv_heads = nn.ModuleDict({a: nn.Linear(emb_dim, c) for a, c in attributes})
        names = ["identity", *self.attributes]
        self.task_weighting = DynamicLossWeights(names) if p.task_weighting == "uncertainty" else None
        self.fixed_weights = {n: float(p.task_weights.get(n, 1.0)) for n in names}
        # 8-bit inputs (the grey image in training) are normalised here, on the device, then
        # get the augmentation noise the workers drew a seed for (noise_seed)
        self.pixels = PixelInput(GREY_MEAN, GREY_STD)
        self.noise_std = p.noise_std

    def _sharded_identity(self, emb: torch.Tensor, identity: torch.Tensor | None
                          ) -> tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]:
        """MagFace over centres sharded across ranks: the magnitude, its margin and its
        regulariser are this rank's rows' (as MagLinear + MagFaceLoss); the softmax spans the ranks."""
        head, mag = self.identity_head, self.magface
        magnitude = emb.float().norm(dim=1).clamp(mag.l_a, mag.u_a)
        _, out = identity_outputs(head, emb, None, 0.0, self.training)
        out.update(embedding=emb, magnitude=magnitude)
        zero = emb.float().sum() * 0.0
        if identity is None:
            return out, zero + magnitude.sum() * 0.0, {"g": zero}
        labels = identity.long()
        valid = (labels >= 0) & (labels < head.num_classes)
        weight = None if mag.weight is None else mag.weight[labels.clamp(0, head.num_classes - 1)]
        ce = head.loss(emb, labels, row_margin=mag.margin(magnitude), row_weight=weight)
        g = masked_mean_of_sum((mag.regularizer(magnitude) * valid).sum(), valid.sum())
        return out, ce + mag.lambda_g * g, {"ce": ce, "g": g}

    def network_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Each input as the network takes it: maps handed over as 8 bits back to floats
        (``<input>_range``), the 8-bit grey image normalised (:data:`GREY_PIXELS`' arithmetic)
        and, in training, with the noise of its ``noise_seed``."""
        seeds = batch.get("noise_seed") if self.training else None
        out = {}
        for k in self.inputs:
            x = batch[k]
            if f"{k}_range" in batch:       # a map handed over as 8 bits (maps_8bit)
                out[k] = dequantise_map(x, batch[f"{k}_range"])
                continue
            eight_bit = x.dtype == torch.uint8
            x = self.pixels(x)
            out[k] = seeded_noise(x, seeds, self.noise_std) if eight_bit and seeds is not None else x
        return out

    def features(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.network_inputs(batch)
        ids, attrs = zip(*(self.encoders[k](inputs[k]) for k in self.inputs))
        return torch.cat(ids, 1), torch.cat(attrs, 1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """One-input models (photometric_mtl): the identity embedding of ``images``."""
        if len(self.inputs) != 1:
            raise ValueError(f"embed() takes one input; this model needs {', '.join(self.inputs)}")
        return self.features({self.inputs[0]: images})[0]

    def features_as(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        """One-input models: ``embedding`` (the identity part, :meth:`embed`), ``backbone``
        (the backbone's pooled features, before the Feature Separation Module) or
        ``non_identity`` (the FSM's non-identity part, what the attribute heads read)."""
        if len(self.inputs) != 1:
            raise ValueError(f"features_as() takes one input; this model needs {', '.join(self.inputs)}")
        encoder = self.encoders[self.inputs[0]]
        feat = encoder.backbone(self.pixels(images))
        if kind == "backbone" or encoder.fsm is None:
            return feat
        identity, non_identity = encoder.fsm(feat)
        return identity if kind == "embedding" else non_identity

    def predict(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inference outputs of the named (normalised) maps, what the deployment graph
        holds: ``embedding``, ``identity_logits`` (``s * cos``, as in evaluation) and
        ``<attribute>_logits``."""
        emb, attr_feat = self.features(maps)
        if isinstance(self.identity_head, ShardedMarginHead):
            out = dict(identity_outputs(self.identity_head, emb, None, 0.0, False)[1])
        else:
            out = {"identity_logits": self.identity_head(emb)[0] * self.magface.s}
        out["embedding"] = emb
        out.update({f"{a}_logits": self.attr_heads[a](attr_feat) for a in self.attributes})
        return out

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        emb, attr_feat = self.features(batch)
        zero = emb.float().sum() * 0.0
        identity = batch.get("identity")
        if isinstance(self.identity_head, ShardedMarginHead):
            out, l_id, parts = self._sharded_identity(emb, identity)
        else:
            cos, magnitude = self.identity_head(emb)
            out = {"embedding": emb, "identity_logits": cos * self.magface.s, "magnitude": magnitude}
            if identity is not None:
                l_id, parts = self.magface(cos, magnitude, identity)
            else:
                l_id, parts = zero + magnitude.sum() * 0.0, {"g": zero}
        terms: dict[str, torch.Tensor] = {"identity": l_id, "magface_g": parts["g"].detach()}
        for a in self.attributes:
            logits = self.attr_heads[a](attr_feat)
            out[f"{a}_logits"] = logits
            labels = batch.get(a)
            terms[a] = self.focal[a](logits, labels) if labels is not None else logits.float().sum() * 0.0
        task_terms = {n: terms[n] for n in ("identity", *self.attributes)}
        if self.task_weighting is not None:
            loss = self.task_weighting(task_terms)
        else:
            loss = sum(self.fixed_weights[n] * v for n, v in task_terms.items())
        if self.adv_weight > 0:
            reversed_emb = self.grl(emb)
            for a in self.attributes:
                logits = self.adv_heads[a](reversed_emb)
                labels = batch.get(a)
                terms[f"adv_{a}"] = (masked_cross_entropy(logits, labels) if labels is not None
                                     else logits.float().sum() * 0.0)
                loss = loss + self.adv_weight * terms[f"adv_{a}"]
        out["loss"] = loss
        out["terms"] = terms
        return out


# ----------------------------------------------------------------------------- metrics

def one_vs_rest_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Macro ROC AUC over the classes that have both positives and negatives in ``y``."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y == c, prob[:, c]) for c in range(prob.shape[1]) if 0 < (y == c).sum() < y.size]
    return float(np.mean(aucs)) if aucs else float("nan")


def _identity_not_computed(states: list[Any]) -> float:
    """Why identity top-1 has no value: no trained identity in a labelled split, or no labels."""
    labelled = any((s["identity"] >= 0).any() for s in states)
    return NotComputed("identity-disjoint split: no identity of it was trained on (see the verification metrics)"
                       if labelled else "no identity labels in the split")


class PhotometricMetrics(Metrics):
    """State: identity truth/prediction (and whether the identity was trained on:
    ``trained``, ``DataInfo.trained_identities``, None = every one), per attribute truth
    and class probabilities, and the verification state (embeddings, identities).
    Identity top-1 / macro-F1 count the rows of trained identities; an identity-disjoint
    split has none: not computed, with the reason (not 0.0)."""

    def __init__(self, attributes: Sequence[str], verification: bool, max_pairs: int = 200_000, seed: int = 0,
                 trained: Sequence[int] | None = None):
        self.attributes = list(attributes)
        self.trained = None if trained is None else np.asarray(sorted(trained), np.int64)
        self.verification = VerificationMetrics(max_pairs, seed) if verification else None
        self.cols: dict[str, list[np.ndarray]] = {}

    def _add(self, key: str, v: np.ndarray) -> None:
        self.cols.setdefault(key, []).append(v)

    def update(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        if self.verification is not None:
            self.verification.update(outputs, batch)
        top = top_identities(outputs, 1)[0]
        n = top.shape[0]
        valid = valid_mask(batch, n)
        identity = label_column(batch, "identity", n)
        self._add("identity", identity[valid])
        self._add("identity_known", (np.ones(n, bool) if self.trained is None
                                     else np.isin(identity, self.trained))[valid])
        self._add("identity_pred", top[:, 0].numpy()[valid])
        for a in self.attributes:
            self._add(a, label_column(batch, a, n)[valid])
            self._add(f"{a}_prob", outputs[f"{a}_logits"].detach().float().softmax(1).cpu().numpy()[valid])

    def state(self) -> dict[str, Any]:
        return {"attributes": self.attributes,
                "verification": self.verification.state() if self.verification is not None else None,
                **{k: np.concatenate(v) for k, v in self.cols.items()}}

    @staticmethod
    def names(attributes: Sequence[str], verification: bool) -> frozenset[str]:
        """What :meth:`compute` may return for these attributes (those the data label)."""
        per_attribute = {f"{a}_{m}" for a in attributes for m in ("acc", "macro_f1", "auc")}
        return frozenset({"identity_top1", "identity_macro_f1", "attr_mean_acc", "score", *per_attribute}) | \
            (VerificationMetrics.NAMES if verification else frozenset())

    @staticmethod
    def task_predictions(states: list[Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{task: (labelled truth, prediction)}`` over all ranks (identity first)."""
        states = [s for s in states if "identity" in s]
        if not states:
            return {}
        out = {}
        y = np.concatenate([s["identity"] for s in states])
        yp = np.concatenate([s["identity_pred"] for s in states])
        known = np.concatenate([s.get("identity_known", np.ones(len(s["identity"]), bool)) for s in states])
        scored = (y >= 0) & known.astype(bool)
        out["identity"] = (y[scored], yp[scored])
        for a in states[0]["attributes"]:
            y = np.concatenate([s[a] for s in states])
            prob = np.concatenate([s[f"{a}_prob"] for s in states])
            out[a] = (y[y >= 0], prob[y >= 0].argmax(1))
        return out

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        from sklearn.metrics import f1_score

        nan = float("nan")
        out: dict[str, float] = {}
        full = [s for s in states if "identity" in s]
        preds = PhotometricMetrics.task_predictions(states)
        accs = []
        for task, (y, yp) in preds.items():
            key = "identity_top1" if task == "identity" else f"{task}_acc"
            missing = nan if task != "identity" else _identity_not_computed(full)
            out[key] = float((y == yp).mean()) if y.size else missing
            out[f"{task}_macro_f1"] = float(f1_score(y, yp, average="macro", zero_division=0)) if y.size else missing
            if task != "identity":
                yy = np.concatenate([s[task] for s in full])
                prob = np.concatenate([s[f"{task}_prob"] for s in full])
                out[f"{task}_auc"] = one_vs_rest_auc(yy[yy >= 0], prob[yy >= 0]) if (yy >= 0).any() else nan
                accs.append(out[key])
        accs = [v for v in accs if not math.isnan(v)]
        out["attr_mean_acc"] = float(np.mean(accs)) if accs else nan
        parts = [v for v in [out.get("identity_top1", nan), *accs] if not math.isnan(v)]
        out["score"] = float(np.mean(parts)) if parts else nan
        ver = [s["verification"] for s in states if s.get("verification") is not None]
        if ver:
            out.update(VerificationMetrics.compute(ver))
        return out


# ----------------------------------------------------------------------------- inputs

def _array_tensor(arr: np.ndarray, chans: int, what: str) -> torch.Tensor:
    a = np.asarray(arr)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{what}: expected a numeric array, got dtype {a.dtype}")
    a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{what}: expected HxW or HxWxC, got shape {a.shape}")
    if a.shape[2] == 1 and chans == 3:
        a = np.repeat(a, 3, 2)
    if a.shape[2] != chans:
        raise ValueError(f"{what}: expected {chans} channel(s), got shape {a.shape}")
    return torch.from_numpy(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)).permute(2, 0, 1).contiguous()


def normalise(kind: str, t: torch.Tensor) -> torch.Tensor:
    """Albedo to about [-2, 2] (0..255 data rescaled first), normals as they are,
    depth standardised per sample (its unit and offset vary by scanner). (The grey
    image: :data:`GREY_PIXELS`.)"""
    if kind == "albedo":
        if float(t.max()) > 1.5:
            t = t / 255.0
        return (t - 0.5) / 0.25
    if kind == "depth":
        return (t - t.mean()) / t.std().clamp(min=1e-6)
    return t


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[-2:] == (size, size):
        return t
    return F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


# ----------------------------------------------------------------------------- recipe

class _PhotometricBase(Recipe):
    Params = PhotometricParams

    def input_kinds(self) -> tuple[str, ...]:
        raise NotImplementedError

    def __init__(self, params: PhotometricParams, data_info: DataInfo):
        super().__init__(params, data_info)
        self._check_modalities(data_info)
        schemas = data_info.label_schemas or {}
        self.tasks: list[tuple[str, str, int]] = []   # (attribute, label key in the data, classes)
        for a in params.attributes:
            key = next((k for k in ATTRIBUTE_ALIASES[a] if k in schemas), None)
            if key is None:
                log.info("attribute %s: no label schema (%s) in the data: not a task", a,
                         "/".join(ATTRIBUTE_ALIASES[a]))
                continue
            self.tasks.append((a, key, max(2, len(schemas[key]))))
        self.class_names = {a: tuple(schemas[k]) for a, k, _ in self.tasks}
        self.augment = (ArrayAugment(params.p_crop, (params.crop_scale_min, 1.0), p_noise=params.p_noise,
                                     noise_std=params.noise_std) if params.augment else None)
        warning = params.magface_loss().check()
        if warning:
            log.warning("%s", warning)

    def _check_modalities(self, info: DataInfo) -> None:
        have = set(info.modalities)
        if not have:  # a DataInfo without member names (tests, old checkpoints): the transform checks
            return
        missing = []
        for kind in self.input_kinds():
            if kind == "image":
                if not have & set(IMAGE_KEYS):
                    missing.append("a grey image (image.png, ...)")
            elif f"{kind}.npy" not in have:
                missing.append(f"{kind}.npy")
        if missing:
            raise MissingModalityError(f"{self.name}: the data lack {', '.join(missing)} (they have "
                                       f"{', '.join(sorted(have))}); photometric data: synthetic modality 'maps' or "
                                       "biomtl shards create --format photometric")

    def _grey(self, sample: Mapping[str, Any], train: bool) -> tuple[torch.Tensor, int | None]:
        """The grey image as 8-bit pixels (the hand-off in training; evaluation normalises
        them here with the device's arithmetic, :data:`GREY_PIXELS`) and, in training with
        augmentation, its noise seed (noise is added after the hand-off: ``-1`` none)."""
        img = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if img is None:
            raise MissingModalityError(f"sample {sample.get('__key__')!r} has no image member (has {sorted(sample)})")
        t = _resize(torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32))[None], self.params.img_size)
        seed = None
        if train and self.augment is not None:
            t = self.augment.crop(t)
            seed = self.augment.noise_seed()
        # bilinear (antialiased) resizes and crops mix pixels with weights >= 0 summing to 1: values
        # stay in 0..255, and rounding moves them by at most half a level
        t8 = t.clamp_(0, 255).round_().to(torch.uint8)
        return (t8 if train else GREY_PIXELS(t8[None])[0]), seed

    def _input(self, sample: Mapping[str, Any], kind: str) -> torch.Tensor:
        key = sample.get("__key__")
        arr = sample.get(f"{kind}.npy")
        if arr is None:
            raise MissingModalityError(f"sample {key!r} has no {kind}.npy (has {sorted(sample)})")
        t = _array_tensor(arr, MAP_CHANNELS[kind], f"sample {key!r} {kind}.npy")
        return normalise(kind, _resize(t, self.params.img_size))

    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in self.input_kinds():
            if kind == "image":
                out[self.input_key(kind)], seed = self._grey(sample, train)
                if seed is not None:
                    out["noise_seed"] = torch.tensor(seed, dtype=torch.long)
                continue
            t = self._input(sample, kind)
            if train and self.augment is not None:
                t = self.augment(t)
            if train and self.params.maps_8bit:
                t, out[f"{self.input_key(kind)}_range"] = quantise_map(t)
            out[self.input_key(kind)] = t
        meta = sample.get("json") or {}
        out["identity"] = torch.tensor(class_label(meta, "identity", self.data_info.num_identities, check=train),
                                       dtype=torch.long)
        for a, key, classes in self.tasks:
            out[a] = torch.tensor(class_label(meta, key, classes, check=train), dtype=torch.long)
        return out

    def input_key(self, kind: str) -> str:
        return kind

    def deploy_inputs(self) -> dict[str, tuple[int, ...]]:
        """One graph input per map (``albedo``, ``normal``, ``depth``; ``image`` for a grey
        image), normalised as :meth:`transform` makes them."""
        size = self.params.img_size
        return {self.input_key(k): (MAP_CHANNELS[k], size, size) for k in self.input_kinds()}

    def build_model(self) -> nn.Module:
        inputs = [(self.input_key(k), MAP_CHANNELS[k]) for k in self.input_kinds()]
        return PhotometricModel(self.params, inputs, self.data_info.num_identities,
                                [(a, c) for a, _, c in self.tasks], self.train_forwards, self.parallel)

    def use_ranks(self, parallel: ParallelContext) -> None:
        check_ranks(self.params.identity_head_sharding, max(self.data_info.num_identities, 1), parallel)
        super().use_ranks(parallel)

    def new_metrics(self) -> Metrics:
        return PhotometricMetrics([a for a, _, _ in self.tasks], self.params.verification,
                                  self.params.val_max_pairs, self.params.pair_seed, self.data_info.trained_identities)

    @classmethod
    def validation_metric_names(cls, params: PhotometricParams) -> frozenset[str]:
        return PhotometricMetrics.names(params.attributes, params.verification)

    def write_artifacts(self, model: nn.Module, ctx: ArtifactContext) -> dict[str, float]:
        """Test metrics (all ranks) and, on rank 0, ``plots/confusion_matrices.png``."""
        loader = ctx.loaders.get("test")
        if loader is None:
            return {}
        module = getattr(model, "module", model)
        metrics = self.new_metrics()
        param = next(module.parameters())
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for batch in loader:
                metrics.update(module(move_batch(batch, param.device, param.dtype)), batch)
        module.train(was_training)
        states = ctx.gather(metrics.state())
        result = PhotometricMetrics.compute(states)
        if ctx.is_main:
            preds = PhotometricMetrics.task_predictions(states)
            if preds:
                ctx.publish(Path(ctx.run_dir) / "plots" / "confusion_matrices.png",
                            lambda tmp: self._plot_confusions(tmp, preds))
        return result

    def _plot_confusions(self, path: Path, preds: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        import matplotlib.pyplot as plt

        n_classes = {"identity": max(1, self.data_info.num_identities), **{a: c for a, _, c in self.tasks}}
        fig = confusion_figure(preds, n_classes, self.class_names)
        try:
            fig.savefig(path, dpi=CONFUSION_DPI, format="png")
        finally:
            plt.close(fig)


CONFUSION_DPI = 110
PANELS_PER_ROW = 3


def _panel_inches(classes: int) -> float:
    """A panel grows with its classes (about 0.2 in, 22 px, per class), so a
    matrix of many identities stays readable; never below 4.5 in."""
    return float(min(max(4.5, 2.5 + 0.2 * classes), 16.0))


def confusion_figure(preds: Mapping[str, tuple[np.ndarray, np.ndarray]], n_classes: Mapping[str, int],
                     class_names: Mapping[str, Sequence[str]]) -> Any:
    """One confusion-matrix panel per task, at most :data:`PANELS_PER_ROW` a row,
    each sized for its class count, with a colour bar; class names and counts
    written in the cells where they fit (at most 12 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    tasks = list(preds)
    cols = min(PANELS_PER_ROW, len(tasks))
    rows = -(-len(tasks) // cols)
    side = max(_panel_inches(n_classes[t]) for t in tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols * 1.15, side * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        y, yp = preds[task]
        c = n_classes[task]
        cm = confusion_matrix(y, yp, labels=list(range(c))) if y.size else np.zeros((c, c), int)
        fig.colorbar(ax.imshow(cm, cmap="Blues"), ax=ax, fraction=0.046, pad=0.04)
        acc = float((y == yp).mean()) if y.size else float("nan")
        ax.set_title(f"{task} (acc {acc:.3f}, n={y.size})", fontsize=12)
        ax.set_xlabel("predicted", fontsize=10)
        ax.set_ylabel("true", fontsize=10)
        names = class_names.get(task)
        if c <= 12:
            labels = list(names) if names else [str(i) for i in range(c)]
            ax.set_xticks(range(c), labels, rotation=45, fontsize=9, ha="right")
            ax.set_yticks(range(c), labels, fontsize=9)
            top = cm.max() if cm.size else 0
            for i in range(c):
                for j in range(c):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                            color="white" if top and cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


@register
class PhotometricMtlRecipe(_PhotometricBase):
    """One modality (``params.modality``) -> identity + attributes."""

    name = "photometric_mtl"

    def input_kinds(self) -> tuple[str, ...]:
        return (self.params.modality,)

    def input_key(self, kind: str) -> str:
        return "image"   # one input: the key InferenceEngine and the embedding table use

    def feature_types(self) -> tuple[str, ...]:
        """``embedding`` (the identity part; what ``embed`` gives), and with the Feature
        Separation Module ``backbone`` (the pooled features before it) and
        ``non_identity`` (its attribute part)."""
        return ("embedding", "backbone", "non_identity") if self.params.separation else ("embedding",)

    def embed_as(self, model: nn.Module, images: torch.Tensor, feature_type: str) -> torch.Tensor:
        return model.features_as(images, feature_type)


@register
class PhotometricConcatRecipe(_PhotometricBase):
    """Albedo, normal and depth networks; identity embeddings concatenated (3 x embedding_dim)."""

    name = "photometric_concat"

    def input_kinds(self) -> tuple[str, ...]:
        return MAPS
