"""Mixed precision in one place: autocast context and (for fp16) a GradScaler."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("biomtl")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math runs in hardware; elsewhere CPU autocast emulates it,
    which is many times slower than fp32 (seen: ~10x on an AVX2-only EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` is bf16 where the hardware does bf16, else fp32."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device):
        log.warning("train.precision=bf16 on a %s without native bf16: it is emulated and slow "
                    "(train.precision=auto picks fp32 here)", device.type.upper())
    return requested


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32, already resolved
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling: bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")
