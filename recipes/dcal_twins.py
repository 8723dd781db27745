"""``dcal_twins`` recipe: DCAL (SA + GLCA + PWCA) for (twin) face verification.

Wraps :class:`models.dcal.DCAL` (read its docstring for the model and every
choice the paper leaves open). ``use_glca: false, use_pwca: false`` is the
plain-ViT baseline on the same pipeline (same data, heads, metric loss and
budget), which is what ``benchmarks/dcal_results.py`` compares against.
``backbone`` may also be a CNN (``resnet50``, ``efficientnet_b0``, ...) with
``attention_dim`` and ``num_heads``: ``depth`` attention blocks on its feature map
(:mod:`models.cnn_tokens`; ``configs/dcal_twins/cnn.yaml``), the rest unchanged.

Distillation (``distill_teacher``, ``distill_weight`` > 0): a frozen teacher, any biomtl model file
(a CNN run's ``model.pt``), rebuilt by the trainer's ``frozen_model_loader``
(:func:`dist_train.inference.load_frozen_model`) and checked by the preflight (fresh runs and
resumes: the teacher is in no checkpoint, so a resume reads it again). Its in-batch similarity
distribution is the soft target of the SA class token (``distill_target: embedding``) or of a DeiT
distillation token (``token``), :func:`models.distill.relation_distill_loss`; the term is added as
``distill_weight * distill`` beside the recipe's own (learned-weight) losses. ``model.pt`` holds the
student alone and rebuilds without the teacher.

Data (one shard sample)
-----------------------
- image: the first of ``vis.png`` (synthetic shards), ``png``, ``jpg``, ``jpeg``,
  ``pgm``, ``image.png``, ``image.pgm`` (``biomtl shards create --format folder|cmu``),
  ... present, else any decoded image (grey images are converted to RGB);
- ``json``: ``identity`` (index into the manifest's identities; ``-1`` or missing
  = unlabelled) and optionally ``twin`` (identity index of the co-twin, ``-1`` =
  none). Without ``twin`` the co-twin comes from the manifest's ``twin_pairs``.

``transform`` -> ``{"image": [3, S, S] (training: uint8 pixels, normalised on the device by
:class:`models.pixels.PixelInput`; evaluation: float, ImageNet-normalised), "identity": long,
"twin": long}``. Training adds a mild random resized crop, a horizontal flip and
brightness/contrast jitter (global torch RNG: the stream seeds it per sample).

Twin-aware batches
------------------
The PWCA distractor of each sample is picked *inside the batch* by
:func:`models.dcal.pick_distractors` (a co-twin image when the batch has one,
else an image of another identity); ``data.batching=pk data.twin_prob=1`` puts
co-twins into the same batches (``shards.batching``). A loader that adds
``batch["distractor"]`` (batch indices) is used as is.

Validation (identity-disjoint)
------------------------------
:class:`recipes.verification.VerificationMetrics` keeps the embeddings, identities and co-twin ids
of the val split (per rank; the trainer gathers them) and reports verification
metrics on generated pairs (:func:`recipes.verification.generate_pairs`, at most
``val_max_pairs``): ``eer``, ``auc``, ``tar_at_far_0.1/0.01/0.001`` (and
``1e-04`` with enough impostors), ``best_acc``, ``threshold`` (the best-accuracy
threshold on these val pairs; :class:`dist_train.inference.InferenceEngine`
uses it as the default decision threshold), and the same with a ``twin_``
prefix for genuine vs co-twin impostor pairs (NaN without twins). The
validation ``loss`` of unseen identities is meaningless (their classes were
never trained): monitor ``eer`` (mode ``min``), never ``loss``.

After training, :meth:`DCALTwinsRecipe.write_artifacts` runs the full protocol
on the test split (threshold picked on the val split) and writes
``run_dir/eval/test/{metrics.json, roc.png, score_histograms.png,
hardest_errors.png}``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision import transforms

from models.cnn_tokens import check_attention_shape
from models.conv_stem import ConvStemPatchEmbed
from models.dcal import DCAL, DCALConfig, check_backbone_name
from models.distill import MAX_TEMPERATURE, MIN_TEMPERATURE
from recipes import verification as ev
from recipes.base import (ArtifactContext, DataInfo, Metrics, ParallelContext, Recipe, register, start_file,
                          start_option)
from recipes.identity_head import check_ranks, check_sharding, note_world_of_one
from recipes.image_input import face_transforms, pick_rgb_image
from recipes.init_weights import check_init_from, load_init_weights
from recipes.labels import class_label
from recipes.verification import VerificationMetrics
from recipes.verification_plots import write_report

log = logging.getLogger("biomtl.dcal")



# Tensors whose shape follows the training identities or the active loss terms:
# init_from may skip them (recipes/init_weights.py).
DCAL_HEADS = ("head_sa.", "head_glca.", "loss_weights.", "verif.")
# GLCA starts as a copy of the last SA block (models/dcal.py): a plain-ViT run's file has no GLCA
# weights, and DCAL started from it copies them from the loaded last block again.
DCAL_GLCA = ("glca_block.", "glca_norm.", "glca_fc_norm.")
# Attention blocks on a CNN's feature map when recipe.params.depth is 0 (**[choice]**: the original
# names no number; two blocks make the rollout a product and PWCA a two-step cross-attention).
CNN_ATTENTION_DEPTH = 2


@dataclass
class DCALTwinsParams:
    # --- backbone
    backbone: str = "vit_tiny_patch16_224"   # any timm ViT with Block+Attention (ViT, DeiT, hybrid R26-ViT),
                                             # or a timm CNN (resnet50, efficientnet_b0, ...) with the two below
    img_size: int = 64
    patch_size: int = 0                      # 0: the backbone's own (16); e.g. 8 for small images (ViT only)
    depth: int = 0                           # 0: the backbone's own number of blocks; CNN: attention blocks (0: 2)
    # A CNN backbone: attention blocks of this width and number of heads on its last feature map
    # (models/cnn_tokens.py; the grid is the feature map: backbone_kwargs {output_stride: 16} doubles it).
    # Both 0 (required) for a ViT, whose blocks have their own width and heads.
    attention_dim: int = 0
    num_heads: int = 0
    # A hybrid ViT: 3x3 stride-2 convolutions instead of the patchify layer (models/conv_stem.py);
    # patch_size must then be a power of two. Better for small data sets, same blocks for DCAL.
    conv_stem: bool = False
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # more timm kwargs (drop_path_rate, ...)
    pretrained: bool = start_option()        # timm hub weights (needs network or the HF cache)
    weights_path: str = start_file()         # local .pth/.safetensors backbone weights
    backbone_lr_mult: float = 1.0
    # A previous run's RUN/model.pt (or checkpoint) to start from, e.g. a run on many
    # synthetic identities; the identity heads and loss weights may differ (recipes/init_weights.py).
    init_from: str = start_file()
    # --- DCAL
    use_glca: bool = True
    use_pwca: bool = True                    # both False = the plain-ViT baseline
    top_r: float = 0.1                       # GLCA local query ratio (0.3 for re-ID-like data)
    head: Literal["arcface", "cosface", "linear"] = "arcface"
    s: float = 30.0
    m: float | None = None                   # None: ArcFace 0.5, CosFace 0.35
    # partial_fc: the SA/GLCA heads' centres split across the training ranks (Partial FC,
    # recipes/identity_head.py), for identities that do not fit one GPU; sample_rate < 1 puts only
    # the batch's identities and that share of the other centres in each step's softmax.
    identity_head_sharding: Literal["none", "partial_fc"] = "none"
    sample_rate: float = 1.0
    metric_loss: Literal["triplet", "supcon", "none"] = "triplet"
    triplet_margin: float = 0.3
    twin_weight: float = 1.0
    supcon_temperature: float = 0.1
    twin_negative_weight: float = 2.0
    verification_head: bool = False
    dynamic_weights: bool = True
    metric_weight: float = 1.0               # static weights (dynamic_weights: false)
    verif_weight: float = 1.0
    # --- distillation from a frozen CNN (or any biomtl) teacher (models/distill.py): the teacher's
    # in-batch similarity distribution of the same images is the soft target (KL, T^2-scaled) of the
    # student's SA class token (``embedding``) or of a DeiT distillation token (``token``: a second
    # prefix token whose output joins the embedding). A data-efficient ViT without ImageNet weights.
    distill_teacher: str = field(default="", metadata={"path": True})  # a biomtl model.pt / run dir;
                                             # read again on --resume (not stored in checkpoints)
    distill_weight: float = 0.0              # > 0 with distill_teacher; 0 = off
    distill_temperature: float = 1.0         # in [0.01, 100]
    distill_target: Literal["token", "embedding"] = "embedding"
    # --- data
    augment: bool = True
    p_flip: float = 0.5
    crop_scale_min: float = 0.8              # RandomResizedCrop lower scale; 1.0 disables the crop
    jitter: float = 0.2                      # brightness/contrast jitter strength; 0 disables
    # Grey input (three equal channels) for training and inference: grey real face sets then
    # look like colour pretraining data, which can no longer lean on skin or hair colour.
    grayscale: bool = False
    # --- validation
    val_max_pairs: int = 2_000_000           # cap on generated val pairs
    pair_seed: int = 0

    def __post_init__(self) -> None:
        if self.img_size < 8:
            raise ValueError(f"img_size must be >= 8, got {self.img_size}")
        if check_backbone_name(self.backbone) == "cnn":
            self._check_cnn()
        elif self.attention_dim or self.num_heads:
            raise ValueError(f"attention_dim / num_heads apply to a CNN backbone only; the ViT "
                             f"'{self.backbone}' has its own width and heads (set both to 0)")
        if not 0.0 < self.top_r <= 1.0:
            raise ValueError(f"top_r must be in (0, 1], got {self.top_r}")
        check_sharding(self.identity_head_sharding, self.sample_rate, self.head)
        if not 0.0 <= self.p_flip <= 1.0 or not 0.0 < self.crop_scale_min <= 1.0 or self.jitter < 0:
            raise ValueError("p_flip must be in [0, 1], crop_scale_min in (0, 1], jitter >= 0")
        if self.pretrained and self.weights_path:
            raise ValueError("set either pretrained (timm hub) or weights_path (local file), not both")
        if self.patch_size < 0 or self.depth < 0:
            raise ValueError("patch_size and depth must be >= 0 (0 = the backbone's own)")
        if self.conv_stem and (self.pretrained or self.weights_path):
            raise ValueError("conv_stem replaces the patch embedding: no pretrained / weights_path weights fit it")
        if self.init_from and (self.pretrained or self.weights_path):
            raise ValueError("init_from already sets every backbone weight: drop pretrained / weights_path")
        if self.distill_weight < 0 or not MIN_TEMPERATURE <= self.distill_temperature <= MAX_TEMPERATURE:
            raise ValueError(f"distill_weight must be >= 0 and distill_temperature in [{MIN_TEMPERATURE}, "
                             f"{MAX_TEMPERATURE}], got {self.distill_weight} / {self.distill_temperature}")
        if self.distill_teacher and self.distill_weight == 0:
            raise ValueError("distill_teacher is set but distill_weight is 0 (set a weight > 0, or drop the teacher)")

    def _check_cnn(self) -> None:
        check_attention_shape(self.attention_dim, self.num_heads)
        if self.conv_stem or self.patch_size:
            raise ValueError(f"conv_stem / patch_size apply to a ViT; the CNN '{self.backbone}' makes the tokens "
                             "(its feature map; backbone_kwargs {output_stride: 16} for a finer grid)")

    def model_config(self, num_classes: int) -> DCALConfig:
        if check_backbone_name(self.backbone) == "cnn":
            return self._dcal_config(num_classes, dict(self.backbone_kwargs), attention_dim=self.attention_dim,
                                     num_heads=self.num_heads, attention_depth=self.depth or CNN_ATTENTION_DEPTH)
        kwargs = dict(self.backbone_kwargs)
        if self.patch_size:
            kwargs["patch_size"] = self.patch_size
        if self.depth:
            kwargs["depth"] = self.depth
        if self.conv_stem:
            kwargs["embed_layer"] = ConvStemPatchEmbed
        return self._dcal_config(num_classes, kwargs)

    def _dcal_config(self, num_classes: int, backbone_kwargs: dict[str, Any], **cnn: int) -> DCALConfig:
        return DCALConfig(num_classes=max(num_classes, 1), backbone=self.backbone, pretrained=self.pretrained,
                          weights_path=self.weights_path, img_size=self.img_size, backbone_kwargs=backbone_kwargs,
                          use_glca=self.use_glca, use_pwca=self.use_pwca, top_r=self.top_r, head=self.head,
                          margin_s=self.s, margin_m=self.m, head_sharding=self.identity_head_sharding,
                          sample_rate=self.sample_rate, metric_loss=self.metric_loss,
                          triplet_margin=self.triplet_margin, twin_weight=self.twin_weight,
                          supcon_temperature=self.supcon_temperature,
                          twin_negative_weight=self.twin_negative_weight,
                          verification_head=self.verification_head, dynamic_weights=self.dynamic_weights,
                          metric_weight=self.metric_weight, verif_weight=self.verif_weight,
                          distill_weight=self.distill_weight, distill_temperature=self.distill_temperature,
                          distill_target=self.distill_target, **cnn)


@register
class DCALTwinsRecipe(Recipe):
    name = "dcal_twins"
    Params = DCALTwinsParams

    @classmethod
    def check_start_files(cls, params: DCALTwinsParams) -> None:
        if params.init_from:
            check_init_from(params.init_from, lambda: DCAL(params.model_config(1)), DCAL_HEADS, cls.name, DCAL_GLCA)

    @classmethod
    def frozen_model_files(cls, params: DCALTwinsParams) -> dict[str, str]:
        # A model file rebuilt for inference keeps distill_weight (the token is part of the network)
        # without needing the teacher; a training run with a weight needs one.
        if params.distill_weight > 0 and not params.distill_teacher:
            raise ValueError("distill_weight > 0 needs distill_teacher (a biomtl model.pt)")
        return {"distill_teacher": params.distill_teacher} if params.distill_teacher else {}

    def __init__(self, params: DCALTwinsParams, data_info: DataInfo):
        super().__init__(params, data_info)
        p = params
        jitter = [transforms.ColorJitter(brightness=p.jitter, contrast=p.jitter)] if p.jitter > 0 else []
        self.train_tf, self.eval_tf = face_transforms(p.img_size, p.augment, p.crop_scale_min, p.p_flip, jitter)
        if p.grayscale:
            self.train_tf = transforms.Compose([transforms.Grayscale(3), self.train_tf])
            self.eval_tf = transforms.Compose([transforms.Grayscale(3), self.eval_tf])

    # --- data
    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        img = pick_rgb_image(sample)
        meta = sample.get("json") or {}
        identity = class_label(meta, "identity", self.data_info.num_identities, check=train)
        twin = self.data_info.co_twin(identity, meta.get("twin"))
        return {"image": (self.train_tf if train else self.eval_tf)(img),
                "identity": torch.tensor(identity, dtype=torch.long),
                "twin": torch.tensor(twin, dtype=torch.long)}

    # --- model
    def use_ranks(self, parallel: ParallelContext) -> None:
        check_ranks(self.params.identity_head_sharding, max(self.data_info.num_identities, 1), parallel)
        super().use_ranks(parallel)

    def build_model(self) -> nn.Module:
        p, ranks = self.params, self.parallel
        note_world_of_one(p.identity_head_sharding, ranks, p.head, self.data_info.num_identities, p.sample_rate)
        model = DCAL(p.model_config(self.data_info.num_identities), ranks=(ranks.rank, ranks.world, ranks.group))
        if self.params.init_from:
            report = load_init_weights(model, self.params.init_from, DCAL_HEADS, self.name, DCAL_GLCA)
            if report.derived_missing:  # DCAL's own initialisation rule, on the loaded weights
                model.glca_block.load_state_dict(model.vit.blocks[-1].state_dict())
                model.glca_norm.load_state_dict(model.vit.norm.state_dict())
                model.glca_fc_norm.load_state_dict(model.vit.fc_norm.state_dict())
                log.info("init_from %s has no GLCA weights (a plain-ViT run): GLCA starts as a copy of the "
                         "loaded last block", self.params.init_from)
        if p.distill_teacher and self.frozen_model_loader is not None:  # training only
            model.attach_teacher(self.frozen_model_loader(p.distill_teacher))
            log.info("distilling from %s (frozen; %s target, weight %g, T %g)", p.distill_teacher,
                     p.distill_target, p.distill_weight, p.distill_temperature)
        return model

    def feature_types(self) -> tuple[str, ...]:
        """``combined`` (what ``embed`` gives: the SA and GLCA class tokens, each
        L2-normalised, concatenated; the original's ``--feature_type combined``), ``sa``,
        ``glca`` (with GLCA)."""
        return ("combined", "sa", "glca") if self.params.use_glca else ("combined", "sa")

    def embed_as(self, model: nn.Module, images: torch.Tensor, feature_type: str) -> torch.Tensor:
        if feature_type == "combined":
            return model.embed(images)
        return model.branches(images)[feature_type].float()

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]] | None:
        model = getattr(model, "module", model)
        return model.param_groups(base_lr, self.params.backbone_lr_mult)

    # --- evaluation
    def new_metrics(self) -> Metrics:
        return VerificationMetrics(self.params.val_max_pairs, self.params.pair_seed)

    @classmethod
    def validation_metric_names(cls, params: DCALTwinsParams) -> frozenset[str]:
        return VerificationMetrics.NAMES

    def write_artifacts(self, model: nn.Module, ctx: ArtifactContext) -> dict[str, float]:
        """Embed the val and test splits (all ranks), then on rank 0 the full test
        report in ``run_dir/eval/test`` with the threshold picked on val pairs."""
        module = getattr(model, "module", model)
        param = next(module.parameters())
        was_training = module.training
        module.eval()
        local = {role: ev.embed_batches(lambda x: module.embed(x.to(param.device, param.dtype)), loader)
                 for role, loader in ctx.loaders.items() if role in ("val", "test")}
        module.train(was_training)
        gathered = ctx.gather(local)
        tables = {role: ev.merge_tables([g[role] for g in gathered]) for role in local}
        test = tables.get("test")
        if test is None or not len(test["keys"]) or not ctx.is_main:
            return {}
        p = self.params
        pairs = ev.generate_pairs(test["identity"], test["twin"], p.val_max_pairs, p.pair_seed)
        threshold, source = None, "none"
        val = tables.get("val")
        if val is not None and len(val["keys"]):
            vp = ev.generate_pairs(val["identity"], val["twin"], p.val_max_pairs, p.pair_seed)
            if vp.label.any() and (~vp.label).any():
                _, threshold = ev.best_accuracy_threshold(ev.cosine_scores(val["embedding"], vp.a, vp.b), vp.label)
                source = "best accuracy on generated val pairs"
        out_dir = Path(ctx.run_dir) / "eval" / "test"
        images = None
        try:
            images = ctx.read_images("test", ev.hardest_error_keys(test, pairs))
        except Exception as exc:  # pictures are a nicety; never fail a finished training for them
            log.warning("no error grid: %s", exc)
        model_name = "DCAL" if p.use_glca or p.use_pwca else "ViT baseline"
        metrics = write_report(out_dir, test, pairs, ctx.publish, threshold=threshold, threshold_source=source,
                               images=images, identity_names=self.data_info.identities,
                               seed=p.pair_seed, title=f"test split, {model_name}")
        log.info("test verification report in %s", out_dir)
        flat = {k: v for k, v in ev.summary_metrics({"all": metrics["all_impostors"],
                                                     "twin": metrics["twin_impostors"]}).items()
                if k in ("eer", "auc", "tar_at_far_0.01", "tar_at_far_0.001", "acc_10fold", "acc_at_threshold",
                         "twin_eer", "twin_auc", "twin_tar_at_far_0.01")}
        return flat
