"""THz face networks: multi-task student (verification, posture, concealed ->
unconcealed reconstruction) and the THz + visible teacher it can learn from.

Pure ``torch.nn``: images in, tensors out; losses are computed by the recipes
(:mod:`recipes.thz`, :mod:`recipes.thz_distill`).

Encoder (:func:`build_encoder`), a feature pyramid ``[f_0, ..., f_L]`` from
high to low resolution, with ``channels`` and ``reductions`` (input size /
feature size):

- ``custom``: a small ResNet (the original system's default): a 3x3 stem at
  full resolution, then ``depth`` stages of ``blocks`` basic residual blocks,
  each stage halving the resolution and doubling the width (``width`` first);
- any timm CNN (``resnet18``, ...) with ``features_only=True``; ``in_chans``
  1 (grey THz) or more. Local weights (``weights_path``, the plain timm model's
  state dict) are loaded strictly by :func:`models.backbones.load_backbone_weights`
  (a missing or misshaped tensor raises; never a fallback to random), the
  first convolution adapted to ``in_chans`` by timm.

Heads on the pooled deepest features (:class:`ThzHeads`): an embedding
(linear + LayerNorm; what verification compares), a projection MLP on it (the
SupCon space), a linear posture classifier on it, and the reconstruction
decoder.

Reconstruction (:class:`MoEUNetDecoder`): one U-Net decoder per posture
(an *expert*), fed by the encoder's skip features, ending in a sigmoid (images
in [0, 1]); with ``residual`` the expert's output is added to the input's
logit (``sigmoid(logit(x) + h)``, starting as the input itself), so an expert
learns what the concealment changed rather than the whole face. Gating:

- ``hard``: each row goes through one expert only: its true posture in
  training (the predicted one for unlabelled rows) and the predicted posture at
  inference. Unselected experts see no row; their parameters are tied into the
  output with a zero factor so that every strategy (DDP without
  ``find_unused_parameters``, DeepSpeed) sees every parameter used, and they
  receive an exactly-zero gradient;
- ``soft``: every expert decodes every row; the outputs are mixed with
  ``softmax(posture_logits / gate_temperature)`` (gradients reach the posture
  head through the gate).

Teacher (:class:`ThzTeacherNet`): a THz encoder and a visible encoder (same
architecture, own weights) whose deepest feature maps are fused by
:class:`DualCrossAttention` (THz tokens attend to visible tokens and visible
tokens to THz tokens); the fused THz map replaces the THz bottleneck for the
decoder, and the embedding is made from both pooled streams. Same three heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ThzNetConfig", "Encoder", "CustomResNetEncoder", "TimmEncoder", "build_encoder", "UNetDecoder",
           "MoEUNetDecoder", "ThzHeads", "ThzMtlNet", "DualCrossAttention", "ThzTeacherNet", "NUM_POSTURES"]

NUM_POSTURES = 5


@dataclass
class ThzNetConfig:
    encoder: str = "custom"            # "custom" or a timm CNN name
    in_chans: int = 1
    width: int = 16                    # custom: channels of the first stage
    depth: int = 4                     # custom: stages, each halves the resolution
    blocks: int = 1                    # custom: residual blocks per stage
    weights_path: str = ""             # timm: a local weights file (strict load)
    embedding_dim: int = 128
    projection_dim: int = 128          # SupCon space
    projection_hidden: int = 256
    num_postures: int = NUM_POSTURES
    gating: Literal["hard", "soft"] = "hard"
    gate_temperature: float = 1.0      # soft gating
    decoder_width: int = 0             # channels of every decoder stage; 0 = the skip's own
    residual: bool = False             # reconstruction = sigmoid(logit(input) + decoder output)


# ----------------------------------------------------------------------------- encoders

class Encoder(nn.Module):
    channels: list[int]
    reductions: list[int]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class CustomResNetEncoder(Encoder):
    def __init__(self, in_chans: int = 1, width: int = 16, depth: int = 4, blocks: int = 1):
        super().__init__()
        if depth < 1 or width < 1 or blocks < 1:
            raise ValueError("custom encoder: depth, width and blocks must be >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, cin = [], width
        self.channels, self.reductions = [width], [1]
        for i in range(depth):
            cout = width * 2 ** (i + 1)
            stages.append(nn.Sequential(BasicBlock(cin, cout, 2), *[BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]))
            self.channels.append(cout)
            self.reductions.append(2 ** (i + 1))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class TimmEncoder(Encoder):
    def __init__(self, name: str, in_chans: int = 1, weights_path: str = ""):
        super().__init__()
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import timm

        self.body = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
        if weights_path:
            self._load(name, in_chans, str(weights_path))
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())

    def _load(self, name: str, in_chans: int, path: str) -> None:
        """Local weights of the plain timm model (``models.backbones``' strict loader:
        a missing, misshaped or unreadable tensor raises ``WeightsError``), the first
        convolution adapted to ``in_chans`` by timm (grey: the RGB filters summed).
        Not timm's own file loading: it falls back to a random first layer silently."""
        import timm
        from timm.models import adapt_input_conv

        from models.backbones import WeightsError, load_backbone_weights, read_state_dict

        first = self.body.pretrained_cfg.get("first_conv", "conv1") + ".weight"
        file_state = read_state_dict(path)
        file_chans = next((int(v.shape[1]) for k, v in file_state.items() if k.endswith(first) and v.ndim == 4), 3)
        plain = timm.create_model(name, pretrained=False, num_classes=0, in_chans=file_chans)
        load_backbone_weights(plain, path)
        state = plain.state_dict()
        if file_chans != in_chans and first in state:
            state[first] = adapt_input_conv(in_chans, state[first])
        own = self.body.state_dict()
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        if missing:
            raise WeightsError(f"{path}: {len(missing)} encoder tensors have no counterpart in the {name} weights "
                               f"(e.g. {missing[:4]})")
        self.body.load_state_dict({k: state[k] for k in own if k in state}, strict=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def build_encoder(cfg: ThzNetConfig, in_chans: int | None = None) -> Encoder:
    chans = cfg.in_chans if in_chans is None else in_chans
    if cfg.encoder == "custom":
        return CustomResNetEncoder(chans, cfg.width, cfg.depth, cfg.blocks)
    return TimmEncoder(cfg.encoder, chans, cfg.weights_path)


# ----------------------------------------------------------------------------- decoders

def _norm(c: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: with hard gating an expert sees a data-dependent
    # sub-batch (possibly one row); its statistics must not depend on that.
    return nn.GroupNorm(math.gcd(c, 8), c)


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin + cskip, cout, 3, 1, 1, bias=False), _norm(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip], 1))


