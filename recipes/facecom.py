"""FaceCom recipe: gender + identity from (possibly degraded) face images.

Data (one shard sample):
- image: the first of :data:`recipes.image_input.IMAGE_KEYS` that is present
  (``vis.png`` in the built-in synthetic shards; a decoded ``PIL.Image``; grey
  images are converted to RGB);
- ``json``: ``identity`` (int, index into the manifest's identities; missing or
  ``-1`` = unlabelled) and ``gender`` (int 0/1; missing or ``-1`` = unlabelled).
  Unlabelled rows are ignored by the losses and the metrics.

``transform`` -> ``{"image": [3, S, S] (training: uint8 pixels, normalised on the device by
:class:`models.pixels.PixelInput`; evaluation: float, ImageNet-normalised), "identity": long,
"gender": long}``. Training adds the degradation augmentations
(:mod:`models.augment`), a horizontal flip and a mild random resized crop.

Model: timm backbone -> dropout -> linear -> BatchNorm1d|LayerNorm|none (the embedding, size
``embedding_dim``); a linear gender head (2 classes) and an identity head
(``linear`` | ``arcface`` | ``cosface``) on the embedding.
``loss = alpha * CE(gender) + beta * CE(identity)``; ``terms`` holds the two
unweighted CEs.

Metrics: gender accuracy / precision / recall / F1 (binary, positive class 1) /
macro F1; identity top-1, top-5, macro F1 (sklearn, labels = those present in
truth or prediction); ``combined = 0.3 * gender_macro_f1 + 0.7 * identity_macro_f1``
(the FaceCom weighting "0.3 gender + 0.7 identity"; macro F1 because FaceCom
gender is heavily imbalanced and macro F1 does not depend on which gender is
coded 1). A metric with no labelled row is NaN.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from models.augment import degradation_transforms
from models.backbones import build_backbone
from models.losses import SupConLoss, TwinAwareTripletLoss, masked_cross_entropy
from models.pixels import PixelInput
from recipes.base import (ArtifactContext, DataInfo, Metrics, ParallelContext, Recipe, register, start_file,
                          start_option)
from recipes.identity_head import build_head, check_ranks, check_sharding, identity_outputs, top_identities
from recipes.batch import label_column, move_batch, sample_keys, valid_mask
from recipes.history_plots import plot_history
from recipes.image_input import IMAGENET_MEAN, face_transforms, pick_rgb_image
from recipes.init_weights import check_init_from, load_init_weights
from recipes.labels import class_label
from recipes.metrics_json import NotComputed
from recipes.verification import VerificationMetrics

log = logging.getLogger("biomtl.facecom")



# Tensors whose shape follows the training identities / label sets: init_from may skip them.
FACECOM_HEADS = ("identity_head.", "gender_head.")
# submission.csv (and the first columns of `biomtl predict`): names and top-class probabilities
SUBMISSION_COLUMNS = ["key", "gender", "gender_confidence", "identity", "confidence"]


@dataclass
class FaceComParams:
    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # more timm kwargs (channels, drop_path_rate, ...)
    pretrained: bool = start_option()        # timm hub weights (needs network or the HF cache)
    weights_path: str = start_file()         # local .pth/.safetensors backbone weights
    # A previous run's RUN/model.pt (or checkpoint) to start from, e.g. a run on many
    # synthetic identities; the identity/gender heads may differ (recipes/init_weights.py).
    init_from: str = start_file()
    img_size: int = 64
    embedding_dim: int = 128
    # avg: global average pooling. flatten: the whole last feature map goes into the
    # embedding layer (the ArcFace "BN-Dropout-FC-BN" output layer), so the embedding
    # keeps *where* on the face a feature is: what few training identities cannot teach.
    embedding_pool: Literal["avg", "flatten"] = "avg"
    # batchnorm is the usual face-embedding neck; layernorm/none make a step
    # independent of how a batch is split (exact gradient-accumulation parity).
    embedding_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    dropout: float = 0.2
    alpha: float = 0.3                        # gender loss weight
    beta: float = 1.0                         # identity loss weight
    identity_head: Literal["linear", "arcface", "cosface"] = "arcface"
    margin_s: float = 30.0
    margin_m: float | None = None             # None: 0.5 rad for ArcFace, 0.35 for CosFace
    # partial_fc: the identity centres split across the training ranks, for identities that do
    # not fit one GPU (Partial FC; recipes/identity_head.py); sample_rate < 1 then puts only the
    # batch's own identities and that share of the other centres in each step's softmax.
    identity_head_sharding: Literal["none", "partial_fc"] = "none"
    sample_rate: float = 1.0
    label_smoothing: float = 0.0
    # A metric loss on the embedding beside the identity classifier (for verification of
    # identities never trained on); both are twin-aware (co-twins as hard negatives) and
    # want several images per identity in a batch: data.batching=pk.
    metric_loss: Literal["none", "triplet", "supcon"] = "none"
    metric_weight: float = 1.0
    triplet_margin: float = 0.3
    supcon_temperature: float = 0.1
    backbone_lr_mult: float = 1.0             # LR multiplier of the backbone (e.g. 0.1 when pretrained)
    augment: bool = True
    p_blur: float = 0.3
    p_noise: float = 0.3
    p_low_light: float = 0.3
    p_haze: float = 0.2
    p_jpeg: float = 0.3
    p_flip: float = 0.5
    crop_scale_min: float = 0.85              # RandomResizedCrop lower scale; 1.0 disables the crop
    # Face-preserving geometry / occlusion: a small rotation+shift (degrees; the shift is
    # degrees/100 of the size) and random erasing of a patch of 2-15 % of the image.
    rotate_degrees: float = 0.0
    p_erase: float = 0.0
    # Grey input (three equal channels) for training and inference: the grey real face sets
    # then look like colour pretraining data, which can no longer lean on skin or hair colour.
    grayscale: bool = False

    def __post_init__(self) -> None:
        for name in ("p_blur", "p_noise", "p_low_light", "p_haze", "p_jpeg", "p_flip", "p_erase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.img_size < 8 or self.embedding_dim < 1:
            raise ValueError("img_size must be >= 8 and embedding_dim >= 1")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError("crop_scale_min must be in (0, 1]")
        if not 0.0 <= self.rotate_degrees <= 45.0:
            raise ValueError(f"rotate_degrees must be in [0, 45], got {self.rotate_degrees}")
        if self.pretrained and self.weights_path:
            raise ValueError("set either pretrained (timm hub) or weights_path (local file), not both")
        if self.init_from and (self.pretrained or self.weights_path):
            raise ValueError("init_from already sets every backbone weight: drop pretrained / weights_path")
        check_sharding(self.identity_head_sharding, self.sample_rate, self.identity_head)


def _flat_feature_size(backbone: nn.Module, img_size: int) -> int:
    """Values in the unpooled feature map of one image (eval mode: the probe leaves
    BatchNorm statistics alone; on the meta device it computes nothing)."""
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype))
    backbone.train(was_training)
    return int(out[0].numel())


class FaceComModel(nn.Module):
    def __init__(self, p: FaceComParams, num_identities: int, num_genders: int = 2,
                 parallel: ParallelContext = ParallelContext()):
        super().__init__()
        self.alpha, self.beta, self.label_smoothing = p.alpha, p.beta, p.label_smoothing
        weights: bool | str = p.weights_path or p.pretrained
        kwargs = dict(p.backbone_kwargs, **({"global_pool": ""} if p.embedding_pool == "flatten" else {}))
        self.pixels = PixelInput()  # training batches arrive as 8-bit pixels
        self.backbone, feat = build_backbone(p.backbone, weights, img_size=p.img_size, **kwargs)
        if p.embedding_pool == "flatten":
            feat = _flat_feature_size(self.backbone, p.img_size)
        norm = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}.get(p.embedding_norm)
        self.neck = nn.Sequential(nn.Dropout(p.dropout), nn.Linear(feat, p.embedding_dim),
                                  norm(p.embedding_dim) if norm else nn.Identity())
        self.gender_head = nn.Linear(p.embedding_dim, num_genders)
        self.identity_head = build_head(p.identity_head, p.identity_head_sharding, p.sample_rate, p.embedding_dim,
                                        max(num_identities, 1), p.margin_s, p.margin_m, parallel)
        self.metric_weight = p.metric_weight
        self.metric = {"triplet": lambda: TwinAwareTripletLoss(p.triplet_margin),
                       "supcon": lambda: SupConLoss(p.supcon_temperature, twin_negative_weight=2.0),
                       "none": lambda: None}[p.metric_loss]()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(self.pixels(images)).flatten(1))

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference (the exported graph, dist_train/deploy.py): embedding and both heads."""
        emb = self.embed(images)
        _, identity = identity_outputs(self.identity_head, emb, None, 0.0, training=False)  # one process: logits
        return {"embedding": emb, "gender_logits": self.gender_head(emb), **identity}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        emb = self.embed(batch["image"])
        identity = batch.get("identity")
        gender = batch.get("gender")
        gender_logits = self.gender_head(emb)
        l_i, identity_out = identity_outputs(self.identity_head, emb, identity, self.label_smoothing, self.training)
        out: dict[str, Any] = {"gender_logits": gender_logits, **identity_out, "embedding": emb}
        zero = emb.float().sum() * 0.0
        l_g = masked_cross_entropy(gender_logits, gender, self.label_smoothing) if gender is not None else zero
        l_i = zero if l_i is None else l_i
        out["terms"] = {"gender": l_g, "identity": l_i}
        out["loss"] = self.alpha * l_g + self.beta * l_i
        if self.metric is not None:
            l_m = self.metric(emb, identity, batch.get("twin")) if identity is not None else zero
            out["terms"]["metric"] = l_m
            out["loss"] = out["loss"] + self.metric_weight * l_m
        return out


