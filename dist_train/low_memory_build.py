"""Building a recipe's model with about 1/world of its parameters per rank
(``train.low_memory_build``), for ZeRO-3 and FSDP2, with the initial weights
of the ordinary build bit for bit.

Why not ``deepspeed.zero.Init`` or a meta-device build: both change the
initial weights. Under ``zero.Init`` a parent's initialisers that run after
its children are built (timm's ``init_weights`` through ``named_apply``,
``trunc_normal_`` on child layers) see empty partitions, skip their random
draws and shift the RNG stream for everything after; on GPUs it also draws on
the CUDA generator. A meta build draws nothing. So the recipe's
``build_model()`` runs exactly as in the ordinary build (CPU, default
generator, same order of draws), and only where the parameters live changes:

- a parameter is *whole* while its module is being built; whenever a module
  is attached to its parent (a module registration hook: its constructor has
  returned) the whole parameters nobody else references are cut to this
  rank's flat slice (DeepSpeed's
  layout: ``ceil(numel / world)`` elements, the last slice zero-padded) and
  the parameter keeps a one-element placeholder expanded to its shape (shape,
  dtype and device stay right; an in-place write to it outside this build fails
  instead of being lost);
- any torch call that reads or writes a sliced parameter (a later
  initialiser, ``load_state_dict``, ``.data``...) first all-gathers it whole
  (a :class:`~torch.overrides.TorchFunctionMode` sees every call), so it sees
  and changes the real values; slicing and gathering are lossless, so *when*
  a parameter is sliced changes memory and collectives, never values;
- a parameter is only sliced while no other tensor shares its storage (a
  ``.data`` or view still held could be written later), and the decision is
  taken by all ranks together (one small all-reduce), so every rank gathers
  the same parameters at the same calls: all ranks run the same build;
- parameters that differ between ranks (a row-sharded Partial FC head) are
  left whole.

The strategy then takes each parameter's whole value once, one at a time
(:meth:`Partitions.full`, collective), into its own layout (FSDP2's dim-0
shards, ZeRO-3's partitions). Peak memory while building: the module being
built plus the slices of the rest (plus what a recipe deliberately keeps
whole, and buffers, which are never sliced).
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger("biomtl")

_T = torch.Tensor
# Calls that read only a parameter's metadata, which the placeholder holds right: no gather.
_METADATA = {_T.shape.__get__, _T.size, _T.dim, _T.ndim.__get__, _T.numel, _T.nelement, _T.dtype.__get__,
             _T.device.__get__, _T.is_floating_point, _T.is_complex, _T.layout.__get__, _T.requires_grad.__get__,
             _T.requires_grad.__set__, _T.requires_grad_, _T.is_leaf.__get__, _T.grad.__get__, _T.is_cuda.__get__,
             _T.is_meta.__get__, _T.element_size, _T.__len__}


# (all_gather_into_tensor is deprecated in torch 2.14 under this name)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _use_count(t: torch.Tensor) -> int:
    """References to ``t``'s storage (the tensor itself, its aliases, plus the one this call makes)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ATTR = "_biomtl_slice_seq"  # on a tracked parameter: its number in the build (the same on every rank)
_GONE = 2**62  # neutral under MIN: a parameter collected on this rank


@dataclass
class _Param:
    ref: Any  # weakref.ref to the Parameter
    local: torch.Tensor | None = None  # this rank's flat slice; None while the parameter is whole


class BuildMismatch(RuntimeError):
    """The ranks did not build the same model (a rank-dependent build)."""


