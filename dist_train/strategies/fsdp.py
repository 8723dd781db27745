"""FSDP2 (``torch.distributed.fsdp.fully_shard``) behind the same Strategy interface as DDP.

Parameters, gradients and optimizer state are sharded over the ranks (dim 0
of every parameter, as DTensors); a forward/backward all-gathers the
parameters it needs and reduce-scatters the gradients. What the other
strategies do, done the FSDP2 way:

- precision: a ``MixedPrecisionPolicy`` (parameters cast to bf16/fp16 for
  the compute, gradients reduced in fp32; the sharded fp32 parameters are
  the master copy the optimizer steps), plus the same autocast as DDP so
  losses and norms stay fp32; fp16 adds a ``ShardedGradScaler``;
- accumulation: ``set_requires_gradient_sync(boundary)`` (DDP's ``no_sync``);
- clipping: ``clip_grad_norm_`` over the DTensor gradients (the global norm);
- ``train.compile``: ``torch.compile`` of the sharded module;
- checkpoints: a DCP directory (:mod:`dist_train.strategies.dcp_files`),
  resharded on load at another world size; ``export_state_dict`` gathers the
  full fp32 state dict (``biomtl export`` reads the directory without a group).

With ``train.low_memory_build`` (auto) the model arrives built with its
parameters sliced over the ranks (:mod:`dist_train.low_memory_build`): they
are replaced by meta-device ones, sharded, and each shard filled from the
built value one parameter at a time, so no rank holds the whole model.

The whole recipe model is one FSDP unit (``fully_shard`` on the root): a
recipe's own methods (``embed``...) and submodules called outside its forward
need the parameters gathered, which :meth:`FSDPStrategy.gathered` provides.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from dist_train.checkpoint import atomic_save, safe_load
from dist_train.strategies.base import Strategy, StepStats, StrategyOptions, scaled_update
from dist_train.strategies.dcp_files import CheckedReader, weights_only_loads
from dist_train.low_memory_build import Partitions
from recipes.batch import move_batch
from recipes.model_file import (dcp_parts, dcp_state, dcp_trainer_file, lean_checkpoint, read_trainer_state,
                                trainer_checkpoint)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _full(value: torch.Tensor) -> torch.Tensor:
    """A norm computed over DTensor gradients is a DTensor: its global value."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _write_shard(sharded: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` into the sharded parameter (FSDP2
    shards dim 0 as ``torch.chunk`` over the ranks; a rank past the chunks holds none)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(sharded, DTensor):
        sharded.data.copy_(full)
        return
    local = sharded.to_local()
    chunks = torch.chunk(full, sharded.device_mesh.size(), dim=0)
    rank = sharded.device_mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else full[:0]
    with torch.no_grad():
        local.copy_(part.to(local.dtype))


def _params_to_meta(model: nn.Module) -> dict[str, nn.Parameter]:
    """Replace the parameters of a sliced build by meta-device ones of the same shapes
    (``fully_shard`` wants contiguous parameters; on meta it makes shards without
    values); returns the built parameters by name (a tied one keeps one meta twin)."""
    built = dict(model.named_parameters())
    twins: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in twins:
                twin = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
                twin.__dict__.update({k: v for k, v in p.__dict__.items() if not k.startswith("_biomtl_slice")})
                twins[id(p)] = twin
            module._parameters[name] = twins[id(p)]
    return built


def _fill_shards(model: nn.Module, built: dict[str, nn.Parameter], partitions: Partitions,
                 device: torch.device) -> None:
    """Allocate this rank's shards (``to_empty``; the buffers are kept as they were built)
    and copy each built parameter's whole value into them, one parameter at a time."""
    buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    model.to_empty(device=device)
    moved: dict[int, torch.Tensor] = {}  # a buffer two modules share stays one tensor
    for module, name, buffer in buffers:
        if id(buffer) not in moved:
            moved[id(buffer)] = buffer.to(device)
        module._buffers[name] = moved[id(buffer)]
    for name, param in built.items():
        _write_shard(model.get_parameter(name), partitions.full(param))
        partitions.release(param)


def lean_checkpoint_of(ckpt_dir: Path) -> dict[str, Any]:
    """An FSDP (DCP) checkpoint folder as best / top-k keep it: the whole fp32
    weights and the client state in one file of a DDP run's lean layout
    (``model_file.lean_checkpoint``), without the optimizer shards."""
    from dist_train.strategies.dcp_files import full_model_state

    client = read_trainer_state(safe_load(dcp_trainer_file(ckpt_dir))).client
    weights = {k: (v.float() if v.is_floating_point() else v).contiguous()
               for k, v in full_model_state(ckpt_dir).items()}
    return lean_checkpoint(weights, client)