# ----------------------------------------------------------------------------- metrics

class FaceComMetrics(Metrics):
    NAMES = frozenset(("gender_acc", "gender_precision", "gender_recall", "gender_f1", "gender_macro_f1",
                       "identity_top1", "identity_top5", "identity_macro_f1", "combined"))

    """State: per-row arrays (gender true/pred, identity true/pred, top-5 hit, and
    whether the row's identity is one the classifier was trained on).
    ``trained``: the training split's identity labels (``DataInfo.trained_identities``;
    None: not known, every identity counts). The identity metrics are over the rows
    of trained identities: on an identity-disjoint split there are none, and top-1
    there would be 0.0 whatever the model (the verification metrics judge it)."""

    def __init__(self, trained: Sequence[int] | None = None) -> None:
        self.trained = None if trained is None else np.asarray(sorted(trained), np.int64)
        self.g_true: list[np.ndarray] = []
        self.g_pred: list[np.ndarray] = []
        self.i_true: list[np.ndarray] = []
        self.i_pred: list[np.ndarray] = []
        self.i_top5: list[np.ndarray] = []
        self.i_known: list[np.ndarray] = []

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> None:
        g_logits = outputs["gender_logits"].detach().float().cpu()
        top5 = top_identities(outputs, 5)[0].numpy()
        n = g_logits.shape[0]
        valid = valid_mask(batch, n)
        g_true, i_true = label_column(batch, "gender", n), label_column(batch, "identity", n)
        self.g_true.append(g_true[valid])
        self.g_pred.append(g_logits.argmax(1).numpy()[valid])
        self.i_true.append(i_true[valid])
        self.i_pred.append(top5[:, 0][valid])
        self.i_top5.append((top5 == i_true[:, None]).any(1)[valid])
        known = np.ones(n, bool) if self.trained is None else np.isin(i_true, self.trained)
        self.i_known.append(known[valid])

    def state(self) -> dict[str, np.ndarray]:
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return {"g_true": cat(self.g_true, np.int64), "g_pred": cat(self.g_pred, np.int64),
                "i_true": cat(self.i_true, np.int64), "i_pred": cat(self.i_pred, np.int64),
                "i_top5": cat(self.i_top5, bool), "i_known": cat(self.i_known, bool)}

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

        def cat(key: str) -> np.ndarray:
            return np.concatenate([s[key] for s in states]) if states else np.zeros(0)

        g_true, g_pred = cat("g_true"), cat("g_pred")
        i_true, i_pred, i_top5 = cat("i_true"), cat("i_pred"), cat("i_top5")
        i_known = (np.concatenate([s.get("i_known", np.ones(len(s["i_true"]), bool)) for s in states])
                   if states else np.zeros(0, bool))
        out: dict[str, float] = {}
        gm = g_true >= 0
        if gm.any():
            gt, gp = g_true[gm], g_pred[gm]
            out["gender_acc"] = float(accuracy_score(gt, gp))
            out["gender_precision"] = float(precision_score(gt, gp, pos_label=1, average="binary", zero_division=0))
            out["gender_recall"] = float(recall_score(gt, gp, pos_label=1, average="binary", zero_division=0))
            out["gender_f1"] = float(f1_score(gt, gp, pos_label=1, average="binary", zero_division=0))
            out["gender_macro_f1"] = float(f1_score(gt, gp, average="macro", zero_division=0))
        else:
            why = NotComputed("no gender labels in the split")
            out.update(gender_acc=why, gender_precision=why, gender_recall=why, gender_f1=why, gender_macro_f1=why)
        im = (i_true >= 0) & i_known.astype(bool)
        if im.any():
            out["identity_top1"] = float(accuracy_score(i_true[im], i_pred[im]))
            out["identity_top5"] = float(i_top5[im].mean())
            out["identity_macro_f1"] = float(f1_score(i_true[im], i_pred[im], average="macro", zero_division=0))
        else:
            why = NotComputed("identity-disjoint split: no identity of it was trained on (see the verification "
                              "metrics)" if (i_true >= 0).any() else "no identity labels in the split")
            out.update(identity_top1=why, identity_top5=why, identity_macro_f1=why)
        missing = [k for k in ("gender_macro_f1", "identity_macro_f1") if isinstance(out[k], NotComputed)]
        out["combined"] = (NotComputed(f"needs {' and '.join(missing)}") if missing
                           else 0.3 * out["gender_macro_f1"] + 0.7 * out["identity_macro_f1"])
        return out