class Partitions(TorchFunctionMode):
    """The build context (see the module docstring) and, afterwards, the record of
    which parameters are sliced. Every rank enters it around the same build."""

    def __init__(self, rank: int, world: int, comm_device: torch.device, group: Any = None):
        super().__init__()
        self.rank, self.world, self.group = rank, world, group
        # NCCL collectives need CUDA tensors; the build itself stays on the CPU
        self.comm_device = comm_device
        # Parameters are numbered in the order they are first seen, which is the same on
        # every rank (ids are not: a collected parameter's id is reused when the garbage
        # collector, which runs at its own moments on each rank, lets it go).
        self._params: dict[int, _Param] = {}
        self._next = 0
        self._whole: dict[int, None] = {}  # numbers of tracked parameters that are whole now (ordered)
        self._hooks: list[Any] = []
        self._single = _use_count(torch.empty(1))  # the count of a storage nothing else shares
        self.gathers = 0

    # -- the build context -------------------------------------------------
    def __enter__(self) -> "Partitions":
        from torch.nn.modules import module as module_mod

        self._hooks = [module_mod.register_module_parameter_registration_hook(self._on_parameter),
                       module_mod.register_module_module_registration_hook(self._on_module)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def finish(self, model: nn.Module) -> None:
        """After the build: track parameters no hook saw (copied modules) and slice
        everything nobody else references (collective)."""
        with torch._C.DisableTorchFunction():
            for p in model.parameters():
                self._track(p)
            self._settle(())

    def _on_parameter(self, module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            with torch._C.DisableTorchFunction():
                self._track(param)

    def _on_module(self, module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        # a child attached to its parent has been built: a moment to slice what is done with
        with torch._C.DisableTorchFunction():
            self._settle(())

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _METADATA:
            touched = [k for k in (self._seq(t) for t in tree_flatten((args, kwargs))[0]) if k is not None]
            sliced = [k for k in dict.fromkeys(touched) if self._params[k].local is not None]
            if sliced:  # (this handler runs with the mode off: our own calls do not come back here)
                self._settle(set(touched))  # before gathering, so memory stays low
                for k in sliced:
                    self._gather(k)
        return func(*args, **kwargs)

    # -- slicing and gathering ---------------------------------------------
    def _seq(self, t: Any) -> int | None:
        """The number of a tracked parameter (None: not one)."""
        if not isinstance(t, nn.Parameter):
            return None
        k = getattr(t, _ATTR, None)
        # (a copied module's parameters carry the number of the original)
        return k if k is not None and k in self._params and self._params[k].ref() is t else None

    def _track(self, param: nn.Parameter) -> None:
        if self._seq(param) is None:
            k = self._next
            self._next += 1
            setattr(param, _ATTR, k)
            record = _Param(None)
            record.ref = weakref.ref(param, lambda _: setattr(record, "local", None))  # a dropped one frees its slice
            self._params[k] = record
            self._whole[k] = None

    def _settle(self, keep: set[int]) -> None:
        """Slice the whole parameters (but ``keep``) that no other tensor shares on any
        rank; forget collected ones. One all-reduce decides for every rank at once."""
        candidates = [k for k in self._whole if k not in keep]
        if not candidates:
            return
        from models.partial_fc import row_shard_of

        rows = []
        for k in candidates:
            p = self._params[k].ref()
            if p is None:  # collected here (maybe not yet on another rank)
                rows.append((1, _GONE, _GONE, k, -k))
                continue
            free = _use_count(p) <= self._single and row_shard_of(p) is None
            rows.append((1 if free else 0, p.numel(), -p.numel(), k, -k))
        flags = torch.tensor(rows, dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        for k, (free, lo, neg_hi, first, neg_last) in zip(candidates, flags.cpu().tolist()):
            if first != -neg_last:
                raise BuildMismatch(f"low-memory build: the ranks built different models (parameter {k} here, "
                                    f"{first}..{-neg_last} across ranks); build the model the same way on every rank")
            if not free:
                continue  # held elsewhere on some rank: stays whole for now
            del self._whole[k]
            p = self._params[k].ref()
            if p is None:
                del self._params[k]
            elif lo == -neg_hi and lo > 0:  # the same size on every rank (a row-sharded head is not)
                self._slice(p, self._params[k])

    def _slice(self, p: nn.Parameter, record: _Param) -> None:
        n = math.ceil(p.numel() / self.world)
        flat = p.data.reshape(-1)
        local = torch.zeros(n, dtype=p.dtype)
        part = flat[self.rank * n:(self.rank + 1) * n]
        local[:part.numel()] = part
        record.local = local
        p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)  # shape right, one element stored

    def _gather(self, k: int) -> None:
        record = self._params[k]
        p = record.ref()
        p.data = self._whole_value(p, record)
        record.local = None
        self._whole[k] = None
        self.gathers += 1

    def _whole_value(self, p: nn.Parameter, record: _Param) -> torch.Tensor:
        k = getattr(p, _ATTR)
        check = torch.tensor([k, -k], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(check, op=dist.ReduceOp.MIN, group=self.group)  # every rank gathers this one
        if int(check[0]) != -int(check[1]):
            raise BuildMismatch(f"low-memory build: the ranks gather different parameters ({k} here); build the "
                                "model the same way on every rank")
        local = record.local.to(self.comm_device)
        out = torch.empty(local.numel() * self.world, dtype=local.dtype, device=self.comm_device)
        _all_gather(out, local, group=self.group)
        # (a copy: gloo keeps a reference to its output buffer, a view of it would never look unshared)
        return out[:p.numel()].view(p.shape).to("cpu", copy=out.device.type == "cpu")

    # -- for the strategies ------------------------------------------------
    def is_sliced(self, param: torch.Tensor) -> bool:
        k = self._seq(param)
        return k is not None and self._params[k].local is not None

    def full(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s whole value (collective when it is sliced: every rank asks for the
        same parameters in the same order), on the CPU. Its slice is kept."""
        if not self.is_sliced(param):
            return param.detach()
        with torch._C.DisableTorchFunction():
            return self._whole_value(param, self._params[self._seq(param)])

    def release(self, param: torch.Tensor) -> None:
        """Forget ``param``'s slice (the strategy holds its value now)."""
        k = self._seq(param)
        if k is not None:
            self._params[k].local = None

    def sliced_bytes(self) -> int:
        return sum(r.local.numel() * r.local.element_size() for r in self._params.values() if r.local is not None)


def zero_stage(ds_json: Mapping[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 when it has none)."""
    zero = (ds_json or {}).get("zero_optimization")
    return int(zero.get("stage", 0) or 0) if isinstance(zero, Mapping) else 0


def wanted(mode: str, strategy: str, ds_json: Mapping[str, Any] | None, world: int) -> bool:
    """``train.low_memory_build`` for this run: 'auto' and 'always' build sliced under FSDP2
    and ZeRO-3 with more than one rank ('always' with another strategy is refused by the
    config checks); 'never' builds the whole model on every rank."""
    sharded = strategy == "fsdp" or (strategy == "deepspeed" and zero_stage(ds_json) == 3)
    return mode != "never" and sharded and world > 1


def build_partitioned(build: Callable[[], nn.Module], rank: int, world: int,
                      comm_device: torch.device) -> tuple[nn.Module, Partitions]:
    """``build()`` (the recipe's ``build_model``) with parameters sliced over the ranks
    as they are built; every rank calls it with the same RNG state."""
    parts = Partitions(rank, world, comm_device)
    with parts:
        model = build()
    parts.finish(model)
    return model, parts


def build_model(build: Callable[[], nn.Module], mode: str, strategy: str, ds_json: Mapping[str, Any] | None,
                rank: int, world: int, device: torch.device) -> tuple[nn.Module, Partitions | None]:
    """What the trainer builds: the recipe's model, sliced over the ranks when
    :func:`wanted` (the strategy then gets the :class:`Partitions`), else whole."""
    if not wanted(mode, strategy, ds_json, world):
        return build(), None
    # NCCL collectives take CUDA tensors; the build itself draws on the CPU as the ordinary one does
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    model, parts = build_partitioned(build, rank, world, comm)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info("model built with its parameters sliced over %d ranks (train.low_memory_build=%s): %.1f of %.1f MiB "
             "on this rank, %d parameters gathered again for initialisers run after their module was built",
             world, mode, parts.sliced_bytes() / 2**20, whole / 2**20, parts.gathers)
    return model, parts


__all__ = ["BuildMismatch", "Partitions", "build_model", "build_partitioned", "wanted", "zero_stage"]
