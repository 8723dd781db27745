"""``thz_mtl`` recipe: THz face verification, posture and concealed -> unconcealed
reconstruction from THz images alone.

Data (one shard sample; ``biomtl shards create --format thz`` and the built-in
synthetic set with modality ``thz_dense`` or ``thz`` write the same fields)
-----------------------------------------------------------------------------
- ``thz.<ext>``: the THz input (concealed or not; grey);
- ``thz_target.<ext>``: its unconcealed counterpart, the reconstruction target
  (synthetic: the same capture without the fabric; real data: the CSV row's
  positive, which the source checks is unconcealed and of the same identity);
- ``vis.<ext>`` / ``vis_target.<ext>``: visible images (read by ``thz_distill``);
- ``json``: ``identity`` (index, ``-1`` = unlabelled), ``posture`` (0-4: front,
  left, right, up, down), ``concealed`` (0/1), optionally ``twin``.

A sample without ``thz.*`` falls back to the first image of
:data:`recipes.image_input.IMAGE_KEYS` that is not ``vis.*`` (e.g. the ``png``
that :class:`dist_train.inference.InferenceEngine` hands over); one without a
target is embedded and classified, not reconstructed.

Real THz data (``--format thz``) is one sample per CSV row and carries the row's
own triplet, as the original trains it: ``thz_negative.<ext>`` (+
``vis_negative.<ext>``) and ``json`` ``target_posture``, ``negative_identity``,
``negative_posture``. In training :meth:`ThzMtlRecipe.csv_triplet` turns it into
``pos_*`` / ``neg_*`` fields: the positive is the row's unconcealed image of the
anchor's person (the reconstruction target), the negative the row's other
person; every batching (``stream``, ``pk``, ``triplet``: the batcher keeps a
sample's own triplet, :mod:`shards.batching`) then trains exactly the CSV's
triplets, and the reconstruction loss is taken on the anchors only (the
original's concealed -> unconcealed task). Synthetic samples carry no triplet:
with ``data.batching: triplet`` (the configs' choice) every training row arrives
with a positive (same identity) and a negative (another identity, the co-twin
when there is one) drawn by the batcher. The model runs on the ``3B`` images
(anchors, positives, negatives) and SupCon sees each anchor's positive in the
batch; ``stream`` and ``pk`` batching of synthetic data work too (SupCon then
uses whatever same-identity rows a batch holds).

``transform`` -> ``{"image" [C, S, S] in [0, 1] (the THz input), "target" (same
shape, when present), "identity", "posture", "concealed", "twin"}``. Training
applies :class:`models.thz_augment.ThzAugment` (profile ``augment``): one
geometry for input, target (and visible images), scanner-like corruption of the
input only.

Model (:class:`ThzMtlModel` around :class:`models.thz.ThzMtlNet`)
------------------------------------------------------------------
Encoder (``custom`` small ResNet or a timm CNN) -> embedding (verification),
SupCon projection, posture classifier, and a mixture-of-experts U-Net decoder
with one expert per posture (``gating``: ``hard`` by the true posture in
training and the predicted one at inference, or ``soft``); ``residual: true``
makes each expert correct the input instead of redrawing the face.

``loss = w_v * SupCon(projection) + w_c * CE_ls(posture) + w_r * (w_charb *
Charbonnier + w_ssim * (1 - SSIM|MS-SSIM) + w_lpips * LPIPS)`` with the task
weights ``task_weights.{verification, classification, reconstruction}``.
``terms``: ``supcon``, ``posture``, ``reconstruction`` and its parts
(``charbonnier``, ``ssim`` = 1 - SSIM, ``lpips``). LPIPS needs the ImageNet
trunk weights locally (``lpips_weights`` or the torchvision cache); with
``lpips_weight > 0`` and no file, the config is refused at start (one line).

Validation metrics (:class:`ThzMetrics`): ``ssim``, ``psnr`` (and ``lpips``
when the loss has it) of reconstruction vs target, ``ssim_concealed`` (the
concealed rows only), ``posture_acc``, ``posture_macro_f1``, and the
verification metrics of :class:`recipes.verification.VerificationMetrics` on
pairs generated from the split (``eer``, ``auc``, ``tar_at_far_*``,
``best_acc``, ``threshold``, ``twin_*``). The configs keep the best checkpoint
by ``ssim``.

At every validation, TensorBoard gets ``val/concealed_reconstruction_target``
(:meth:`ThzMtlRecipe.validation_images`: the first validation batch, so the same
samples each time). After training (:meth:`ThzMtlRecipe.write_artifacts`) and for
``biomtl eval`` (:meth:`ThzMtlRecipe.eval_report`): the report of
:mod:`recipes.thz_report`.
"""
from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models.losses import (ReconstructionLoss, SupConLoss, lpips_distance, lpips_weights_file, masked_cross_entropy,
                           psnr, ssim_index, ssim_window)