# ----------------------------------------------------------------------------- artefacts

def history_panels(rows: list[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The panels of ``plots/training_metrics.png``: gender metrics, identity
    metrics, ``combined``, losses / others (every logged column but step, epoch)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("step", "epoch")]
    panels = {"gender": [k for k in keys if "gender" in k],
              "identity": [k for k in keys if "identity" in k],
              "combined score": [k for k in keys if "combined" in k]}
    used = {k for ks in panels.values() for k in ks}
    panels["loss / other"] = [k for k in keys if k not in used]
    return panels


# ----------------------------------------------------------------------------- recipe

@register
class FaceComRecipe(Recipe):
    name = "facecom"
    Params = FaceComParams

    @classmethod
    def check_start_files(cls, params: FaceComParams) -> None:
        if params.init_from:
            check_init_from(params.init_from, lambda: FaceComModel(params, 1), FACECOM_HEADS, cls.name)

    def __init__(self, params: FaceComParams, data_info: DataInfo):
        super().__init__(params, data_info)
        p = params
        degrade = [degradation_transforms(p.p_blur, p.p_noise, p.p_low_light, p.p_haze, p.p_jpeg)]
        if p.rotate_degrees > 0:
            shift = p.rotate_degrees / 100.0
            degrade.insert(0, transforms.RandomAffine(p.rotate_degrees, translate=(shift, shift)))
        self.train_tf, self.eval_tf = face_transforms(p.img_size, p.augment, p.crop_scale_min, p.p_flip, degrade)
        if p.augment and p.p_erase > 0:  # on the 8-bit tensor: the erased patch is the mean colour
            mean_rgb = [round(255 * m) for m in IMAGENET_MEAN]
            self.train_tf = transforms.Compose([self.train_tf,
                                                transforms.RandomErasing(p.p_erase, (0.02, 0.15), value=mean_rgb)])
        if p.grayscale:
            self.train_tf = transforms.Compose([transforms.Grayscale(3), self.train_tf])
            self.eval_tf = transforms.Compose([transforms.Grayscale(3), self.eval_tf])
        schema = data_info.label_schemas.get("gender") if data_info.label_schemas else None
        self.gender_names = tuple(schema) if schema else ("0", "1")

    # --- data
    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        img = pick_rgb_image(sample)
        meta = sample.get("json") or {}
        identity = class_label(meta, "identity", self.data_info.num_identities, check=train)
        gender = class_label(meta, "gender", max(2, len(self.gender_names)), check=train)
        twin = self.data_info.co_twin(identity, meta.get("twin"))
        return {"image": (self.train_tf if train else self.eval_tf)(img),
                "identity": torch.tensor(identity, dtype=torch.long),
                "gender": torch.tensor(gender, dtype=torch.long),
                "twin": torch.tensor(twin, dtype=torch.long)}

    # --- model
    def use_ranks(self, parallel: ParallelContext) -> None:
        check_ranks(self.params.identity_head_sharding, max(self.data_info.num_identities, 1), parallel)
        super().use_ranks(parallel)

    def build_model(self) -> nn.Module:
        model = FaceComModel(self.params, self.data_info.num_identities, max(2, len(self.gender_names)),
                             self.parallel)
        if self.params.init_from:
            load_init_weights(model, self.params.init_from, FACECOM_HEADS, self.name)
        return model

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]] | None:
        if self.params.backbone_lr_mult == 1.0:
            return None
        model = getattr(model, "module", model)
        bb = list(model.backbone.parameters())
        ids = {id(p) for p in bb}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": bb, "lr": base_lr * self.params.backbone_lr_mult},
                {"params": rest, "lr": base_lr}]

    # --- evaluation
    def new_metrics(self) -> Metrics:
        return FaceComMetrics(self.data_info.trained_identities)

    @classmethod
    def validation_metric_names(cls, params: Any) -> frozenset[str]:
        return FaceComMetrics.NAMES

    def write_artifacts(self, model: nn.Module, ctx: ArtifactContext) -> dict[str, float]:
        """Predict the test split (all ranks), write ``submission.csv`` and
        ``plots/training_metrics.png`` on rank 0, return the test metrics."""
        run_dir = Path(ctx.run_dir)
        module = getattr(model, "module", model)
        rows: list[dict[str, Any]] = []
        metrics, verification = FaceComMetrics(self.data_info.trained_identities), VerificationMetrics()
        loader = ctx.loaders.get("test")
        if loader is not None:
            param = next(module.parameters())
            was_training = module.training
            module.eval()
            with torch.no_grad():
                for batch in loader:
                    out = module(move_batch(batch, param.device, param.dtype))
                    metrics.update(out, batch)
                    verification.update(out, batch)  # test identities need not be training ones: EER, AUC...
                    g_conf, g_pred = out["gender_logits"].float().softmax(1).cpu().max(1)
                    i_pred, i_conf = (t[:, 0] for t in top_identities(out, 1))
                    n = g_pred.shape[0]
                    keys = sample_keys(batch, n)
                    for j in np.flatnonzero(valid_mask(batch, n)):
                        rows.append({"key": keys[j], "gender": int(g_pred[j]), "gender_confidence": float(g_conf[j]),
                                     "identity": int(i_pred[j]), "confidence": float(i_conf[j])})
            module.train(was_training)
        gathered = ctx.gather((rows, metrics.state(), verification.state()))
        rows = [r for rs, _, _ in gathered for r in rs]
        test_metrics: dict[str, float] = {}
        if loader is not None:
            test_metrics.update(FaceComMetrics.compute([s for _, s, _ in gathered]))
            test_metrics.update(VerificationMetrics.compute([v for _, _, v in gathered]))
        if ctx.is_main:
            if loader is not None:
                ctx.publish(run_dir / "submission.csv", lambda tmp: self._write_submission(tmp, rows))
            history = list(ctx.validation_history)
            if not plot_history(history, history_panels(history), run_dir / "plots" / "training_metrics.png", ctx.publish):
                log.info("no validation history to plot")
        return test_metrics

    def _write_submission(self, path: Path, rows: list[dict[str, Any]]) -> None:
        names = self.data_info.identities
        with Path(path).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(SUBMISSION_COLUMNS)
            for r in sorted(rows, key=lambda r: r["key"]):
                g = r["gender"]
                gname = self.gender_names[g] if g < len(self.gender_names) else str(g)
                iname = names[r["identity"]] if r["identity"] < len(names) else str(r["identity"])
                w.writerow([r["key"], gname, f"{r['gender_confidence']:.4f}", iname, f"{r['confidence']:.4f}"])