class UNetDecoder(nn.Module):
    """Upsamples the deepest feature map through every shallower skip (concatenate,
    two 3x3 convs), then to the input size, and maps to ``out_chans`` in [0, 1]:
    ``sigmoid(h)``, or with a ``base`` image (residual mode) ``sigmoid(logit(base) + h)``,
    which is the base itself while ``h`` is 0 (the output layer starts at zero then)."""

    def __init__(self, channels: Sequence[int], out_chans: int = 1, width: int = 0, residual: bool = False):
        super().__init__()
        chans = list(channels)
        blocks, cin = [], chans[-1]
        for cskip in reversed(chans[:-1]):
            cout = width or cskip
            blocks.append(_UpBlock(cin, cskip, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, out_chans, 1)
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int],
                base: torch.Tensor | None = None) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block(x, skip)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        h = self.head(x)
        if base is not None:
            h = h + torch.logit(base.to(h.dtype).clamp(1e-3, 1 - 1e-3))
        return torch.sigmoid(h)


class MoEUNetDecoder(nn.Module):
    """One :class:`UNetDecoder` per posture; see the module doc for the gating."""

    def __init__(self, channels: Sequence[int], num_experts: int = NUM_POSTURES, out_chans: int = 1,
                 width: int = 0, gating: str = "hard", gate_temperature: float = 1.0, residual: bool = False):
        super().__init__()
        if gating not in ("hard", "soft"):
            raise ValueError(f"gating must be 'hard' or 'soft', got {gating!r}")
        self.experts = nn.ModuleList(UNetDecoder(channels, out_chans, width, residual) for _ in range(num_experts))
        self.gating, self.gate_temperature = gating, float(gate_temperature)

    def route(self, posture_logits: torch.Tensor, posture: torch.Tensor | None) -> torch.Tensor:
        """Hard gating's expert per row: the true posture in training (when labelled),
        else the predicted one."""
        pred = posture_logits.detach().argmax(1)
        if self.training and posture is not None:
            posture = posture.long().to(pred.device)
            return torch.where((posture >= 0) & (posture < len(self.experts)), posture, pred)
        return pred

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int], posture_logits: torch.Tensor,
                posture: torch.Tensor | None = None,
                base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [B, C, H, W], gate [B, E])``; ``gate`` rows are one-hot for hard gating.
        ``base``: the input images, for residual experts."""
        if self.gating == "soft":
            gate = F.softmax(posture_logits.float() / self.gate_temperature, dim=1)
            outs = torch.stack([e(feats, size, base) for e in self.experts], 1)      # [B, E, C, H, W]
            return (outs * gate[:, :, None, None, None].to(outs.dtype)).sum(1), gate
        idx = self.route(posture_logits, posture)
        gate = F.one_hot(idx, len(self.experts)).to(posture_logits.dtype)
        if torch.compiler.is_compiling():
            # Which rows go to which expert is data: sub-batches of data-dependent size would
            # break a compiled step into pieces at every expert. Compiled, every expert decodes
            # every row (E x the decoder's work) and each row keeps its own expert's output:
            # the same values (GroupNorm, not BatchNorm: per row) and the same gradients.
            outs = torch.stack([e(feats, size, base) for e in self.experts], 1)      # [B, E, C, H, W]
            return outs[torch.arange(idx.shape[0], device=idx.device), idx], gate
        out = None
        tie = None
        for k, expert in enumerate(self.experts):
            rows = (idx == k).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                z = sum(p.sum() for p in expert.parameters()) * 0.0
                tie = z if tie is None else tie + z
                continue
            y = expert([f.index_select(0, rows) for f in feats], size,
                       base.index_select(0, rows) if base is not None else None)
            if out is None:
                out = y.new_zeros((idx.shape[0], *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        assert out is not None  # idx has at least one row
        return (out if tie is None else out + tie.to(out.dtype)), gate


# ----------------------------------------------------------------------------- heads and the student

class ThzHeads(nn.Module):
    """Embedding, SupCon projection and posture heads on a pooled feature vector."""

    def __init__(self, in_features: int, cfg: ThzNetConfig):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(in_features, cfg.embedding_dim), nn.LayerNorm(cfg.embedding_dim))
        self.projection = nn.Sequential(nn.Linear(cfg.embedding_dim, cfg.projection_hidden), nn.ReLU(inplace=True),
                                        nn.Linear(cfg.projection_hidden, cfg.projection_dim))
        self.posture = nn.Linear(cfg.embedding_dim, cfg.num_postures)

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embedding(pooled)
        return {"embedding": emb, "projection": self.projection(emb), "posture_logits": self.posture(emb)}


class ThzMtlNet(nn.Module):
    """The THz-only multi-task network (the ``thz_mtl`` model and the distillation student)."""

    def __init__(self, cfg: ThzNetConfig, out_chans: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.heads = ThzHeads(self.encoder.channels[-1], cfg)
        self.decoder = MoEUNetDecoder(self.encoder.channels, cfg.num_postures, out_chans or cfg.in_chans,
                                      cfg.decoder_width, cfg.gating, cfg.gate_temperature, cfg.residual)

    def forward(self, thz: torch.Tensor, posture: torch.Tensor | None = None,
                reconstruct: bool = True, with_pooled: bool = False) -> dict[str, torch.Tensor]:
        """``with_pooled``: also the pooled deepest features (``pooled``; what a
        distillation of the teacher's THz branch compares), not a prediction."""
        feats = self.encoder(thz)
        pooled = feats[-1].mean((2, 3))
        out = self.heads(pooled)
        if with_pooled:
            out["pooled"] = pooled
        if reconstruct:
            out["reconstruction"], out["gate"] = self.decoder(feats, tuple(thz.shape[-2:]), out["posture_logits"],
                                                              posture, thz if self.cfg.residual else None)
        return out

    def embed(self, thz: torch.Tensor) -> torch.Tensor:
        return self.heads(self.encoder(thz)[-1].mean((2, 3)))["embedding"]


# ----------------------------------------------------------------------------- teacher

class DualCrossAttention(nn.Module):
    """Two token streams attend to each other (pre-norm, residual), then each gets a
    feed-forward block: ``a' = a + MHA(a, b, b)``, ``b' = b + MHA(b, a, a)``."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion dim {dim} must be divisible by heads {heads}")
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.a_to_b = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.b_to_a = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlp_a = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_b = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        na, nb = self.norm_a(a), self.norm_b(b)
        a = a + self.a_to_b(na, nb, nb, need_weights=False)[0]
        b = b + self.b_to_a(nb, na, na, need_weights=False)[0]
        return a + self.mlp_a(a), b + self.mlp_b(b)


class ThzTeacherNet(nn.Module):
    """THz + visible teacher (see the module doc). ``vis_chans``: 3 for RGB."""

    def __init__(self, cfg: ThzNetConfig, vis_chans: int = 3, fusion_dim: int = 64, fusion_heads: int = 4):
        super().__init__()
        self.cfg = cfg
        self.thz_encoder = build_encoder(cfg)
        self.vis_encoder = build_encoder(cfg, in_chans=vis_chans)
        c_thz, c_vis = self.thz_encoder.channels[-1], self.vis_encoder.channels[-1]
        self.thz_in, self.vis_in = nn.Linear(c_thz, fusion_dim), nn.Linear(c_vis, fusion_dim)
        self.fusion = DualCrossAttention(fusion_dim, fusion_heads)
        self.thz_out = nn.Linear(fusion_dim, c_thz)
        self.heads = ThzHeads(2 * fusion_dim, cfg)
        self.decoder = MoEUNetDecoder(self.thz_encoder.channels, cfg.num_postures, cfg.in_chans,
                                      cfg.decoder_width, cfg.gating, cfg.gate_temperature, cfg.residual)

    def forward(self, thz: torch.Tensor, vis: torch.Tensor, posture: torch.Tensor | None = None,
                reconstruct: bool = True) -> dict[str, torch.Tensor]:
        ft, fv = self.thz_encoder(thz), self.vis_encoder(vis)
        t, v = ft[-1], fv[-1]
        B, _, H, W = t.shape
        ta = self.thz_in(t.flatten(2).transpose(1, 2))                   # [B, HW, D]
        va = self.vis_in(v.flatten(2).transpose(1, 2))
        ta, va = self.fusion(ta, va)
        # thz_pooled: what the THz encoder alone extracts (no visible information: a target a THz-only
        # network of the same encoder can reach)
        out = {**self.heads(torch.cat([ta.mean(1), va.mean(1)], 1)), "thz_pooled": t.mean((2, 3))}
        if reconstruct:
            fused = t + self.thz_out(ta).transpose(1, 2).reshape(B, -1, H, W)
            out["reconstruction"], out["gate"] = self.decoder([*ft[:-1], fused], tuple(thz.shape[-2:]),
                                                              out["posture_logits"], posture,
                                                              thz if self.cfg.residual else None)
        return out