from models.thz import NUM_POSTURES, ThzMtlNet, ThzNetConfig
from models.thz_augment import ThzAugment
from recipes.base import ArtifactContext, DataInfo, EvalContext, Metrics, Recipe, register, start_file
from recipes.batch import label_column, valid_mask
from recipes.verification import VerificationMetrics
from recipes.image_input import IMAGE_KEYS
from recipes.labels import class_label

log = logging.getLogger("biomtl.thz")

TRIPLET_ROLES = ("", "pos_", "neg_")


@dataclass
class TaskWeights:
    verification: float = 1.0     # SupCon on the projection
    classification: float = 1.0   # posture
    reconstruction: float = 1.0


@dataclass
class ThzMtlParams:
    # --- network (models.thz)
    encoder: str = "custom"                  # "custom" (small ResNet) or a timm CNN name, e.g. resnet18
    weights_path: str = start_file()         # timm encoder: local weights file
    in_chans: int = 1                        # 1: grey; 3: grey replicated (ImageNet-pretrained timm weights)
    img_size: int = 64
    width: int = 16                          # custom encoder: first stage width (doubles per stage)
    depth: int = 4                           # custom encoder: stages (each halves the resolution)
    blocks: int = 1                          # custom encoder: residual blocks per stage
    embedding_dim: int = 128
    projection_dim: int = 128
    projection_hidden: int = 256
    decoder_width: int = 0                   # channels per decoder stage; 0 = the skip's own
    residual: bool = False                   # reconstruction = sigmoid(logit(input) + decoder output)
    gating: Literal["hard", "soft"] = "hard"
    gate_temperature: float = 1.0            # soft gating: softmax(posture_logits / T)
    # --- losses
    task_weights: TaskWeights = field(default_factory=TaskWeights)
    supcon_temperature: float = 0.1
    twin_negative_weight: float = 1.0        # SupCon: >1 makes co-twin negatives count more
    label_smoothing: float = 0.1             # posture CE
    charbonnier_weight: float = 1.0
    ssim_weight: float = 1.0                 # weight of (1 - SSIM)
    ssim_kind: Literal["ssim", "ms_ssim"] = "ssim"   # ms_ssim needs img_size > 32
    lpips_weight: float = 0.0                # > 0 needs the trunk weights locally (never a random trunk)
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_weights: str = field(default="", metadata={"path": True})  # "" = $TORCH_HOME/hub/checkpoints/<file>
    # --- data
    augment: Literal["none", "gentle", "medium", "strong"] = "gentle"
    # --- evaluation
    val_max_pairs: int = 200_000
    pair_seed: int = 0
    report_grid: int = 8                     # rows of the concealed | reconstruction | target grid

    def __post_init__(self) -> None:
        if isinstance(self.task_weights, Mapping):  # built directly from a dict (not through the config loader)
            self.task_weights = TaskWeights(**self.task_weights)
        if self.img_size < 16 or self.in_chans < 1 or self.embedding_dim < 1:
            raise ValueError("img_size must be >= 16, in_chans and embedding_dim >= 1")
        if self.encoder == "custom" and (self.width < 1 or self.depth < 1 or self.blocks < 1):
            raise ValueError("width, depth and blocks must be >= 1")
        if self.encoder == "custom" and self.img_size < 2 ** self.depth:
            raise ValueError(f"img_size {self.img_size} is smaller than the encoder's reduction 2**depth")
        if self.weights_path and self.encoder == "custom":
            raise ValueError("weights_path is for timm encoders (encoder: resnet18, ...), not 'custom'")
        weights = (self.task_weights.verification, self.task_weights.classification,
                   self.task_weights.reconstruction, self.charbonnier_weight, self.ssim_weight, self.lpips_weight)
        if min(weights) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.supcon_temperature <= 0 or self.gate_temperature <= 0:
            raise ValueError("supcon_temperature and gate_temperature must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.ssim_kind == "ms_ssim":
            ssim_window(self.img_size, self.img_size, multiscale=True)  # raises: too small for MS-SSIM
        if self.lpips_weight > 0:
            if self.img_size < 32:
                raise ValueError(f"LPIPS needs img_size >= 32 (its trunk downsamples 16x), got {self.img_size}")
            f = lpips_weights_file(self.lpips_net, self.lpips_weights or None)
            if not f.is_file():
                raise ValueError(f"lpips_weight={self.lpips_weight}: LPIPS needs the ImageNet {self.lpips_net} weights "
                                 f"at {f} (torchvision's file: copy it there or point TORCH_HOME at its cache), or "
                                 "set recipe.params.lpips_weights=FILE, or recipe.params.lpips_weight=0; it never "
                                 "runs with a random backbone")

    def net_config(self) -> ThzNetConfig:
        return ThzNetConfig(encoder=self.encoder, in_chans=self.in_chans, width=self.width, depth=self.depth,
                            blocks=self.blocks, weights_path=self.weights_path, embedding_dim=self.embedding_dim,
                            projection_dim=self.projection_dim, projection_hidden=self.projection_hidden,
                            num_postures=NUM_POSTURES, gating=self.gating, gate_temperature=self.gate_temperature,
                            decoder_width=self.decoder_width, residual=self.residual)

    def reconstruction_loss(self) -> ReconstructionLoss:
        return ReconstructionLoss(self.charbonnier_weight, self.ssim_weight, self.lpips_weight,
                                  multiscale=self.ssim_kind == "ms_ssim", lpips_net=self.lpips_net,
                                  lpips_weights=self.lpips_weights or None)


# ----------------------------------------------------------------------------- batches

def triplet_rows(batch: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], int]:
    """``{key: anchors ++ positives ++ negatives}`` for the ``keys`` every role has (a
    triplet batch), the anchors' alone for a key only they have (a CSV triplet's
    ``target``: the anchor's reconstruction target), or the anchors alone; and the
    number of anchor rows."""
    roles = TRIPLET_ROLES if "pos_image" in batch else ("",)
    rows = {}
    for k in keys:
        parts = [batch[r + k] for r in roles if r + k in batch]
        if len(parts) == len(roles):
            rows[k] = torch.cat(parts) if len(parts) > 1 else parts[0]
        elif k in batch:
            rows[k] = batch[k]
    return rows, int(batch["image"].shape[0])


