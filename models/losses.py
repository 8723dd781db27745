"""Losses the recipes share.

- :func:`masked_cross_entropy`: CE that ignores label ``-1`` and out-of-range
  labels and returns a graph-connected 0 when no row is labelled (keeps DDP's
  "every parameter used" and never gives NaN).
- :func:`weighted_sum`: ``sum_i w_i * L_i`` over named terms.
- :class:`DynamicLossWeights`: learned weighting ``0.5 * sum_i (exp(-w_i) L_i + w_i)``
  (Kendall et al. 2018, as used by DCAL); the ``w_i`` are parameters of the module.
- :class:`FocalLoss` (alpha, gamma, per-class weights).
- :class:`MagFaceLoss` (on :class:`models.heads.MagLinear`) and :func:`magface_lambda_g_bound`
  (the paper's smallest admissible regulariser weight).
- Metric losses for verification with twins: :class:`TwinAwareTripletLoss`
  (batch-hard triplet plus a term whose negatives are the co-twins) and
  :class:`SupConLoss` (supervised contrastive with up-weighted co-twin negatives).
- Reconstruction (THz): :func:`charbonnier_loss`, :func:`ssim_index` (pytorch-msssim
  SSIM / MS-SSIM, window sized to the image), :func:`psnr`, LPIPS from the ``lpips``
  package with its trunk read from a local file (:func:`build_lpips`; never a random
  trunk), and :class:`ReconstructionLoss` combining them.
- Distillation: :func:`kd_logit_loss` (KL at temperature T, scaled by T^2),
  :func:`feature_distill_loss` (embedding directions), :func:`relation_distill_loss`
  (the batch's cosine-similarity matrix) and :func:`similarity_kd_loss` (each row's
  softmax over its similarities to the other rows, at temperature T).

The losses are written in tensor ops, without a Python branch on tensor values
(``bool(t.any())``, boolean-mask indexing; a mean over a data-dependent subset is
:func:`masked_mean_of_sum`): a training step compiles with
``torch.compile(fullgraph=True)`` into one graph and never waits for the device
(``tests/recipes/test_compile_steps.py``).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import magface_target

__all__ = ["masked_cross_entropy", "masked_mean_of_sum", "weighted_sum", "DynamicLossWeights", "FocalLoss",
           "TwinAwareTripletLoss", "SupConLoss", "co_twin_mask", "charbonnier_loss", "ssim_window", "ssim_index",
           "psnr", "LpipsWeightsMissing", "lpips_weights_file", "require_lpips_weights", "build_lpips",
           "lpips_distance", "ReconstructionLoss", "kd_logit_loss", "feature_distill_loss",
           "relation_distill_loss", "similarity_kd_loss",
           "MagFaceLoss", "magface_lambda_g_bound"]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over rows whose label is in ``[0, C)``; a graph-connected 0 if none.

    Negative labels are "unlabelled" and labels ``>= C`` (identities the classifier never
    saw, at evaluation) are skipped. Tensor ops only, no branch on label values: the
    training step compiles to one graph and never waits for the device. Whether a
    training label fits its classifier is checked on the data path
    (:func:`recipes.labels.class_label`), once per sample, not here per step.
    """
    labels = labels.long()
    C = logits.shape[1]
    valid = (labels >= 0) & (labels < C)
    rows = F.cross_entropy(logits.float(), torch.where(valid, labels, -100), weight=weight, ignore_index=-100,
                           label_smoothing=label_smoothing, reduction="none")
    # F.cross_entropy's "mean": the sum over labelled rows / their summed class weights
    count = valid.float() if weight is None else weight.float()[labels.clamp(0, C - 1)] * valid
    return masked_mean_of_sum(rows.sum(), count.sum())


