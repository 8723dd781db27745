"""Dual Cross-Attention Learning (DCAL) on a timm Vision Transformer.

After Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual
Categorization and Object Re-Identification", CVPR 2022. There is no official
code; this module follows the paper's text and records every choice the paper
leaves open (marked **[choice]**).

Branches
--------
* **SA** (self-attention): the backbone's ``L`` transformer blocks, unchanged.
  Their attention forward is re-implemented from each block's own ``qkv`` /
  ``q_norm`` / ``k_norm`` / ``attn_drop`` / ``norm`` / ``gate`` / ``proj`` modules
  (timm 1.0 ``timm.layers.Attention``; the fused SDPA kernel returns no
  weights) so the attention maps ``S_l`` are available. Only the exact types
  ``timm.models.vision_transformer.Block`` + ``timm.layers.Attention`` are
  accepted (ViT, DeiT, the hybrid ResNet-ViTs such as ``vit_small_r26_s32_224``,
  ...); anything else raises ``TypeError`` rather than silently computing
  something different. A backbone *name* is checked first
  (:func:`check_backbone_name`): a ViT/DeiT/hybrid is used as is; a CNN
  (ResNet, EfficientNet, ConvNeXt, ...) has no attention maps of its own and
  gets ``attention_depth`` timm blocks of width ``attention_dim`` with
  ``num_heads`` heads on its last feature map (:mod:`models.cnn_tokens`: 1x1
  projection to tokens, CLS token, positional embeddings), as the original
  DCAL's ``backbone: resnet50`` configs; anything else is refused with a
  ``ValueError`` naming the options.
* **GLCA** (global-local cross-attention), ``M = 1`` block with its own weights,
  initialised as a deep copy of the last SA block (and of the final norm).
  Attention rollout ``S^ = S-_L (x) ... (x) S-_1`` with ``S-_l = 0.5 mean_heads(S_l) + 0.5 I``
  (rows re-normalised; computed in float32 without gradient: it only selects
  tokens). The top ``R`` patch tokens by the CLS row of ``S^`` become the
  local queries ``Q^l``; keys and values are all tokens (global ``K^g, V^g``).
  - **[choice]** The CLS token is *not* a GLCA query and the GLCA embedding is
    the *mean of the R local query outputs*, then the (copied) final norm.
    Why: the CLS query attends to every key, so with ``M = 1`` block the output
    at the CLS position is the ordinary self-attention output of CLS whatever
    tokens are selected: a GLCA "class token" taken there would not depend on
    the rollout or the top-R selection at all (a random selection would give
    exactly the same embedding). Pooling the outputs of exactly the selected
    local queries makes the GLCA embedding what the paper describes: the most
    attended local tokens, each refined by cross-attention to the whole image.
  - **[choice]** The GLCA block runs *in parallel to the last SA block*: its
    input is ``x_{L-1}`` (the input of SA block ``L``), so at initialisation
    GLCA computes what SA block ``L`` computes, restricted to the selected
    queries. The rollout uses all ``L`` SA maps (as the paper's ``S^_i`` with
    ``i = L``).
  - **[choice]** ``R = round(top_r * num_patches)``, at least 1; ``top_r`` 0.1 (FGVC)
    or 0.3 (re-ID-like data). Register tokens (if any) are never selected.
  - **[choice]** The residual stream of the selected tokens is their ``x_{L-1}``;
    the GLCA block's MLP follows; the ``R`` outputs are mean-pooled, then the
    GLCA block's own copies of the final ``norm`` and ``fc_norm`` are applied
    (pool first, then norm: the embedding is a normalised vector, like the
    SA class token). Below, "GLCA class token" means this pooled vector.
* **PWCA** (pair-wise cross-attention), training only, ``T = L`` blocks whose
  weights are the SA blocks' (shared). For image ``i`` with distractor ``j``,
  block ``l`` uses the queries of ``i``'s PWCA state and keys/values
  ``[K_i; K_j]``, ``[V_i; V_j]`` under one softmax.
  - **[choice]** ``K_j, V_j`` come from the distractor's *SA* hidden state at the
    same depth (no recursion through the distractor's own PWCA branch); the
    gradient flows into them (not detached).
  - With ``j = i`` the PWCA output equals the SA output exactly (duplicated keys
    double every key's mass equally, the softmax is unchanged); tested.
  - **[choice]** The distractor is given per sample by an index tensor
    (``batch["distractor"]``) or picked by :func:`pick_distractors`: a co-twin
    image in the batch when there is one, else an image of another identity,
    else any other image (random among candidates, global torch RNG). The
    paper samples pairs at random; co-twins make the distractor maximally
    confusing, which suits twin verification.
  - The PWCA class token is trained with the label of image ``i`` only.

Heads and losses
----------------
* Identity margin heads (``arcface`` | ``cosface`` | ``linear``; ``s``, ``m``) on the
  class tokens. **[choice]** One head for SA that PWCA shares (PWCA shares
  SA's weights), and a separate head for GLCA. Class tokens go to the heads
  directly (no BNNeck/projection).
* Dynamic loss weights ``0.5 * sum_i (exp(-w_i) L_i + w_i)``, learnable ``w_i`` in
  ``self.loss_weights`` (**[choice]**: applied to every active term: ``sa``,
  ``glca``, ``pwca``, ``metric``, ``verif``; ``dynamic_weights=False`` gives a plain
  sum with ``metric_weight`` / ``verif_weight``).
* Twin-aware metric loss on the inference embedding (``triplet``: batch-hard
  plus a co-twin-negative term; ``supcon``: supervised contrastive with
  up-weighted co-twin negatives; ``none``).
* Optional pair-verification head: MLP on ``[|a-b|, a*b]`` of two embeddings ->
  one logit; trained with BCE on in-batch pairs (each anchor with a random
  positive of its identity, and with its distractor when of another identity).

Inference
---------
PWCA is removed. ``embed(images)`` = concatenation of the L2-normalised SA and
GLCA class tokens (SA only when ``use_glca=False``); the score of a pair is
the cosine similarity of their embeddings (= the mean of the SA and GLCA
cosines). ``attention_rollout(images)`` returns the CLS row of the rollout over
the patch grid ``[B, H', W']``.

``use_glca=False, use_pwca=False`` is the plain-ViT baseline on the same
pipeline (SA + margin head + metric loss).

Batch keys used by :meth:`DCAL.forward`
---------------------------------------
- ``image``: float ``[B, C, H, W]`` (required);
- ``identity``: long ``[B]`` class index (``-1`` = unlabelled; ignored by the
  losses; ``>= num_classes`` raises in training and is ignored by the
  classification terms in eval, so identity-disjoint val splits work). Needed
  for any loss; without it ``loss`` is a zero tensor. In eval the classification
  terms of identity-disjoint splits are meaningless: judge with verification
  metrics (:mod:`recipes.verification`) on ``embedding``;
- ``twin``: long ``[B]``, identity index of the sample's co-twin or ``-1``
  (optional; makes the metric loss and the distractor choice twin-aware);
- ``distractor``: long ``[B]`` batch indices (optional, overrides the picker).

Outputs: ``loss``, ``terms`` (unweighted), ``embedding`` ``[B, D or 2D]``,
``sa_logits``, ``glca_logits`` (if GLCA), ``pwca_logits`` (training with PWCA),
``identity_probs`` (mean of the SA and GLCA softmaxes, margin-free in eval),
``distractor`` (training with PWCA), ``verif_logits``/``verif_labels``/``verif_valid``
(if the verification head is on: ``[2B]``, row ``i`` paired with a random positive of
``i``, row ``B + i`` with its distractor; ``verif_valid`` marks the pairs that exist).

Not implemented: gradient checkpointing, PatchDropout, models with other
block/attention types (Swin, EVA, rope attentions...), stochastic depth
schedules specific to GLCA.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from models.backbones import build_backbone  # noqa: E402
from models.cnn_tokens import CNN_MODULES, build_cnn_attention_vit  # noqa: E402
from models.heads import build_identity_head  # noqa: E402
from models.partial_fc import ShardedMarginHead  # noqa: E402
from models.losses import (DynamicLossWeights, SupConLoss, TwinAwareTripletLoss, co_twin_mask,  # noqa: E402
                           masked_cross_entropy, masked_mean_of_sum, weighted_sum)
from models.distill import relation_distill_loss  # noqa: E402
from models.pixels import PixelInput  # noqa: E402

__all__ = ["DCALConfig", "DCAL", "pick_distractors", "rollout", "select_top_tokens", "block_forward",
           "attention_forward", "PairVerificationHead", "check_supported", "check_backbone_name"]

# timm modules whose models are VisionTransformers made of Block+Attention: plain ViTs,
# DeiT, and the hybrids (a ResNet stem whose feature map is the token grid).
_ATTENTION_MODULES = ("timm.models.vision_transformer", "timm.models.vision_transformer_hybrid",
                      "timm.models.deit")
BACKBONE_OPTIONS = ("a timm ViT (vit_tiny_patch16_224, vit_small_patch16_224, deit_small_patch16_224), "
                    "a timm hybrid ResNet+ViT (vit_tiny_r_s16_p8_224, vit_small_r26_s32_224, "
                    "vit_base_r50_s16_224), a ViT with conv_stem: true, or a timm CNN (resnet50, "
                    "efficientnet_b0, convnext_tiny, ...) with attention_dim and num_heads")


def check_backbone_name(name: str) -> Literal["vit", "cnn"]:
    """``"vit"`` when timm's ``name`` builds a ViT with attention blocks, ``"cnn"`` for a
    CNN whose feature map gets attention blocks (:mod:`models.cnn_tokens`); else
    ``ValueError`` (one line naming the options): DCAL's GLCA/PWCA and the rollout
    are made of attention maps, which other families (Swin, EVA, ...) compute differently."""
    from timm.models import is_model, model_entrypoint

    if not is_model(name):
        raise ValueError(f"backbone '{name}' is not a timm model; DCAL takes {BACKBONE_OPTIONS}")
    module = model_entrypoint(name).__module__
    if module in _ATTENTION_MODULES:
        return "vit"
    if module in CNN_MODULES:
        return "cnn"
    kind = module.rsplit(".", 1)[-1]
    raise ValueError(f"backbone '{name}' ({kind}) has no timm ViT Block/Attention layers, which DCAL's "
                     f"attention branches need; use {BACKBONE_OPTIONS}")


# ----------------------------------------------------------------------------- attention re-implementation

def check_supported(vit: nn.Module) -> None:
    """Raise ``TypeError`` unless ``vit`` is a timm VisionTransformer with a class
    token and plain ``Block``/``Attention`` modules."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"DCAL needs a timm VisionTransformer, got {type(vit).__name__}")
    if getattr(vit, "cls_token", None) is None:
        raise TypeError("DCAL needs a ViT with a class token (class_token=True)")
    if not isinstance(vit.patch_drop, nn.Identity):
        raise TypeError("DCAL does not support PatchDropout (patch_drop_rate must be 0)")
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; "
                            "DCAL re-implements timm's Block+Attention only")