def task_losses(out: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor], supcon: SupConLoss,
                recon: ReconstructionLoss, label_smoothing: float, w: TaskWeights,
                prefix: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The three task losses of one network's outputs on ``rows`` (student or teacher)."""
    zero = out["embedding"].float().sum() * 0.0
    identity = rows.get("identity")
    terms = {"supcon": supcon(out["projection"], identity, rows.get("twin")) if identity is not None else zero,
             "posture": (masked_cross_entropy(out["posture_logits"], rows["posture"], label_smoothing)
                         if "posture" in rows else zero)}
    total = w.verification * terms["supcon"] + w.classification * terms["posture"]
    if "reconstruction" in out and "target" in rows:
        # the first rows: all of them, or the anchors when only they have a target (CSV triplets)
        r, parts = recon(out["reconstruction"][:rows["target"].shape[0]], rows["target"])
        terms["reconstruction"] = r
        terms.update(parts)
        total = total + w.reconstruction * r
    return total, {prefix + k: v for k, v in terms.items()}


def per_sample_quality(pred: torch.Tensor, target: torch.Tensor, lpips_model: nn.Module | None,
                       multiscale: bool = False) -> dict[str, torch.Tensor]:
    """``ssim``, ``psnr`` (and ``lpips``) per row, float32."""
    out = {"ssim": ssim_index(pred, target, 1.0, multiscale, per_sample=True).flatten(),
           "psnr": psnr(pred, target)}
    if lpips_model is not None:
        out["lpips"] = lpips_distance(lpips_model, pred, target)
    return out