def masked_mean_of_sum(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``, or ``total`` (0 when nothing was summed, still graph-connected)
    when ``count`` is 0: a mean over a data-dependent subset without a branch."""
    return total / torch.where(count > 0, count, torch.ones_like(count))


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """``sum(weights.get(name, 1) * term)``; a weight of 0 drops the term."""
    weights = weights or {}
    total = None
    for name, value in terms.items():
        w = float(weights.get(name, 1.0))
        if w == 0.0:
            continue
        total = value * w if total is None else total + value * w
    if total is None:
        raise ValueError("weighted_sum: no term with a non-zero weight")
    return total


class DynamicLossWeights(nn.Module):
    """``0.5 * sum_i (exp(-w_i) * L_i + w_i)`` with one learnable ``w_i`` per name.

    ``w_i`` plays the role of a log-variance (initialised to 0, i.e. weight 1).
    Terms not named at construction raise; names may be missing from a call
    (they contribute nothing).
    """

    def __init__(self, names: Iterable[str], init: float = 0.0):
        super().__init__()
        self.names = list(names)
        if not self.names:
            raise ValueError("DynamicLossWeights needs at least one term name")
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init)))

    def forward(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = set(terms) - set(self.names)
        if unknown:
            raise KeyError(f"DynamicLossWeights: unknown terms {sorted(unknown)} (known: {self.names})")
        total = self.log_vars.sum() * 0.0
        for i, name in enumerate(self.names):
            if name in terms:
                w = self.log_vars[i]
                total = total + torch.exp(-w) * terms[name].float() + w
        return 0.5 * total

    def weights(self) -> dict[str, float]:
        """Current effective weights ``0.5 * exp(-w_i)`` (for logging)."""
        with torch.no_grad():
            return {n: float(0.5 * torch.exp(-w)) for n, w in zip(self.names, self.log_vars)}


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-alpha (1-p_y)^gamma log p_y`` (Lin et al. 2017);
    labels outside ``[0, C)`` ignored. ``weight`` (per class) gives the weighted
    mean over rows, as ``F.cross_entropy(weight=...)`` does; ``alpha`` scales the
    whole loss (with ``gamma=0``, ``alpha=1`` it is the cross-entropy)."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, alpha: float = 1.0):
        super().__init__()
        self.gamma = gamma
        self.alpha = float(alpha)
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        C = logits.shape[1]
        valid = (labels >= 0) & (labels < C)
        y = labels.clamp(0, C - 1)
        logp_y = F.log_softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
        loss = -self.alpha * ((1 - logp_y.exp()) ** self.gamma) * logp_y
        w = valid.float() if self.weight is None else self.weight[y] * valid
        return masked_mean_of_sum((loss * w).sum(), w.sum())


def co_twin_mask(identity: torch.Tensor, twin: torch.Tensor | None) -> torch.Tensor:
    """``[B, B]`` bool: ``mask[i, j]`` when sample ``j`` is of the co-twin of ``i``'s identity.

    ``twin[i]`` is the identity id of ``i``'s co-twin, or ``-1``.
    """
    B = identity.shape[0]
    if twin is None:
        return torch.zeros(B, B, dtype=torch.bool, device=identity.device)
    twin = twin.long()
    return (identity.long()[None, :] == twin[:, None]) & (twin[:, None] >= 0)


class TwinAwareTripletLoss(nn.Module):
    """Batch-hard triplet loss on cosine distance, plus a co-twin term.

    For each anchor with a positive in the batch: ``d_ap`` = farthest positive,
    ``d_an`` = closest sample of another identity; loss ``relu(d_ap - d_an + margin)``.
    The twin term does the same with the closest *co-twin* sample as negative
    (anchors whose co-twin is in the batch), weighted by ``twin_weight``.
    Rows with identity ``< 0`` are ignored. Returns a graph-connected 0 when no
    anchor qualifies.
    """

    def __init__(self, margin: float = 0.3, twin_margin: float | None = None, twin_weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.twin_margin = margin if twin_margin is None else twin_margin
        self.twin_weight = twin_weight

    def forward(self, emb: torch.Tensor, identity: torch.Tensor, twin: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.normalize(emb.float(), dim=1)
        dist = 1.0 - emb @ emb.t()
        identity = identity.long()
        B = emb.shape[0]
        labelled = identity >= 0
        eye = torch.eye(B, dtype=torch.bool, device=emb.device)
        pair_ok = labelled[:, None] & labelled[None, :]
        pos = (identity[:, None] == identity[None, :]) & ~eye & pair_ok
        neg = (identity[:, None] != identity[None, :]) & pair_ok
        has_pos = pos.any(1) & neg.any(1)
        big = 4.0  # cosine distance is in [0, 2]
        d_ap = torch.where(pos, dist, torch.full_like(dist, -big)).max(1).values
        d_an = torch.where(neg, dist, torch.full_like(dist, big)).min(1).values
        hinge = F.relu(d_ap - d_an + self.margin) * has_pos
        loss = masked_mean_of_sum(hinge.sum(), has_pos.sum())  # 0, connected to emb, when no anchor qualifies
        if twin is not None and self.twin_weight > 0:
            tw = co_twin_mask(identity, twin) & pair_ok
            has_twin = tw.any(1) & pos.any(1)
            d_at = torch.where(tw, dist, torch.full_like(dist, big)).min(1).values
            twin_hinge = F.relu(d_ap - d_at + self.twin_margin) * has_twin
            loss = loss + self.twin_weight * masked_mean_of_sum(twin_hinge.sum(), has_twin.sum())
        return loss


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on L2-normalised embeddings.

    Co-twin samples are negatives whose ``exp(sim / T)`` is multiplied by
    ``twin_negative_weight`` in the denominator (>1 makes them harder).
    Anchors without a positive are skipped; rows with identity ``< 0`` ignored.
    """

    def __init__(self, temperature: float = 0.1, twin_negative_weight: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.twin_negative_weight = twin_negative_weight

    def forward(self, emb: torch.Tensor, identity: torch.Tensor, twin: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.normalize(emb.float(), dim=1)
        identity = identity.long()
        B = emb.shape[0]
        labelled = identity >= 0
        eye = torch.eye(B, dtype=torch.bool, device=emb.device)
        others = ~eye & labelled[:, None] & labelled[None, :]
        pos = (identity[:, None] == identity[None, :]) & others
        anchors = pos.any(1)
        logits = emb @ emb.t() / self.temperature
        logits = logits - logits.detach().max(1, keepdim=True).values
        log_w = torch.zeros_like(logits)
        if twin is not None and self.twin_negative_weight != 1.0:
            tw = co_twin_mask(identity, twin)
            log_w = log_w.masked_fill(tw, math.log(self.twin_negative_weight))
        # the lowest float, not -inf: a row with no other labelled sample (not an anchor)
        # then stays finite, and so does its zero gradient through logsumexp
        denom_terms = (logits + log_w).masked_fill(~others, torch.finfo(logits.dtype).min)
        log_denom = torch.logsumexp(denom_terms, dim=1, keepdim=True)
        log_prob = logits - log_denom
        mean_log_pos = (log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)
        # anchors without a positive (or no anchor at all: 0, connected to emb) count for nothing
        return -masked_mean_of_sum((mean_log_pos * anchors).sum(), anchors.sum())


# ----------------------------------------------------------------------------- reconstruction and distillation
# (THz recipes; :mod:`recipes.thz`, :mod:`recipes.thz_distill`)

def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``mean(sqrt((pred - target)^2 + eps^2))``: a smooth L1 (Charbonnier penalty)."""
    d = pred.float() - target.float()
    return torch.sqrt(d * d + eps * eps).mean()


def ssim_window(height: int, width: int, multiscale: bool = False, max_win: int = 11) -> int:
    """The largest odd Gaussian window (at most ``max_win``) that fits the image:
    SSIM filters with it in "valid" mode, so it must not exceed the short side;
    MS-SSIM filters 4 times halved images and pytorch-msssim requires
    ``short side > (win - 1) * 16``. Raises ``ValueError`` when no window >= 3 fits."""
    side = min(int(height), int(width))
    win = max_win if max_win % 2 else max_win - 1
    while win >= 3 and (side <= (win - 1) * 16 if multiscale else side < win):
        win -= 2
    if win < 3:
        need = "larger than 32 px (MS-SSIM halves the image 4 times)" if multiscale else "at least 3 px"
        raise ValueError(f"{'MS-SSIM' if multiscale else 'SSIM'} needs images {need}; got {height}x{width}")
    return win


def ssim_index(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, multiscale: bool = False,
               win_size: int | None = None, per_sample: bool = False) -> torch.Tensor:
    """SSIM (or MS-SSIM) of ``[B, C, H, W]`` images from ``pytorch-msssim``, with ``data_range``
    set and the window sized to the image (:func:`ssim_window`). Computed in float32, or in
    float64 when an input is float64. A scalar mean, or ``[B]`` with ``per_sample``."""
    from pytorch_msssim import ms_ssim, ssim

    win = win_size or ssim_window(pred.shape[-2], pred.shape[-1], multiscale)
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    fn = ms_ssim if multiscale else ssim
    return fn(pred.to(dtype), target.to(dtype), data_range=data_range, size_average=not per_sample,
              win=_gauss_window(win, pred.shape[1], dtype))


def _gauss_window(size: int, channels: int, dtype: torch.dtype, sigma: float = 1.5) -> torch.Tensor:
    """pytorch-msssim's 1-D Gaussian window for 2-D images (``[C, 1, 1, size]``), built in ``dtype``: its own is
    built in float32, whose weights do not sum to 1 in float64, and on flat regions
    sigma^2 = E[x^2] - mu^2 then carries ``1 - sum(w)`` instead of cancelling."""
    g = torch.exp(-((torch.arange(size, dtype=dtype) - size // 2) ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).reshape(1, 1, 1, size).repeat(channels, 1, 1, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB, ``[B]`` (capped at 100 dB for identical images)."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-10))).clamp(max=100.0)


# torchvision weight enums of the LPIPS trunks; the file name is the one torch.hub caches
LPIPS_TRUNKS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class LpipsWeightsMissing(FileNotFoundError):
    """The LPIPS backbone (ImageNet trunk) weights file is absent; one-line message."""


def lpips_weights_file(net: str = "alex", path: str | None = None) -> "Path":
    """Where the LPIPS trunk weights are read from: ``path`` when given, else the
    torchvision cache ``$TORCH_HOME/hub/checkpoints/<torchvision file name>``."""
    from pathlib import Path

    if net not in LPIPS_TRUNKS:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_TRUNKS)}, got {net!r}")
    if path:
        return Path(path).expanduser()
    from torchvision import models

    url = getattr(models, LPIPS_TRUNKS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def require_lpips_weights(net: str = "alex", path: str | None = None) -> "Path":
    """The trunk weights file, or :class:`LpipsWeightsMissing` saying how to provide it."""
    f = lpips_weights_file(net, path)
    if not f.is_file():
        raise LpipsWeightsMissing(
            f"LPIPS needs the ImageNet {net} weights at {f} (torchvision's file; copy it there, "
            "set TORCH_HOME, or give its path) or an LPIPS weight of 0; it never runs with a random backbone")
    return f


def build_lpips(net: str = "alex", weights_path: str | None = None) -> nn.Module:
    """The ``lpips`` package's LPIPS (v0.1 linear layers shipped with the package),
    its trunk loaded from a local file (:func:`require_lpips_weights`), frozen, in
    eval mode. No download: the package is told to build a random trunk, which is
    then overwritten tensor by tensor; a trunk tensor the file lacks raises."""
    import warnings

    import lpips

    f = require_lpips_weights(net, weights_path)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LpipsWeightsMissing(f"LPIPS weights {f} are not a readable state dict "
                                  f"({type(exc).__name__})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
    trunk = model.net.state_dict()
    # lpips slices keep torchvision's layer indices: net.slice<k>.<i>.* == features.<i>.*
    mapped = {}
    for name, value in trunk.items():
        src = "features." + name.split(".", 1)[1]
        if src not in state or tuple(state[src].shape) != tuple(value.shape):
            raise LpipsWeightsMissing(f"LPIPS weights {f}: no {src} of shape {tuple(value.shape)} "
                                      f"(not torchvision's {net} file?)")
        mapped[name] = state[src]
    model.net.load_state_dict(mapped, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lpips_distance(model: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS ``[B]`` of ``[B, C, H, W]`` images in [0, 1] (grey images are
    repeated to RGB; float32, outside autocast). The trunk needs >= 32 px (AlexNet)."""
    def rgb(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]

    dev = pred.device
    with torch.autocast(dev.type, enabled=False):
        return model(rgb(pred), rgb(target), normalize=True).flatten()


class ReconstructionLoss(nn.Module):
    """``w_charb * Charbonnier + w_ssim * (1 - SSIM or MS-SSIM) + w_lpips * LPIPS`` on
    images in ``[0, data_range]``; ``terms()`` gives the three parts unweighted.

    The LPIPS network is built only when its weight is > 0 (its trunk weights must
    then exist locally, see :func:`build_lpips`) and is kept out of this module's
    parameters and state dict: it is a fixed measuring instrument, not part of the
    trained model, so checkpoints stay small and inference never needs it."""

    def __init__(self, charbonnier: float = 1.0, ssim: float = 1.0, lpips: float = 0.0,
                 multiscale: bool = False, data_range: float = 1.0, lpips_net: str = "alex",
                 lpips_weights: str | None = None, eps: float = 1e-3):
        super().__init__()
        self.w = {"charbonnier": float(charbonnier), "ssim": float(ssim), "lpips": float(lpips)}
        self.multiscale, self.data_range, self.eps = multiscale, data_range, eps
        self._lpips = [build_lpips(lpips_net, lpips_weights)] if lpips > 0 else []

    def lpips_model(self, device: torch.device) -> nn.Module | None:
        if not self._lpips:
            return None
        if next(self._lpips[0].parameters()).device != device:
            self._lpips[0] = self._lpips[0].to(device)
        return self._lpips[0]

    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"charbonnier": charbonnier_loss(pred, target, self.eps),
               "ssim": 1.0 - ssim_index(pred, target, self.data_range, self.multiscale)}
        lp = self.lpips_model(pred.device)
        if lp is not None:
            out["lpips"] = lpips_distance(lp, pred / self.data_range, target / self.data_range).mean()
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.terms(pred, target)
        return weighted_sum(terms, self.w), terms


def kd_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Hinton distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batch mean.
    The ``T^2`` keeps its gradients on the scale of a hard-label loss."""
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the L2-normalised embeddings (teacher detached):
    ``2 - 2 cos`` per row, so it matches directions, not norms."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    return ((s - t) ** 2).sum(1).mean()


def relation_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distillation (Tung & Mori, ICCV 2019), on embeddings: the
    mean squared difference of the two batches' cosine-similarity matrices (teacher
    detached). It transfers which samples the teacher finds alike, not where its
    embedding points, so the student keeps its own embedding space (and widths may differ)."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    return ((s @ s.T - t @ t.T) ** 2).mean()


def similarity_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Distillation of the verification similarities: each row's distribution over the
    *other* rows of the batch, ``softmax_j(cos(x_i, x_j) / T)``, of the student matched
    to the teacher's (teacher detached): ``mean_i KL(p_t,i || p_s,i)``. Unlike
    :func:`relation_distill_loss` it weighs each pair by how close the teacher finds it
    (the neighbours a verifier ranks first), and is blind to a shift of every
    similarity of a row by the same amount. No ``T^2`` factor: with the
    SupCon-like ``T < 1`` it would shrink the term instead of rescaling it."""
    n = student.shape[0]
    if n < 3:  # fewer than two other rows: no distribution to match
        return student.float().sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    T = float(temperature)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=1)
        return F.log_softmax((x @ x.T)[off].view(n, n - 1) / T, dim=1)

    return F.kl_div(log_p(student), log_p(teacher.detach()), reduction="batchmean", log_target=True)


def magface_lambda_g_bound(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """The smallest regulariser weight for which MagFace's theorem holds (Meng et
    al. 2021, Sec. 3.3 and supplementary): ``lambda_g >= s K / (-g'(l_a))`` with
    ``K`` the largest slope of the margin ``m(a)`` (linear here: ``(u_m - l_m) /
    (u_a - l_a)``) and ``g'(a) = -1/a^2 + 1/u_a^2``, i.e.
    ``s K l_a^2 u_a^2 / (u_a^2 - l_a^2)`` (22.6 for the paper's s=64, [10, 110],
    [0.45, 0.8]; its code uses 35)."""
    k = (u_m - l_m) / (u_a - l_a)
    return s * k * l_a ** 2 * u_a ** 2 / (u_a ** 2 - l_a ** 2)


class MagFaceLoss(nn.Module):
    """MagFace loss on :class:`models.heads.MagLinear` outputs ``(cos, a)``.

    - margin ``m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m`` (linear, increasing);
    - target logit ``s * cos(theta_y + m(a))``, with ArcFace's fallback
      ``s * (cos(theta_y) - m sin m)`` past ``theta_y > pi - m`` (the official code);
    - regulariser ``g(a) = 1/a + a/u_a^2`` (strictly convex, minimum at ``a = u_a``);
    - ``loss = CE(logits, y; weight) + lambda_g * mean(g(a))`` over labelled rows.

    :meth:`forward` returns ``(loss, parts)`` with ``parts = {"ce", "g"}``; labels
    ``-1`` are ignored (graph-connected 0 when none is labelled). ``lambda_g``
    below :func:`magface_lambda_g_bound` breaks the paper's convergence
    guarantee: :meth:`check` says so (the recipe logs it as a warning)."""

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0, weight: torch.Tensor | None = None):
        super().__init__()
        if not 0 < l_a < u_a or not 0 <= l_m <= u_m or s <= 0 or lambda_g < 0:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, 0 <= l_m <= u_m, s > 0, lambda_g >= 0 "
                             f"(got l_a={l_a}, u_a={u_a}, l_m={l_m}, u_m={u_m}, s={s}, lambda_g={lambda_g})")
        self.s, self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = s, l_a, u_a, l_m, u_m, lambda_g
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def check(self) -> str | None:
        """Why this configuration breaks MagFace's guarantee, or None."""
        bound = magface_lambda_g_bound(self.s, self.l_a, self.u_a, self.l_m, self.u_m)
        if self.lambda_g < bound:
            return (f"MagFace lambda_g={self.lambda_g:g} is below the paper's bound s*K*l_a^2*u_a^2/(u_a^2-l_a^2)="
                    f"{bound:.3g} (s={self.s:g}, a in [{self.l_a:g}, {self.u_a:g}], m in [{self.l_m:g}, "
                    f"{self.u_m:g}]): feature magnitudes may not converge to a unique optimum")
        return None

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, a: torch.Tensor) -> torch.Tensor:
        return 1.0 / a + a / self.u_a ** 2

    def logits(self, cos: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``s * cos`` with the magnitude-aware margin on each labelled row's target."""
        labels = labels.long()
        C = cos.shape[1]
        valid = (labels >= 0) & (labels < C)
        idx = labels.clamp(0, C - 1).unsqueeze(1)
        cos_y = cos.gather(1, idx)
        phi = magface_target(cos_y, self.margin(a).unsqueeze(1))
        new_y = torch.where(valid.unsqueeze(1), phi, cos_y)
        return cos.scatter(1, idx, new_y) * self.s

    def forward(self, cos: torch.Tensor, a: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = labels.long()
        C = cos.shape[1]
        # labels outside [0, C) count for nothing (the data path refuses them in training:
        # recipes.labels.class_label); tensor ops only, so the step compiles to one graph
        valid = (labels >= 0) & (labels < C)
        logits = self.logits(cos.float(), a.float(), labels)
        ce = masked_cross_entropy(logits, torch.where(valid, labels, -1), weight=self.weight)
        g = masked_mean_of_sum((self.regularizer(a.float()) * valid).sum(), valid.sum())
        return ce + self.lambda_g * g, {"ce": ce, "g": g}
