"""timm backbones with explicit, never-silent pretrained weights.

``build_backbone(name, pretrained)`` returns ``(module, feature_dim)`` where the
module maps images ``[B, C, H, W]`` to pooled features ``[B, feature_dim]``
(``timm.create_model(..., num_classes=0)``).

``pretrained`` is
- ``False`` / ``""`` / ``None``: random initialisation;
- ``True``: timm's own pretrained weights (Hugging Face hub or the local HF cache;
  offline without a cache this raises, it never falls back);
- a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file: loaded with
  :func:`load_backbone_weights` (bare state dict or ``{"state_dict"|"model"|
  "module"|"backbone": ...}``; ``module.`` / ``backbone.`` / ``model.`` prefixes
  are detected; the classifier keys are dropped; a ViT position embedding is
  resampled to the model's grid by timm's own checkpoint filter).

If weights were asked for and cannot be loaded (missing file, unreadable
file, nothing matching, a missing parameter, a shape mismatch) a
:class:`WeightsError` is raised. Unexpected keys (other heads, a teacher, ...)
are reported through logging and in the returned :class:`LoadReport`.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub look-ups unless the user enabled them

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

log = logging.getLogger("biomtl.models")

__all__ = ["build_backbone", "load_backbone_weights", "read_state_dict", "LoadReport", "WeightsError"]

_CONTAINER_KEYS = ("state_dict", "model", "module", "backbone", "model_state", "model_state_dict", "net")
_PREFIXES = ("", "module.", "model.", "backbone.", "module.backbone.", "model.backbone.", "encoder.",
             "module.model.", "_orig_mod.", "module._orig_mod.")


class WeightsError(RuntimeError):
    """Requested pretrained weights could not be loaded (never a silent fallback)."""


@dataclass
class LoadReport:
    path: str
    prefix: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped_classifier: list[str] = field(default_factory=list)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict (no model needed)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"pretrained weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, pickled code (weights_only refuses)
        raise WeightsError(f"cannot read weights file {p}: {type(exc).__name__}: {exc}") from exc
    # Unwrap {"state_dict": ...} / {"model": ...} containers (possibly nested once more).
    for _ in range(2):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {p} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"weights file {p} holds no tensors (keys: {list(obj)[:8]})")
    return tensors


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _classifier_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    names = [names] if isinstance(names, str) else list(names)
    # Common extra heads that a backbone built with num_classes=0 never has.
    names += ["head", "head_dist", "fc", "classifier", "head.fc"]
    return sorted({n + "." for n in names})


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a local weights file into a timm model built with ``num_classes=0``.

    Raises :class:`WeightsError` when nothing matches, when a parameter/buffer
    of the model is missing from the file, or on a shape mismatch. Keys left
    over after prefix stripping and classifier removal (e.g. ``layer1.2.*`` of
    a ResNet-34 file loaded into a ResNet-18) raise too when ``strict``;
    otherwise they are only logged.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    own_keys = set(own)

    # Pick the key prefix that matches most of the model (DDP, recipe wrappers).
    best_prefix, best_hits = "", -1
    for prefix in _PREFIXES:
        hits = sum(1 for k in sd if k.startswith(prefix) and k[len(prefix):] in own_keys)
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits
    if best_prefix:
        sd = {k[len(best_prefix):]: v for k, v in sd.items() if k.startswith(best_prefix)}

    # timm's own checkpoint filter (ViT: pos-embed / patch-embed resampling,
    # CLIP/DINOv2 key conversion); it is what timm applies to hub weights.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as exc:
            raise WeightsError(f"{path}: timm's checkpoint filter for {type(model).__name__} failed: "
                               f"{type(exc).__name__}: {exc}") from exc

    cls_prefixes = _classifier_prefixes(model)
    dropped = [k for k in sd if k not in own_keys and any(k.startswith(p) for p in cls_prefixes)]
    for k in dropped:
        del sd[k]

    matched = [k for k in sd if k in own_keys]
    if not matched:
        raise WeightsError(
            f"{path}: none of its {len(sd)} tensors match the model {type(model).__name__} "
            f"(file keys e.g. {list(sd)[:4]}, model keys e.g. {list(own)[:4]})")
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in matched if sd[k].shape != own[k].shape]
    if mismatched:
        raise WeightsError(f"{path}: shape mismatch for {len(mismatched)} tensors: " + "; ".join(mismatched[:5]))
    missing = sorted(k for k in own_keys - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - own_keys)
    if missing:
        raise WeightsError(f"{path}: {len(missing)} model tensors missing from the file "
                           f"(e.g. {missing[:6]}); refusing a partial load")
    if unexpected and strict:
        raise WeightsError(f"{path}: {len(unexpected)} tensors in the file have no place in the model "
                           f"(e.g. {unexpected[:6]}); wrong architecture? (strict=False to ignore them)")
    model.load_state_dict({k: sd[k] for k in matched}, strict=False)
    report = LoadReport(str(path), best_prefix, len(matched), missing, unexpected, dropped)
    log.info("loaded %d tensors from %s (prefix %r, %d classifier keys dropped)", len(matched), path,
             best_prefix, len(dropped))
    if unexpected:
        log.warning("%s: %d unexpected keys ignored (e.g. %s)", path, len(unexpected), unexpected[:6])
    return report


def _create(name: str, pretrained: bool, img_size: int | None, in_chans: int, **kw: Any) -> nn.Module:
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans,
                                     img_size=img_size, **kw)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            # CNNs take any input size and have no img_size argument.
    return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kw)


def build_backbone(name: str, pretrained: bool | str | os.PathLike | None = False, img_size: int | None = None,
                   in_chans: int = 3, strict: bool = True, **timm_kwargs: Any) -> tuple[nn.Module, int]:
    """A timm model without classifier, and the size of its pooled features.

    ``img_size`` is passed to models that take it (ViTs) and ignored by CNNs.
    ``strict`` (local files only): refuse files with tensors the model has no
    place for. Missing tensors and shape mismatches always raise.
    """
    if isinstance(pretrained, (str, os.PathLike)) and str(pretrained) not in ("", "False", "false"):
        if str(pretrained) in ("True", "true"):
            pretrained = True
        else:
            model = _create(name, False, img_size, in_chans, **timm_kwargs)
            report = load_backbone_weights(model, pretrained, strict=strict)
            model.weights_report = report  # type: ignore[attr-defined]
            return model, _feature_dim(model)
    if pretrained is True:
        try:
            model = _create(name, True, img_size, in_chans, **timm_kwargs)
        except Exception as exc:
            raise WeightsError(
                f"timm pretrained weights for {name!r} could not be loaded ({type(exc).__name__}: {exc}). "
                "Offline? Pass a local weights file path instead of pretrained=True.") from exc
        return model, _feature_dim(model)
    model = _create(name, False, img_size, in_chans, **timm_kwargs)
    return model, _feature_dim(model)


def _feature_dim(model: nn.Module) -> int:
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not dim:
        raise ValueError(f"cannot tell the feature size of {type(model).__name__}")
    return int(dim)