class ThzMtlModel(nn.Module):
    """``forward(batch)`` -> loss, terms and what :class:`ThzMetrics` reads (anchor rows):
    ``embedding``, ``posture_logits``, ``reconstruction``, ``gate`` and, in eval mode
    with targets, ``quality`` (per-sample ``ssim``/``psnr``/``lpips``)."""

    # Not "twin": a triplet batch carries co-twins per row only where the transform returns them
    # (shards.batching), so the rows' co-twins come from the identities (:meth:`co_twins`).
    ROW_KEYS = ("image", "target", "identity", "posture")

    def __init__(self, p: ThzMtlParams, twin_pairs: Sequence[Sequence[int]] = (), num_identities: int = 0):
        super().__init__()
        self.p = p
        self.net = ThzMtlNet(p.net_config())
        self.supcon = SupConLoss(p.supcon_temperature, p.twin_negative_weight)
        self.recon = p.reconstruction_loss()
        n = max([num_identities, *(int(i) + 1 for pair in twin_pairs for i in pair)])
        lookup = torch.full((n + 1,), -1, dtype=torch.long)     # last slot: unlabelled / unknown identities
        for a, b in twin_pairs:
            lookup[int(a)], lookup[int(b)] = int(b), int(a)
        self.register_buffer("co_twin_of", lookup, persistent=False)

    def co_twins(self, identity: torch.Tensor) -> torch.Tensor:
        """The co-twin identity of every row (``-1``: none, unlabelled or unknown)."""
        n = self.co_twin_of.numel() - 1
        idx = torch.where((identity >= 0) & (identity < n), identity.long(), torch.full_like(identity.long(), n))
        return self.co_twin_of[idx]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference: embedding, posture logits and the reconstruction (gated by the
        predicted posture)."""
        return self.net(images)

    def anchor_outputs(self, out: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor],
                       n: int) -> dict[str, Any]:
        res: dict[str, Any] = {k: out[k][:n] for k in ("embedding", "posture_logits", "reconstruction", "gate")
                               if k in out}
        if not self.training and "reconstruction" in out and "target" in rows:
            with torch.no_grad():
                res["quality"] = per_sample_quality(out["reconstruction"][:n], rows["target"][:n],
                                                    self.recon.lpips_model(out["reconstruction"].device),
                                                    self.p.ssim_kind == "ms_ssim")
        return res

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        rows, n = triplet_rows(from_pixels(batch), self.ROW_KEYS)  # training images arrive as 8-bit pixels
        if "identity" in rows:
            rows["twin"] = self.co_twins(rows["identity"])
        out = self.net(rows["image"], rows.get("posture"))
        loss, terms = task_losses(out, rows, self.supcon, self.recon, self.p.label_smoothing, self.p.task_weights)
        return {"loss": loss, "terms": terms, **self.anchor_outputs(out, rows, n)}


# ----------------------------------------------------------------------------- metrics

class ThzMetrics(Metrics):
    """State: per-row reconstruction quality, posture truth/prediction, concealed
    flag, plus the verification state (embeddings, identities, co-twins)."""

    NAMES = frozenset(("ssim", "ssim_concealed", "psnr", "lpips", "posture_acc", "posture_macro_f1")) | \
        VerificationMetrics.NAMES

    def __init__(self, max_pairs: int = 200_000, seed: int = 0):
        self.verification = VerificationMetrics(max_pairs, seed)
        self.cols: dict[str, list[np.ndarray]] = {}

    def _add(self, name: str, values: np.ndarray) -> None:
        self.cols.setdefault(name, []).append(values)

    def update(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        self.verification.update(outputs, batch)
        logits = outputs["posture_logits"].detach().float().cpu()
        n = logits.shape[0]
        valid = valid_mask(batch, n)
        self._add("posture", label_column(batch, "posture", n)[valid])
        self._add("posture_pred", logits.argmax(1).numpy()[valid])
        self._add("concealed", label_column(batch, "concealed", n)[valid])
        for name, v in (outputs.get("quality") or {}).items():
            self._add(name, v.detach().float().cpu().numpy()[valid])

    def state(self) -> dict[str, Any]:
        return {"verification": self.verification.state(),
                **{k: np.concatenate(v) for k, v in self.cols.items()}}

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        from sklearn.metrics import f1_score

        def cat(key: str) -> np.ndarray:
            return np.concatenate([s[key] for s in states if key in s]) if any(key in s for s in states) \
                else np.zeros(0)

        out: dict[str, float] = {}
        nan = float("nan")
        concealed = cat("concealed")
        for name in ("ssim", "psnr", "lpips"):
            v = cat(name)
            if v.size:
                out[name] = float(v.mean())
                if name == "ssim":
                    c = v[concealed[:v.size] == 1] if concealed.size == v.size else np.zeros(0)
                    out["ssim_concealed"] = float(c.mean()) if c.size else nan
        y, yp = cat("posture"), cat("posture_pred")
        m = y >= 0
        out["posture_acc"] = float((y[m] == yp[m]).mean()) if m.any() else nan
        out["posture_macro_f1"] = float(f1_score(y[m], yp[m], average="macro", zero_division=0)) if m.any() else nan
        out.update(VerificationMetrics.compute([s["verification"] for s in states]))
        return out


# ----------------------------------------------------------------------------- images

def pick_image(sample: Mapping[str, Any], base: str):
    """The sample's ``<base>.<image ext>`` member (e.g. ``thz.png``, ``thz.jpg``), or None."""
    from shards.reading import IMAGE_EXTS

    for k, v in sample.items():
        name, _, ext = str(k).partition(".")
        if name == base and ext.lower() in IMAGE_EXTS:
            return v
    return None


