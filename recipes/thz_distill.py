"""``thz_distill`` recipe: learning with privileged information. A teacher sees THz
*and* visible images, the student (the ``thz_mtl`` network) sees THz alone and
learns from the teacher; inference needs the student only.

Data: what ``thz_mtl`` reads (:mod:`recipes.thz`) plus the visible image of the
same capture: ``vis.<ext>`` (default; concealed when the THz image is) or
``vis_target.<ext>`` (``teacher_visible: vis_target``: the unconcealed one).
Synthetic: ``modalities: [thz_dense, vis]`` (add ``vis_target`` for the
second). ``transform`` adds ``"vis"`` ``[3, S, S]`` in [0, 1], with the same
geometric augmentation as the THz pair (visible images are not corrupted).

Model (:class:`ThzDistillModel`):

- teacher :class:`models.thz.ThzTeacherNet` (THz + visible encoders, dual
  cross-attention, the three heads), student :class:`models.thz.ThzMtlNet`;
- ``loss = student task losses + teacher_weight * teacher task losses (unless
  frozen) + feature_weight * ||n(P s_emb) - n(t_emb)||^2 + logit_weight * T^2
  KL(softmax(t_posture / T) || softmax(s_posture / T)) + relation_weight *
  mean((S_s - S_t)^2) + similarity_weight * mean_i KL(q_t,i || q_s,i)``
  (``S``: the batch's cosine-similarity matrix of the embeddings,
  similarity-preserving distillation; ``q_i``: row ``i``'s softmax over its
  similarities to the other rows at ``similarity_temperature``, KD on the
  verification similarities) with the teacher's outputs detached in the
  distillation terms (the teacher learns from its own task losses only) and
  ``P`` a learned linear map when the teacher's embedding width
  (``teacher_embedding_dim``) differs from the student's, else identity;
- ``distill_source``: the feature, relation and similarity terms compare the
  embeddings (``fused``: the teacher's is made from THz and visible streams) or
  the pooled deepest features of the student's encoder and of the teacher's THz
  encoder (``thz_branch``: nothing the visible image adds, so a target a
  THz-only network can reach);
- ``teacher_reconstruct: false``: the teacher is trained for verification and
  posture only (its decoder is never run nor trained; a cheaper teacher);
- settings measured to cost the student verification (:func:`measured_to_hurt`)
  are named in one warning line when a run starts;
- ``distill_full_triplet``: the teacher runs, and the distillation terms are
  taken, on anchors, positives and negatives (true) or on anchors only;
- ``freeze_teacher``: the teacher's parameters are not trained (no gradient,
  BatchNorm statistics fixed); its weights come from ``teacher_weights``, a
  ``thz_distill`` checkpoint (``RUN/checkpoints/*.pt``; ``model.pt`` holds the
  student only) whose ``teacher.*`` tensors are loaded strictly. A frozen teacher without weights
  stops training at the first step (it would teach noise).

``terms``: the student's (``supcon``, ``posture``, ``reconstruction``, ...),
the teacher's prefixed ``teacher_``, ``distill_feature``, ``distill_logit``,
``distill_relation``, ``distill_similarity``.

Evaluation runs the student only (validation metrics, ``embed``, the reports),
so validation, ``biomtl eval`` / ``verify`` / ``extract`` and
:class:`dist_train.inference.InferenceEngine` never need visible images.
``write_artifacts`` writes the ``thz_mtl`` report for the student, and the
exported ``model.pt`` holds the student alone (:meth:`ThzDistillRecipe.export_for_inference`):
a ``thz_mtl`` model with its own params, no teacher tensor. Checkpoints keep both
(training resumes with its teacher). Data without the teacher's visible images
is refused when the recipe is built (one line, before training).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from models.backbones import WeightsError, read_state_dict
from models.losses import feature_distill_loss, kd_logit_loss, relation_distill_loss, similarity_kd_loss
from models.thz import ThzTeacherNet
from recipes.base import ArtifactContext, DataInfo, RecipeDataError, register, start_file
from recipes.thz import ThzMtlModel, ThzMtlParams, ThzMtlRecipe, from_pixels, task_losses, triplet_rows

log = logging.getLogger("biomtl.thz")

@dataclass
class ThzDistillParams(ThzMtlParams):
    # --- teacher
    teacher_visible: Literal["vis", "vis_target"] = "vis"
    teacher_embedding_dim: int = 0           # 0 = the student's embedding_dim
    fusion_dim: int = 64                     # dual cross-attention width
    fusion_heads: int = 4
    teacher_weight: float = 1.0              # weight of the teacher's own task losses (joint training)
    freeze_teacher: bool = False
    teacher_weights: str = start_file()      # a thz_distill checkpoint (teacher.*); checkpoints hold the teacher
    # --- distillation
    feature_weight: float = 1.0
    logit_weight: float = 1.0
    relation_weight: float = 0.0             # similarity-preserving (pairwise cosine) distillation
    similarity_weight: float = 0.0           # KD on the verification similarities (softmax over the batch)
    similarity_temperature: float = 0.1      # its temperature
    kd_temperature: float = 3.0
    distill_full_triplet: bool = True
    # what the feature / relation / similarity terms compare: the teacher's embedding (THz + visible,
    # fused) with the student's, or the pooled features of the teacher's THz encoder (no visible
    # information) with the student's pooled encoder features
    distill_source: Literal["fused", "thz_branch"] = "fused"
    teacher_reconstruct: bool = True         # false: the teacher has no reconstruction loss (no decoder pass)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kd_temperature <= 0 or self.similarity_temperature <= 0:
            raise ValueError("kd_temperature and similarity_temperature must be > 0")
        if min(self.teacher_weight, self.feature_weight, self.logit_weight, self.relation_weight,
               self.similarity_weight) < 0:
            raise ValueError("teacher_weight, feature_weight, logit_weight, relation_weight and similarity_weight "
                             "must be >= 0")
        if self.fusion_dim < 1 or self.fusion_heads < 1 or self.fusion_dim % self.fusion_heads:
            raise ValueError(f"fusion_dim ({self.fusion_dim}) must be a positive multiple of fusion_heads "
                             f"({self.fusion_heads})")
        if self.teacher_embedding_dim < 0:
            raise ValueError("teacher_embedding_dim must be >= 0 (0 = the student's)")

    def student_params(self) -> ThzMtlParams:
        """The student's own ``thz_mtl`` parameters (what the exported ``model.pt`` records)."""
        names = {f.name for f in fields(ThzMtlParams)}
        return ThzMtlParams(**{n: copy.deepcopy(getattr(self, n)) for n in names})