def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, heads, N, head_dim]`` from normalised tokens, as timm's Attention."""
    B, N, _ = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_forward(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      gate_input: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention.forward`` after the qkv projection, for any q/k/v lengths.

    Returns the projected output ``[B, Nq, dim]`` and, if ``need_weights``, the
    softmax attention ``[B, heads, Nq, Nk]`` (before attention dropout).
    """
    B, _, Nq, _ = q.shape
    weights = None
    if need_weights:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        weights = scores.softmax(dim=-1)
        x = attn.attn_drop(weights) @ v
    else:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = x.transpose(1, 2).reshape(B, Nq, attn.attn_dim)
    x = attn.norm(x)
    if attn.gate is not None:
        x = x * attn.gate(gate_input).sigmoid()
    x = attn.proj_drop(attn.proj(x))
    return x, weights


def block_forward(blk: nn.Module, x: torch.Tensor, *, need_weights: bool = False,
                  extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                  query_index: torch.Tensor | None = None, return_kv: bool = False) -> dict[str, Any]:
    """One timm ``Block`` forward with the attention exposed.

    - ``extra_kv``: keys/values ``[B, heads, N2, hd]`` appended to the block's own
      (PWCA: one softmax over both images);
    - ``query_index``: ``[B, Q]`` token indices; only those tokens are queries and
      only they are returned (GLCA); keys/values remain all tokens.
    Returns ``{"x", "attn" (or None), "k", "v" (if return_kv)}``.
    """
    h = blk.norm1(x)
    q, k, v = _qkv(blk.attn, h)
    out: dict[str, Any] = {}
    if return_kv:
        out["k"], out["v"] = k, v
    if extra_kv is not None:
        k = torch.cat([k, extra_kv[0]], dim=2)
        v = torch.cat([v, extra_kv[1]], dim=2)
    if query_index is not None:
        qi = query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        q = q.gather(2, qi)
        ti = query_index[:, :, None].expand(-1, -1, x.shape[2])
        x = x.gather(1, ti)
        h = h.gather(1, ti)
    a, w = attention_forward(blk.attn, q, k, v, h, need_weights)
    x = x + blk.drop_path1(blk.ls1(a))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    out["x"], out["attn"] = x, w
    return out


# ----------------------------------------------------------------------------- rollout / selection

def rollout(attn_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout ``S-_L @ ... @ S-_1`` (``S-_l = 0.5 A_l + 0.5 I``, rows re-normalised).

    ``attn_maps``: per block, ``[B, heads, N, N]`` or head-averaged ``[B, N, N]``.
    Returns ``[B, N, N]`` float32 whose rows sum to 1.
    """
    result = None
    for a in attn_maps:
        a = a.detach().float()
        if a.dim() == 4:
            a = a.mean(dim=1)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        s = 0.5 * a + 0.5 * eye
        s = s / s.sum(dim=-1, keepdim=True)
        result = s if result is None else s @ result
    if result is None:
        raise ValueError("rollout needs at least one attention map")
    return result / result.sum(dim=-1, keepdim=True)


def select_top_tokens(rollout_map: torch.Tensor, ratio: float, num_prefix_tokens: int = 1,
                      include_cls: bool = True) -> torch.Tensor:
    """Token indices of the ``R = round(ratio * num_patches)`` (at least 1) patch
    tokens with the highest CLS-row rollout score, in decreasing score order:
    ``[B, 1 + R]`` preceded by the CLS token (0) when ``include_cls``, else
    ``[B, R]`` (what GLCA uses). Prefix tokens (CLS, registers) are never selected."""
    scores = rollout_map[:, 0, num_prefix_tokens:]
    n = int(scores.shape[1])  # a plain int also while traced for ONNX (the patch count is fixed)
    r = min(n, max(1, int(round(ratio * n))))
    top = scores.topk(r, dim=1).indices + num_prefix_tokens
    if not include_cls:
        return top
    cls = torch.zeros(scores.shape[0], 1, dtype=top.dtype, device=top.device)
    return torch.cat([cls, top], dim=1)


def pick_distractors(identity: torch.Tensor, twin: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """For each sample a batch index: a random co-twin image if the batch has one,
    else a random image of another identity, else a random other image (self
    only for a batch of one). Unlabelled (``-1``) identities count as "other"."""
    identity = identity.long()
    B = identity.shape[0]
    dev = identity.device
    same = (identity[:, None] == identity[None, :]) & (identity[:, None] >= 0)
    tw = co_twin_mask(identity, twin)
    score = torch.rand(B, B, device=dev, generator=generator) + 2.0 * (~same).float() + 4.0 * tw.float()
    if B > 1:
        score = score.masked_fill(torch.eye(B, dtype=torch.bool, device=dev), -1.0)
    return score.argmax(dim=1)


# ----------------------------------------------------------------------------- heads

class PairVerificationHead(nn.Module):
    """``MLP([|a-b|, a*b]) -> logit`` (same identity)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([(a - b).abs(), a * b], dim=1)).squeeze(1)


# ----------------------------------------------------------------------------- model

@dataclass
class DCALConfig:
    num_classes: int = 0                      # identity classes of the margin heads (>= 1)
    backbone: str = "vit_small_patch16_224"
    pretrained: bool = False                  # timm hub weights
    weights_path: str = ""                    # local .pth/.safetensors (takes precedence)
    img_size: int = 224
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. patch_size, depth, drop_path_rate
    # A CNN backbone (resnet50, ...): attention blocks on its feature map (models/cnn_tokens.py);
    # backbone_kwargs then go to the CNN (e.g. output_stride). All three 0 for a ViT.
    attention_dim: int = 0
    num_heads: int = 0
    attention_depth: int = 0
    use_glca: bool = True
    use_pwca: bool = True
    top_r: float = 0.1
    head: Literal["arcface", "cosface", "linear"] = "arcface"
    margin_s: float = 30.0
    margin_m: float | None = None             # None: ArcFace 0.5, CosFace 0.35
    # partial_fc: the heads' centres split over ``ranks`` (models/partial_fc.py); sample_rate < 1
    # samples the negative centres. Needs a margin head.
    head_sharding: Literal["none", "partial_fc"] = "none"
    sample_rate: float = 1.0
    metric_loss: Literal["triplet", "supcon", "none"] = "triplet"
    triplet_margin: float = 0.3
    twin_weight: float = 1.0                  # triplet: weight of the co-twin-negative term
    supcon_temperature: float = 0.1
    twin_negative_weight: float = 2.0         # supcon: co-twin negatives' weight in the denominator
    verification_head: bool = False
    dynamic_weights: bool = True
    metric_weight: float = 1.0                # static weights (dynamic_weights=False)
    verif_weight: float = 1.0
    # Distillation from a frozen teacher (models/distill.py), attached by ``attach_teacher``:
    # ``distill_weight`` x the relational KD loss (not a learned weight) on the SA class token
    # (``embedding``) or on a DeiT distillation token (``token``: a second prefix token, timm's
    # register token, whose output joins the embedding). 0: no distillation, no token.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_target: Literal["token", "embedding"] = "embedding"

    def __post_init__(self) -> None:
        if not 0.0 < self.top_r <= 1.0:
            raise ValueError(f"top_r must be in (0, 1], got {self.top_r}")

    @property
    def distill_token(self) -> bool:
        return self.distill_weight > 0 and self.distill_target == "token"


def _identity_head(cfg: DCALConfig, dim: int, ranks: tuple[int, int, Any]) -> nn.Module:
    if cfg.head_sharding != "partial_fc":
        return build_identity_head(cfg.head, dim, cfg.num_classes, s=cfg.margin_s, m=cfg.margin_m)
    if cfg.head == "linear":
        raise ValueError("head_sharding=partial_fc needs a margin head (arcface | cosface), not head=linear")
    m = ({"arcface": 0.5, "cosface": 0.35}[cfg.head]) if cfg.margin_m is None else cfg.margin_m
    rank, world, group = ranks
    return ShardedMarginHead(cfg.head, dim, cfg.num_classes, s=cfg.margin_s, m=m, sample_rate=cfg.sample_rate,
                             rank=rank, world=world, group=group)


class DCAL(nn.Module):
    """SA + GLCA + PWCA on a timm ViT; see the module docstring.

    ``DCAL(cfg)`` or ``DCAL(num_classes=..., backbone="vit_small_patch16_224", ...)``
    (keyword overrides of :class:`DCALConfig`); ``backbone_module`` passes a
    ready timm VisionTransformer instead of building ``cfg.backbone``.
    """

    def __init__(self, cfg: DCALConfig | None = None, backbone_module: nn.Module | None = None,
                 ranks: tuple[int, int, Any] = (0, 1, None), **overrides: Any):
        """``ranks``: (rank, world, process group) that share the centres of a sharded head."""
        super().__init__()
        cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else DCALConfig(**overrides)
        if cfg.num_classes < 1:
            raise ValueError("DCALConfig.num_classes must be >= 1")
        self.cfg = cfg
        backbone = backbone_module
        if backbone is None:
            weights: bool | str = cfg.weights_path or cfg.pretrained
            token = {"reg_tokens": 1} if cfg.distill_token else {}  # the distillation token after CLS
            if check_backbone_name(cfg.backbone) == "cnn":
                backbone = build_cnn_attention_vit(cfg.backbone, attention_dim=cfg.attention_dim,
                                                   num_heads=cfg.num_heads, depth=cfg.attention_depth,
                                                   img_size=cfg.img_size, weights=weights,
                                                   cnn_kwargs=cfg.backbone_kwargs, **token)
            elif cfg.attention_dim or cfg.num_heads or cfg.attention_depth:
                raise ValueError(f"attention_dim / num_heads / attention_depth apply to a CNN backbone; the ViT "
                                 f"'{cfg.backbone}' has its own blocks")
            else:
                backbone, _ = build_backbone(cfg.backbone, weights, img_size=cfg.img_size,
                                             **{**cfg.backbone_kwargs, **token})
        check_supported(backbone)
        self.pixels = PixelInput()  # training batches arrive as 8-bit pixels
        self.vit = backbone
        dim = backbone.embed_dim
        self.dim = dim
        self.num_prefix_tokens = backbone.num_prefix_tokens
        if cfg.use_glca:
            self.glca_block = copy.deepcopy(backbone.blocks[-1])
            self.glca_norm = copy.deepcopy(backbone.norm)
            self.glca_fc_norm = copy.deepcopy(backbone.fc_norm)
        self.head_sa = _identity_head(cfg, dim, ranks)
        self.head_glca = _identity_head(cfg, dim, ranks) if cfg.use_glca else None
        self.embed_dim = dim * (1 + int(cfg.use_glca) + int(cfg.distill_token))
        if cfg.metric_loss == "triplet":
            self.metric = TwinAwareTripletLoss(cfg.triplet_margin, twin_weight=cfg.twin_weight)
        elif cfg.metric_loss == "supcon":
            self.metric = SupConLoss(cfg.supcon_temperature, twin_negative_weight=cfg.twin_negative_weight)
        else:
            self.metric = None
        self.verif = PairVerificationHead(self.embed_dim) if cfg.verification_head else None
        names = ["sa"] + (["glca"] if cfg.use_glca else []) + (["pwca"] if cfg.use_pwca else [])
        names += (["metric"] if self.metric is not None else []) + (["verif"] if self.verif is not None else [])
        self.term_names = names
        self.loss_weights = DynamicLossWeights(names) if cfg.dynamic_weights else None
        # The frozen teacher is held outside the module tree (a list, not an attribute): it is in no
        # state dict, checkpoint, optimizer or DDP/FSDP/DeepSpeed wrapper; ``_apply`` moves it along.
        self._teacher: list[nn.Module] = []

    def attach_teacher(self, teacher: nn.Module) -> None:
        """The frozen teacher of the distillation term (any module with ``embed(images)``): no
        gradient, eval mode for good (BatchNorm statistics fixed)."""
        if self.cfg.distill_weight <= 0:
            raise ValueError("attach_teacher needs DCALConfig.distill_weight > 0")
        teacher.requires_grad_(False)
        self._teacher[:] = [teacher.eval()]

    def _apply(self, fn: Any, recurse: bool = True) -> "DCAL":
        super()._apply(fn, recurse)
        for teacher in self._teacher:  # .to(device) / .cuda() move the teacher with the student
            teacher._apply(fn)
        return self

    # --- branches ------------------------------------------------------------
    def _embed_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        vit = self.vit
        x = vit.patch_embed(self.pixels(images))
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(vit.patch_embed.grid_size)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        return x, grid  # type: ignore[return-value]

    def _cls(self, x: torch.Tensor, norm: nn.Module, fc_norm: nn.Module) -> torch.Tensor:
        return fc_norm(norm(x)[:, 0])

    def forward_sa(self, images: torch.Tensor, need_weights: bool = False, keep_kv: bool = False) -> dict[str, Any]:
        """SA branch: ``cls``, ``x_in_last`` (input of the last block), ``x0``,
        ``attn`` (per-block head-averaged maps, detached) and ``kv`` on request."""
        x, grid = self._embed_tokens(images)
        x0 = x
        attn: list[torch.Tensor] = []
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        x_in_last = x
        for blk in self.vit.blocks:
            x_in_last = x
            o = block_forward(blk, x, need_weights=need_weights, return_kv=keep_kv)
            x = o["x"]
            if need_weights:
                attn.append(o["attn"].detach().float().mean(dim=1))
            if keep_kv:
                kv.append((o["k"], o["v"]))
        xn = self.vit.norm(x)
        out = {"cls": self.vit.fc_norm(xn[:, 0]), "x0": x0, "x_in_last": x_in_last, "attn": attn, "kv": kv,
               "grid": grid}
        if self.cfg.distill_token:
            out["dist"] = self.vit.fc_norm(xn[:, 1])
        return out

    def forward_glca(self, x_in_last: torch.Tensor, attn: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """GLCA: the top-``R`` patch tokens by the CLS row of the rollout of ``attn``
        (all SA blocks) are the queries of the GLCA block over all tokens of
        ``x_in_last``; returns ``cls`` (norms of the mean of the ``R`` outputs),
        ``index`` ``[B, R]`` (the selected tokens) and ``rollout``.

        CLS is deliberately not a query: its output would ignore the selection
        (it attends to all keys anyway); see the module docstring."""
        r = rollout(attn)
        idx = select_top_tokens(r, self.cfg.top_r, self.num_prefix_tokens, include_cls=False)
        o = block_forward(self.glca_block, x_in_last, query_index=idx)
        pooled = o["x"].mean(dim=1)
        return {"cls": self.glca_fc_norm(self.glca_norm(pooled)), "index": idx, "rollout": r}

    def forward_pwca(self, x0: torch.Tensor, kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     distractor: torch.Tensor) -> torch.Tensor:
        y = x0
        d = distractor.long()
        for blk, (k, v) in zip(self.vit.blocks, kv):
            y = block_forward(blk, y, extra_kv=(k[d], v[d]))["x"]
        return self._cls(y, self.vit.norm, self.vit.fc_norm)

    def branches(self, images: torch.Tensor, distractor: torch.Tensor | None = None) -> dict[str, Any]:
        """Class tokens of every active branch; PWCA only when ``distractor`` is given."""
        cfg = self.cfg
        pwca = distractor is not None and cfg.use_pwca
        sa = self.forward_sa(images, need_weights=cfg.use_glca, keep_kv=pwca)
        out: dict[str, Any] = {"sa": sa["cls"], "grid": sa["grid"]}
        if "dist" in sa:
            out["dist"] = sa["dist"]
        if cfg.use_glca:
            g = self.forward_glca(sa["x_in_last"], sa["attn"])
            out["glca"], out["glca_index"] = g["cls"], g["index"]
        if pwca:
            out["pwca"] = self.forward_pwca(sa["x0"], sa["kv"], distractor)
        return out

    # --- inference -------------------------------------------------------------
    def embedding_from(self, br: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [F.normalize(br["sa"].float(), dim=1)]
        if "glca" in br:
            parts.append(F.normalize(br["glca"].float(), dim=1))
        if "dist" in br:  # DeiT uses both tokens at test time
            parts.append(F.normalize(br["dist"].float(), dim=1))
        return torch.cat(parts, dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` concatenated L2-normalised class tokens (``embed_dim`` each: SA, GLCA, distillation)."""
        return self.embedding_from(self.branches(images))

    @staticmethod
    def score(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of paired rows."""
        return F.cosine_similarity(emb_a.float(), emb_b.float(), dim=1)

    @torch.no_grad()
    def attention_rollout(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H', W']`` CLS-row rollout over the patch grid (rows of ``S^`` sum to 1,
        so the map sums to ``1 - S^[0, prefix tokens]``)."""
        sa = self.forward_sa(images, need_weights=True)
        r = rollout(sa["attn"])
        gh, gw = sa["grid"]
        return r[:, 0, self.num_prefix_tokens:].reshape(-1, gh, gw)

    # --- training ------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        images = batch["image"]
        identity = batch.get("identity")
        twin = batch.get("twin")
        distractor = None
        if self.training and cfg.use_pwca:
            distractor = batch.get("distractor")
            if distractor is None:
                if identity is None:
                    raise KeyError("DCAL training with PWCA needs batch['identity'] (or batch['distractor'])")
                distractor = pick_distractors(identity, twin)
        br = self.branches(images, distractor)
        out: dict[str, Any] = {}
        terms: dict[str, torch.Tensor] = {}
        # A label >= num_classes is skipped (eval: identities the classifier never saw); in
        # training the data path refuses such samples (recipes.labels.class_label).
        for name, head in (("sa", self.head_sa), ("glca", self.head_glca), ("pwca", self.head_sa)):
            if name in br:
                logits, loss = self._classify(head, br[name], identity)
                if logits is not None:
                    out[f"{name}_logits"] = logits
                if loss is not None:
                    terms[name] = loss
        if "pwca" in br:
            out["distractor"] = distractor
        emb = self.embedding_from(br)
        out["embedding"] = emb
        if "sa_logits" in out:  # (a head sharded across ranks has no logits over every class)
            probs = out["sa_logits"].float().softmax(1)
            if "glca_logits" in out:
                probs = 0.5 * (probs + out["glca_logits"].float().softmax(1))
            out["identity_probs"] = probs

        if identity is not None:
            if self.metric is not None:
                terms["metric"] = self.metric(emb, identity, twin)
            if self.verif is not None:
                v_logits, v_labels, v_valid = self._verification(emb, identity, twin, distractor)
                out["verif_logits"], out["verif_labels"], out["verif_valid"] = v_logits, v_labels, v_valid
                bce = F.binary_cross_entropy_with_logits(v_logits.float(), v_labels, reduction="none")
                terms["verif"] = masked_mean_of_sum((bce * v_valid).sum(), v_valid.sum())
        out["terms"] = terms
        if not terms:
            out["loss"] = emb.sum() * 0.0
        elif self.loss_weights is not None:
            out["loss"] = self.loss_weights(terms)
        else:
            out["loss"] = weighted_sum(terms, {"metric": cfg.metric_weight, "verif": cfg.verif_weight})
        if self._teacher and self.training:
            terms["distill"] = self._distill_loss(images, br)
            out["loss"] = out["loss"] + cfg.distill_weight * terms["distill"]
        return out

    def _distill_loss(self, images: torch.Tensor, br: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The relational KD term against the frozen teacher's embeddings of the same images."""
        with torch.no_grad():
            target = self._teacher[0].embed(images).float()
        student = br["dist"] if self.cfg.distill_token else br["sa"]
        return relation_distill_loss(student, target, self.cfg.distill_temperature)

    def _classify(self, head: nn.Module, feats: torch.Tensor,
                  identity: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits or None, identity loss or None without labels) of one branch. A sharded
        head gives its own loss (the softmax spans the ranks) and logits only in a world of one."""
        if isinstance(head, ShardedMarginHead):
            logits = head.logits(feats) if head.world == 1 and not self.training else None
            return logits, (head.loss(feats, identity) if identity is not None else None)
        logits = head(feats, identity if self.training else None)
        return logits, (masked_cross_entropy(logits, identity) if identity is not None else None)

    def _verification(self, emb: torch.Tensor, identity: torch.Tensor, twin: torch.Tensor | None,
                      distractor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In-batch pairs ``[2B]``: (i, random positive of i) -> 1, (i, distractor of i) -> 0,
        and which of them exist. Every row is scored (fixed shapes: one compiled graph);
        the loss counts the existing pairs only."""
        identity = identity.long()
        B = identity.shape[0]
        eye = torch.eye(B, dtype=torch.bool, device=emb.device)
        labelled = identity >= 0
        same = (identity[:, None] == identity[None, :]) & ~eye & labelled[:, None]
        if distractor is None:
            distractor = pick_distractors(identity, twin)
        rnd = torch.rand(B, B, device=emb.device).masked_fill(~same, -1.0)
        pos = rnd.argmax(1)
        has_pos = same.any(1)
        neg_ok = labelled & (identity[distractor] != identity) & (identity[distractor] >= 0)
        rows = torch.arange(B, device=emb.device)
        logits = self.verif(emb[torch.cat([rows, rows])], emb[torch.cat([pos, distractor])])
        labels = torch.cat([torch.ones(B, device=emb.device), torch.zeros(B, device=emb.device)])
        return logits, labels, torch.cat([has_pos, neg_ok])

    def param_groups(self, base_lr: float, backbone_lr_mult: float = 1.0,
                     loss_weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Backbone (SA/PWCA) params at ``base_lr * backbone_lr_mult``; the dynamic
        loss weights without weight decay; the rest (GLCA, heads) at ``base_lr``."""
        bb = list(self.vit.parameters())
        lw = list(self.loss_weights.parameters()) if self.loss_weights is not None else []
        seen = {id(p) for p in bb + lw}
        rest = [p for p in self.parameters() if id(p) not in seen]
        groups = [{"params": bb, "lr": base_lr * backbone_lr_mult}, {"params": rest, "lr": base_lr}]
        if lw:
            groups.append({"params": lw, "lr": base_lr, "weight_decay": loss_weight_decay})
        return groups