def to_pixels(t: torch.Tensor) -> torch.Tensor:
    """A training image in [0, 1] as the 8-bit pixels the DataLoader workers hand
    over (a quarter of float32's bytes); :func:`from_pixels` undoes it on the
    training device. An unaugmented image comes from 8-bit pixels and round-trips
    exactly; an augmented one moves by at most half a level."""
    return t.clamp(0, 1).mul(255).round_().to(torch.uint8)


def from_pixels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with its 8-bit image tensors as floats in [0, 1] (``x / 255``, the
    same division the evaluation transform makes); float tensors unchanged."""
    return {k: v.float().div_(255.0) if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() >= 3
            else v for k, v in batch.items()}


def image_tensor(img, size: int, chans: int) -> torch.Tensor:
    """A PIL image as ``[chans, size, size]`` float in [0, 1] (grey: mode L; 3: RGB)."""
    from torchvision.transforms import functional as TF

    img = img.convert("L" if chans == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), resample=2)  # bilinear
    t = TF.pil_to_tensor(img).float() / 255.0
    if chans not in (1, 3):
        t = t[:1].expand(chans, -1, -1).clone()
    return t


# ----------------------------------------------------------------------------- recipe

@register
class ThzMtlRecipe(Recipe):
    name = "thz_mtl"
    Params = ThzMtlParams
    # extra aligned images the transform reads (required in training only):
    # {output key: (sample base name, channels)}
    extra_images: dict[str, tuple[str, int]] = {}

    def __init__(self, params: ThzMtlParams, data_info: DataInfo):
        super().__init__(params, data_info)
        self.augment = ThzAugment(params.augment) if params.augment != "none" else None
        schema = (data_info.label_schemas or {}).get("posture")
        self.posture_names = tuple(schema) if schema else ("front", "left", "right", "up", "down")

    # --- data
    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        p = self.params
        thz = pick_image(sample, "thz")
        if thz is None:  # a bare image (InferenceEngine, folder shards); never a visible image
            thz = next((sample[k] for k in IMAGE_KEYS if k in sample and not k.startswith("vis.")), None)
        if thz is None:
            raise KeyError(f"sample {sample.get('__key__')!r} has no THz image (thz.<ext>; has {sorted(sample)})")
        images = {"image": image_tensor(thz, p.img_size, p.in_chans)}
        target = pick_image(sample, "thz_target")
        if target is not None:
            images["target"] = image_tensor(target, p.img_size, p.in_chans)
        for key, (base, chans) in self.extra_images.items():
            img = pick_image(sample, base)
            if img is not None:
                images[key] = image_tensor(img, p.img_size, chans)
            elif train:  # training needs it; evaluation and inference never do
                raise KeyError(f"sample {sample.get('__key__')!r} has no {base}.<ext> image "
                               f"(training this recipe needs it; has {sorted(sample)})")
        own_triplet = train and pick_image(sample, "thz_negative") is not None and "target" in images
        if own_triplet:  # the positive's visible images share the anchor pair's geometry
            images.update({f"pos_{k}": image_tensor(self._member(sample, "vis_target"), p.img_size, chans)
                           for k, (_, chans) in self.extra_images.items()})
        if train and self.augment is not None:
            images = self.augment(images, inputs=("image",))
        if train:
            images = {k: to_pixels(v) for k, v in images.items()}
        meta = sample.get("json") or {}
        identity = class_label(meta, "identity", 0, check=False)  # SupCon's: no classifier to fit
        twin = self.data_info.co_twin(identity, meta.get("twin"))
        out = {**images, "identity": torch.tensor(identity, dtype=torch.long),
               "posture": torch.tensor(class_label(meta, "posture", NUM_POSTURES, check=train), dtype=torch.long),
               "concealed": torch.tensor(class_label(meta, "concealed", 0, check=False), dtype=torch.long),
               "twin": torch.tensor(twin, dtype=torch.long)}
        if own_triplet:
            out.update(self.csv_triplet(sample, out, meta))
        return out

    @staticmethod
    def _member(sample: Mapping[str, Any], base: str):
        img = pick_image(sample, base)
        if img is None:
            raise KeyError(f"sample {sample.get('__key__')!r} has no {base}.<ext> image "
                           f"(training this recipe on CSV triplets needs it; has {sorted(sample)})")
        return img

    def negative_label(self, name: Any) -> int:
        """The identity index of a CSV negative's person; one with no anchor row of its
        own (not among the manifest's identities) gets a label of its own above them."""
        names = self.data_info.identities
        if name in names:
            return names.index(name)
        return len(names) + 1 + zlib.crc32(str(name).encode()) % (1 << 30)

    def csv_triplet(self, sample: Mapping[str, Any], anchor: Mapping[str, torch.Tensor],
                    meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A THz CSV row's own triplet (training), as ``pos_*`` / ``neg_*`` fields: the
        positive is the row's unconcealed image of the anchor's person (the anchor's
        reconstruction target, uncorrupted), the negative the row's other person
        (augmented apart, as an input)."""
        p = self.params
        neg = {"image": image_tensor(self._member(sample, "thz_negative"), p.img_size, p.in_chans)}
        neg.update({k: image_tensor(self._member(sample, "vis_negative"), p.img_size, chans)
                    for k, (_, chans) in self.extra_images.items()})
        if self.augment is not None:
            neg = self.augment(neg, inputs=("image",))
        long = functools.partial(torch.tensor, dtype=torch.long)
        out = {"pos_image": anchor["target"], "pos_identity": anchor["identity"],
               "pos_posture": long(class_label(meta, "target_posture", NUM_POSTURES, check=True)),
               "pos_concealed": long(0), "pos_twin": anchor["twin"],
               "neg_identity": long(self.negative_label(meta.get("negative_identity"))),
               "neg_posture": long(class_label(meta, "negative_posture", NUM_POSTURES, check=True)),
               "neg_concealed": long(-1), "neg_twin": long(-1)}
        out.update({f"neg_{k}": v for k, v in neg.items()})
        return out

    # --- model
    def build_model(self) -> nn.Module:
        return ThzMtlModel(self.params, self.data_info.twin_pairs, self.data_info.num_identities)

    # --- evaluation
    def new_metrics(self) -> Metrics:
        return ThzMetrics(self.params.val_max_pairs, self.params.pair_seed)

    @classmethod
    def validation_metric_names(cls, params: Any) -> frozenset[str]:
        return ThzMetrics.NAMES

    def validation_images(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """TensorBoard, every validation: the first validation batch's rows as
        concealed input | reconstruction | target (up to ``report_grid`` rows)."""
        from torchvision.utils import make_grid

        if "reconstruction" not in outputs or "target" not in batch:
            return {}
        k = min(self.params.report_grid, outputs["reconstruction"].shape[0])
        tiles = []
        for i in range(k):
            for img in (batch["image"][i], outputs["reconstruction"][i], batch["target"][i]):
                img = img.detach().float().cpu().clamp(0, 1)
                tiles.append(img[:1].expand(3, -1, -1) if img.shape[0] != 3 else img)
        return {"concealed_reconstruction_target": make_grid(tiles, nrow=3, padding=2, pad_value=1.0)}

    def write_artifacts(self, model: nn.Module, ctx: ArtifactContext) -> dict[str, float]:
        from recipes import thz_report

        return thz_report.after_training(self, model, ctx)

    def eval_report(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any] | None:
        from recipes import thz_report

        return thz_report.for_eval_command(self, model, ctx)