def measured_to_hurt(p: ThzDistillParams) -> list[str]:
    """The settings of ``p`` that docs/results.md (THz) measured to raise the student's
    EER above thz_mtl's alone (synthetic THz, 3 seeds), each with what it cost."""
    out = []
    if p.logit_weight > 0:
        out.append(f"logit_weight={p.logit_weight:g} (posture-logit KD: EER +0.11 at weight 1)")
    if p.feature_weight > 0 and p.distill_source == "fused":
        out.append(f"feature_weight={p.feature_weight:g} on the fused embedding (EER +0.03 at weight 1)")
    return out


def load_teacher(teacher: nn.Module, path: str) -> None:
    """The ``teacher.*`` tensors of a thz_distill model file / checkpoint, strictly."""
    state = read_state_dict(path)
    prefix = next((p for p in ("teacher.", "module.teacher.") if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise WeightsError(f"teacher_weights {path}: no teacher.* tensors (not a thz_distill checkpoint? "
                           "its model.pt holds the student only)")
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = teacher.state_dict()
    missing = sorted(set(own) - set(sub))
    bad = [k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise WeightsError(f"teacher_weights {path}: does not fit this teacher "
                           f"({len(missing)} tensors missing, {len(bad)} of another shape, e.g. {(missing + bad)[:3]})")
    teacher.load_state_dict({k: sub[k] for k in own}, strict=True)


class ThzDistillModel(nn.Module):
    ROW_KEYS = ThzMtlModel.ROW_KEYS + ("vis",)

    def __init__(self, p: ThzDistillParams, twin_pairs: Sequence[Sequence[int]] = (), num_identities: int = 0):
        super().__init__()
        self.p = p
        self.student = ThzMtlModel(p.student_params(), twin_pairs, num_identities)
        tcfg = p.net_config()
        if p.teacher_embedding_dim:
            tcfg.embedding_dim = p.teacher_embedding_dim
        self.teacher = ThzTeacherNet(tcfg, vis_chans=3, fusion_dim=p.fusion_dim, fusion_heads=p.fusion_heads)
        self.feature_proj = (nn.Linear(p.embedding_dim, tcfg.embedding_dim, bias=False)
                             if tcfg.embedding_dim != p.embedding_dim and p.distill_source == "fused"
                             else nn.Identity())  # the THz branch: the student's own encoder architecture
        if p.teacher_weights:
            load_teacher(self.teacher, p.teacher_weights)
        if p.freeze_teacher:
            for q in self.teacher.parameters():
                q.requires_grad_(False)
        elif not p.teacher_reconstruct:
            # what only the reconstruction uses (the decoder, the fused map's way back to it): no gradient,
            # so DDP without find_unused_parameters sees every trained parameter used
            for q in (*self.teacher.decoder.parameters(), *self.teacher.thz_out.parameters()):
                q.requires_grad_(False)

    def train(self, mode: bool = True) -> "ThzDistillModel":
        super().train(mode)
        if self.p.freeze_teacher:
            self.teacher.eval()  # fixed BatchNorm statistics
        return self

    # inference: the student alone
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.embed(images)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student.predict(images)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if not self.training:
            return self.student(batch)
        p = self.p
        rows, n = triplet_rows(from_pixels(batch), self.ROW_KEYS)  # training images arrive as 8-bit pixels
        if "identity" in rows:
            rows["twin"] = self.student.co_twins(rows["identity"])
        if "vis" not in rows:
            raise KeyError("thz_distill needs the visible image of every training row (batch key 'vis')")
        s_out = self.student.net(rows["image"], rows.get("posture"), with_pooled=p.distill_source == "thz_branch")
        loss, terms = task_losses(s_out, rows, self.student.supcon, self.student.recon, p.label_smoothing,
                                  p.task_weights)
        m = rows["image"].shape[0] if p.distill_full_triplet else n
        t_rows = {k: v[:m] for k, v in rows.items()}
        with torch.set_grad_enabled(not p.freeze_teacher):
            t_out = self.teacher(t_rows["image"], t_rows["vis"], t_rows.get("posture"),
                                 reconstruct=p.teacher_reconstruct and not p.freeze_teacher)
        if not p.freeze_teacher:
            t_loss, t_terms = task_losses(t_out, t_rows, self.student.supcon, self.student.recon, p.label_smoothing,
                                          p.task_weights, prefix="teacher_")
            loss = loss + p.teacher_weight * t_loss
            terms.update(t_terms)
        d_terms = self.distill_terms(s_out, t_out, m)
        terms.update(d_terms)
        loss = loss + sum(w * d_terms[k] for k, w in self.distill_weights().items())
        return {"loss": loss, "terms": terms, **self.student.anchor_outputs(s_out, rows, n)}

    def distill_weights(self) -> dict[str, float]:
        p = self.p
        return {"distill_feature": p.feature_weight, "distill_logit": p.logit_weight,
                "distill_relation": p.relation_weight, "distill_similarity": p.similarity_weight}

    def distill_terms(self, s_out: Mapping[str, torch.Tensor], t_out: Mapping[str, torch.Tensor],
                      m: int) -> dict[str, torch.Tensor]:
        """The distillation terms on the first ``m`` student rows (the teacher's rows)."""
        p = self.p
        if p.distill_source == "thz_branch":
            s_vec, t_vec = s_out["pooled"][:m], t_out["thz_pooled"]
        else:
            s_vec, t_vec = s_out["embedding"][:m], t_out["embedding"]
        return {"distill_feature": feature_distill_loss(self.feature_proj(s_vec), t_vec),
                "distill_logit": kd_logit_loss(s_out["posture_logits"][:m], t_out["posture_logits"],
                                               p.kd_temperature),
                "distill_relation": relation_distill_loss(s_vec, t_vec),
                "distill_similarity": similarity_kd_loss(s_vec, t_vec, p.similarity_temperature)}


@register
class ThzDistillRecipe(ThzMtlRecipe):
    name = "thz_distill"
    Params = ThzDistillParams

    @classmethod
    def check_start_files(cls, params: ThzDistillParams) -> None:
        # At the start only: a resumed run's frozen teacher comes from its checkpoint.
        if params.freeze_teacher and not params.teacher_weights:
            raise ValueError("thz_distill: freeze_teacher=true needs recipe.params.teacher_weights=FILE "
                             "(a thz_distill checkpoint); a frozen untrained teacher teaches nothing")
        hurts = measured_to_hurt(params)
        if hurts:  # a warning, not an error: the settings are legitimate, only measured to cost verification
            log.warning("thz_distill: %s measured to make the student verify worse than thz_mtl alone "
                        "(docs/results.md, THz)", "; ".join(hurts))

    def __init__(self, params: ThzDistillParams, data_info: DataInfo):
        super().__init__(params, data_info)
        self.extra_images = {"vis": (params.teacher_visible, 3)}
        stems = {str(m).split(".", 1)[0] for m in data_info.modalities}
        if data_info.modalities and params.teacher_visible not in stems:
            raise RecipeDataError(f"thz_distill: the teacher needs {params.teacher_visible}.<ext> images, the data has "
                             f"{', '.join(sorted(data_info.modalities))} (synthetic: add "
                             f"{params.teacher_visible} to data.synthetic.modalities)")
        needed = [v for v in ("vis_target", "vis_negative") if "thz_negative" in stems and v not in stems]
        if needed:  # CSV triplets: the teacher sees the positive's and the negative's visible images too
            raise RecipeDataError(f"thz_distill: the CSV triplets of this data lack {', '.join(needed)}.<ext> "
                                  "(the CSVs' visible_unconcealed / visible_negative columns); the teacher needs "
                                  "the visible image of every triplet role")

    def build_model(self) -> nn.Module:
        return ThzDistillModel(self.params, self.data_info.twin_pairs, self.data_info.num_identities)

    def write_artifacts(self, model: nn.Module, ctx: ArtifactContext) -> dict[str, float]:
        from recipes import thz_report

        return thz_report.after_training(self, model, ctx, extra={"model": "student (THz only)"})

    def export_for_inference(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[str, Any, dict[str, Any]]:
        """``model.pt`` holds the student alone, as a ``thz_mtl`` model with its own params."""
        prefix = "student."
        student = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not student:
            raise KeyError("no student.* tensors in the thz_distill state dict")
        return ThzMtlRecipe.name, self.params.student_params(), student