def shard_model(model: nn.Module, device: torch.device, precision_name: str) -> nn.Module:
    """``fully_shard`` the model over all ranks with the policy of ``precision_name``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dist_train.strategies.deepspeed import keep_batchnorm_stats_fp32

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_name)
    if dtype is not None:
        # 16-bit BatchNorm weights with fp32 running statistics: compute those layers in fp32 (as DeepSpeed)
        keep_batchnorm_stats_fp32(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


class FSDPStrategy(Strategy):
    def __init__(self, model: nn.Module, device: torch.device,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 make_scheduler: Callable[[torch.optim.Optimizer], Any], options: StrategyOptions,
                 partitions: Partitions | None = None):
        """``partitions``: the model was built with its parameters sliced over the ranks
        (:mod:`dist_train.low_memory_build`); each is sharded without ever being whole on the device."""
        self.device = device
        self.precision = options.precision
        self.grad_clip = options.grad_clip
        if partitions is None:
            model.to(device)
        else:
            built = _params_to_meta(model)  # so that no copy is whole (buffers: moved by fully_shard)
        self._module = shard_model(model, device, self.precision.name)
        if partitions is not None:
            _fill_shards(self._module, built, partitions, device)
        self.model: nn.Module = torch.compile(self._module) if options.compile else self._module
        self.optimizer = make_optimizer(self._module)  # over the sharded (DTensor) parameters
        self.scheduler = make_scheduler(self.optimizer)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        self.scaler = ShardedGradScaler(device.type, enabled=self.precision.name == "fp16")
        self._skipped_steps = 0

    @property
    def module(self) -> nn.Module:
        return self._module

    def micro_step(self, batch: Mapping[str, Any], loss_scale: float, boundary: bool) -> dict[str, Any]:
        batch = move_batch(batch, self.device)
        self._module.set_requires_gradient_sync(boundary)  # off a boundary: gradients accumulate unsharded
        with self.precision.autocast():
            out = self.model(batch)
        self.scaler.scale(out["loss"].float() * loss_scale).backward()
        return out

    def optimizer_step(self) -> StepStats:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.grad_clip > 0:
            norm = float(_full(torch.nn.utils.clip_grad_norm_(params, self.grad_clip)))
        else:
            norm = float(_full(torch.nn.utils.get_total_norm([p.grad for p in params]))) if params else 0.0
        stats = scaled_update(self.scaler, self.optimizer, self.scheduler, norm)
        self._skipped_steps += stats.skipped
        return stats

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    @torch.no_grad()
    def eval_forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        batch = move_batch(batch, self.device)
        with self.precision.autocast():
            return self._module(batch)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The whole parameters on every rank for the block (collective), so
        a recipe may call the model's methods and submodules directly; under
        the run's autocast, since they are in the policy's compute dtype.
        FSDP frees whole parameters without copying them back: what the block
        changed (an epoch hook re-initialising a head: in place, or a new
        Parameter) is written into this rank's shards afterwards."""
        self._module.unshard()
        self._module.set_reshard_after_forward(False)
        entered = {name: (p, p._version) for name, p in self._module.named_parameters()}
        changed: dict[str, torch.Tensor] = {}
        try:
            with self.precision.autocast():
                yield self._module
            for name, p in self._module.named_parameters():
                before = entered.get(name)
                if before is None or before[0] is not p or before[1] != p._version:
                    changed[name] = p.detach().clone()
        finally:
            self._module.set_reshard_after_forward(True)
            self._module.reshard()
        for name, full in changed.items():
            _write_shard(self._module.get_parameter(name), full)

    # -- checkpoints -------------------------------------------------------
    @property
    def checkpoint_suffix(self) -> str:
        return ""  # a directory

    def lean_checkpoint(self, latest: Path) -> Any:
        # best / top-k: one file of the whole fp32 weights and the client state
        # (no optimizer shards: only latest resumes), read back from the DCP
        # folder just written, on rank 0 (no collective), as DeepSpeed's.
        return lean_checkpoint_of(latest)

    @property
    def lean_suffix(self) -> str:
        return ".pt"

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self._module, self.optimizer)
        _barrier()  # rank 0 has removed an old staging folder of this name
        # Collective: every rank writes its shards, rank 0 the index after all have.
        dcp.save(dcp_state(model_state, optim_state), storage_writer=dcp.FileSystemWriter(path))
        if _rank() == 0:
            atomic_save(trainer_checkpoint({}, {}, self.scheduler.state_dict(), self.scaler.state_dict(),
                                           self._skipped_steps, client_state), dcp_trainer_file(path))
        _barrier()

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        trainer_file = dcp_trainer_file(path)
        if not trainer_file.is_file():
            raise ValueError(f"{path}: no {trainer_file.name} (an FSDP checkpoint folder holds one)")
        state = read_trainer_state(safe_load(trainer_file))  # FormatError (a ValueError): the trainer names it
        # The live (sharded) state dicts are the targets: DCP reads into each
        # rank's shards whatever the world size that wrote them.
        target = dcp_state(*get_state_dict(self._module, self.optimizer))
        with weights_only_loads():
            dcp.load(target, storage_reader=CheckedReader(path))
        model_state, optim_state = dcp_parts(target)
        set_state_dict(self._module, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        self.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self._skipped_steps = state.skipped_steps
        return dict(state.client)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 state dict, gathered (collective); rank 0's copy is on
        the CPU, the other ranks get an empty dict (only rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self._module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # (copies: at world 1 the gathered tensors may be the live parameters themselves)
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone() for k, v in full.items()}


__all__ = ["FSDPStrategy", "lean_checkpoint_of", "shard_model"]
