"""DeepSpeed (ZeRO 0/1/2/3, optional CPU offload) behind the same Strategy interface as DDP.

Users switch one key: ``train.strategy=deepspeed deepspeed.config=configs/deepspeed/zero2.json``.
The JSON holds only what is DeepSpeed's own business (ZeRO stage, buckets,
offload, loss-scaler tuning); the batch, accumulation, clipping and precision
keys are written into it from the toolkit config, and a JSON that contradicts
them refused in one line, by :func:`dist_train.preflight.deepspeed_json` before
any process group exists. The strategy receives the finished dict in its
options (``StrategyOptions.deepspeed_json``), never the config.

This module imports ``deepspeed`` lazily (:func:`import_deepspeed`): the
toolkit runs without it unless the strategy is chosen.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from dist_train import row_shards
from dist_train.config import ConfigError
from dist_train.low_memory_build import Partitions
from dist_train.strategies.deepspeed_rows import RowsBesideEngine
from dist_train.strategies.base import StepStats, Strategy, StrategyOptions
from recipes.batch import move_batch
from recipes.model_file import (FormatError, deepspeed_client, deepspeed_client_state, deepspeed_states_file,
                                lean_checkpoint, read_deepspeed_states)

log = logging.getLogger("biomtl")

# The checkpoint directory the trainer names (``checkpoints/latest`` etc.)
# holds one DeepSpeed tag: ``DIR/state/`` with the per-rank files and
# ``DIR/latest`` (DeepSpeed's own tag file) naming it. A fixed tag keeps the
# layout the same whatever the step, so the CheckpointManager can move, copy
# and rename whole directories.
TAG = "state"
# Where our client state goes in DeepSpeed's model-states file: recipes/model_file.py.

# Set to 1 to build (once, cached under TORCH_EXTENSIONS_DIR) and use
# DeepSpeed's shared-memory CPU all-reduce op. Off by default, see
# _skip_shm_comm_build.
SHM_ENV = "BIOMTL_DS_SHM_COMM"

# ---------------------------------------------------------------------------
# Importing DeepSpeed


def _use_cpu_accelerator_if_no_gpu() -> None:
    # The torch wheel here is a CUDA build; DeepSpeed's accelerator detection
    # would fall back to CPU with a warning on a machine without GPUs, and
    # picks 'cuda' wherever one is visible. Say 'cpu' explicitly when there
    # is none (a user's own DS_ACCELERATOR wins). Must happen before the first
    # ``deepspeed.accelerator.get_accelerator()`` call.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _skip_shm_comm_build() -> None:
    """DeepSpeed's ``TorchBackend`` JIT-compiles a shared-memory all-reduce
    op (``deepspeed_shm_comm``, ~60-150 s with ninja on a small CPU box) the
    first time a process group is wrapped on the CPU accelerator, probing
    every op builder's compiler compatibility on the way. That op serves only
    ``inference_all_reduce`` (CPU tensor-parallel inference); training
    collectives (all-reduce, reduce-scatter, all-gather of ZeRO) go through
    ``torch.distributed`` (gloo here). So the build is skipped unless
    ``BIOMTL_DS_SHM_COMM=1``; there is no DeepSpeed env var for this (the
    ``DS_BUILD_SHM_COMM`` variable only affects pre-building at pip install)."""
    if os.environ.get(SHM_ENV, "0") == "1":
        return
    backend_module = sys.modules.get("deepspeed.comm.torch")
    if backend_module is not None and hasattr(backend_module, "build_shm_op"):
        backend_module.build_shm_op = lambda: None


def import_deepspeed() -> Any:
    """``import deepspeed`` with the environment this toolkit needs."""
    _use_cpu_accelerator_if_no_gpu()
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module whose build_shm_op is patched)

    _skip_shm_comm_build()
    # DeepSpeed's ZeRO calls a torch collective deprecated in torch 2.x; one
    # FutureWarning per rank per run is noise for users of this toolkit.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    return deepspeed


# ---------------------------------------------------------------------------
# What this machine can run


def fp16_supported_here() -> bool:
    """What DeepSpeed's accelerator says about fp16 (``_do_sanity_check``):
    a CUDA GPU, or a CPU whose oneDNN has fp16 kernels (AMX-FP16)."""
    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # noqa: BLE001 - no oneDNN: no fp16
        return False


# ---------------------------------------------------------------------------
# BatchNorm under DeepSpeed's 16-bit modes


def _batchnorm_fp32_forward(self: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` computed in fp32 (weights upcast, differentiably),
    output in the input's dtype."""
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    track = not self.training or self.track_running_stats
    weight = self.weight.float() if self.weight is not None else None
    bias = self.bias.float() if self.bias is not None else None
    with torch.autocast(device_type=input.device.type, enabled=False):
        out = torch.nn.functional.batch_norm(
            input.float(), self.running_mean if track else None, self.running_var if track else None,
            weight, bias, bn_training, factor, self.eps)
    return out.to(input.dtype)


def keep_batchnorm_stats_fp32(model: nn.Module) -> int:
    """DeepSpeed's bf16/fp16 modes cast parameters to 16 bit but (since 0.17)
    leave buffers in fp32, and ``batch_norm`` refuses 16-bit weights with fp32
    running statistics (CPU and CUDA). Casting the statistics to 16 bit too
    (``data_types.buffer_dtype``) would make the running averages lose
    precision (bf16 keeps 8 bits), so instead the BatchNorm layers compute in
    fp32 and keep fp32 statistics, as under DDP with autocast. Returns the
    number of layers changed; SyncBatchNorm and custom subclasses with their
    own forward are left alone."""
    from torch.nn.modules.batchnorm import _BatchNorm

    changed = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and type(m).forward is _BatchNorm.forward:
            m.forward = _batchnorm_fp32_forward.__get__(m)
            changed += 1
    return changed


# ---------------------------------------------------------------------------
# Checkpoint directories are untrusted input: every file loads weights-only.
#
# DeepSpeed reads its directory format with torch.load(weights_only=False)
# (TorchCheckpointEngine, zero_to_fp32), so a crafted directory would run code
# in `biomtl export` or `--resume`. Every *.pt of a directory is therefore
# loaded weights-only before DeepSpeed sees it (`checked_tag_dir`), and
# DeepSpeed's own reads run under `weights_only_loads()`.

# (torch's switch that makes every torch.load weights-only, also those that pass
# weights_only=False, is set by dist_train/strategies/dcp_files.py: weights_only_loads.)
_TAG_FILE = "latest"
_MAX_TAG_BYTES = 255


class CheckpointLoadError(ConfigError):
    """A checkpoint file or directory that does not load weights-only; the
    message is one line naming the file and the cause."""


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors
    and plain containers: the loss scalers (16-bit and ZeRO optimizer states),
    the ZeRO stage enum and the fragment addresses of the flat fp32 partitions.
    Plain data holders: the weights-only unpickler fills their fields with
    tensors and primitives; nothing in the file chooses code to run."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block, DeepSpeed's included, is weights-only
    and accepts DeepSpeed's safe globals. Besides the pre-check this leaves no
    window for a file swapped in after it was checked."""
    from dist_train.strategies.dcp_files import weights_only_loads as forced_weights_only

    with forced_weights_only(), torch.serialization.safe_globals(deepspeed_safe_globals()):
        yield


def load_problem(path: Path, exc: BaseException) -> str:
    """Why ``path`` did not load with ``torch.load(weights_only=True)``, in a
    few words; never the file's bytes (a refused global is named, as torch
    names it, since that is what the user needs to know)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot read it ({err.strerror or type(err).__name__})"
    if size == 0:
        return "empty file"
    if isinstance(exc, OSError) and exc.errno != errno.EINVAL:
        return f"cannot read it ({exc.strerror or type(exc).__name__})"
    message = str(exc)
    if isinstance(exc, OSError):  # EINVAL: torch's reader seeking past the end of a cut-off file
        return "truncated or corrupt"
    if "PytorchStreamReader" in message or "zip archive" in message:
        return "truncated or corrupt (not a complete PyTorch zip archive)"
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in message:
        refused = re.search(r"GLOBAL ([\w.]{1,120})", message)
        if refused:
            # (a cut-off file can name half a global: hence "or corrupt")
            return (f"refused: it pickles {refused.group(1)}, and only tensors and plain data are loaded "
                    "(a file that may run code when unpickled, or a corrupt one)")
    return "not a PyTorch checkpoint file (or truncated / corrupt)"


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """One file of a DeepSpeed checkpoint (or any toolkit checkpoint file),
    loaded weights-only with DeepSpeed's safe globals; a file that does not
    load is a one-line :class:`CheckpointLoadError`. Zip archives are
    memory-mapped, so checking a large file reads little more than its pickle."""
    path = Path(path)
    if not path.is_file():  # a FIFO would block the read
        raise CheckpointLoadError(f"{path}: not a regular file")
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file is the same one line
        raise CheckpointLoadError(f"{path}: {load_problem(path, exc)}") from None


def checked_tag_dir(ckpt_dir: str | Path) -> Path:
    """The tag folder of a DeepSpeed checkpoint directory (the one its
    ``latest`` file names), after every ``*.pt`` under the directory loaded
    weights-only. The tag must name a folder inside the directory. Raises
    :class:`CheckpointLoadError` (one line naming the file) before DeepSpeed
    reads anything."""
    ckpt_dir = Path(ckpt_dir)
    tag_file = ckpt_dir / _TAG_FILE
    if not tag_file.is_file():
        raise CheckpointLoadError(f"{ckpt_dir}: not a DeepSpeed checkpoint directory (no regular "
                                    f"'{_TAG_FILE}' tag file)")
    try:
        with tag_file.open("rb") as fh:
            raw = fh.read(_MAX_TAG_BYTES + 1)
    except OSError as exc:
        raise CheckpointLoadError(f"{tag_file}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    tag = raw.decode("utf-8", "replace").strip()
    tag_dir = ckpt_dir / tag
    inside = tag_dir.resolve().parent == ckpt_dir.resolve()
    if (len(raw) > _MAX_TAG_BYTES or not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not inside
            or not tag_dir.is_dir()):
        raise CheckpointLoadError(f"{tag_file}: does not name a checkpoint folder inside {ckpt_dir}")
    files = sorted(ckpt_dir.rglob("*.pt"))
    if not any(f.parent == tag_dir for f in files):
        raise CheckpointLoadError(f"{tag_dir}: no .pt files (incomplete checkpoint?)")
    for f in files:
        load_checkpoint_file(f)
    return tag_dir


def consolidated_weights(ckpt_dir: Path) -> tuple[Path, Any, Mapping[str, torch.Tensor]]:
    """(its model-states file, what that file stores (``model_file.StoredModel``),
    the full weights) of a DeepSpeed checkpoint directory: DeepSpeed's
    ``zero_to_fp32`` reconstruction of the fp32 master weights under ZeRO 1/2/3;
    stage 0 has no partition files: the module weights of the states file (in
    fp32 the trained weights; with bf16/fp16 the 16-bit image of DeepSpeed's
    fp32 master copy). Every file loads weights-only first; a problem is one
    :class:`CheckpointLoadError` line naming the file."""
    import io

    tag_dir = checked_tag_dir(ckpt_dir)
    model_states = deepspeed_states_file_or_error(tag_dir)
    try:
        stored, stage = read_deepspeed_states(load_checkpoint_file(model_states))
    except FormatError as exc:
        raise CheckpointLoadError(f"{ckpt_dir}: {exc}") from None
    if not stage and not list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return model_states, stored, stored.model
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints its progress (stdout) and a tqdm bar (stderr): keep them for --debug logs only.
    chatter = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            model = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag_dir.name)
    except Exception as exc:  # noqa: BLE001 - a malformed partition set: one line, not zero_to_fp32's traceback
        log.debug("zero_to_fp32: %s", chatter.getvalue())
        cause = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointLoadError(f"{tag_dir}: DeepSpeed cannot consolidate the ZeRO partitions "
                                  f"({type(exc).__name__}: {cause})") from None
    log.debug("zero_to_fp32: %s", chatter.getvalue())
    # zero_to_fp32 rebuilds what the ZeRO optimizer owned (and buffers, frozen weights); a
    # row-sharded head's rows live beside it (strategies/deepspeed_rows.py), whole and fp32
    # in the module weights rank 0 saved
    model.update({k: v for k, v in stored.model.items() if k not in model})
    return model_states, stored, model


def deepspeed_states_file_or_error(tag_dir: Path) -> Path:
    try:
        return deepspeed_states_file(tag_dir)
    except FormatError as exc:
        raise CheckpointLoadError(str(exc)) from None


def lean_checkpoint_of(ckpt_dir: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint directory as best / top-k keep it: the
    consolidated fp32 weights and the client state (config, data info, loop
    position) in one file of the layout of a DDP run's lean file
    (``model_file.lean_checkpoint``), without the ZeRO optimizer partitions
    that only resuming from ``latest`` needs."""
    model_states, stored, model = consolidated_weights(ckpt_dir)
    if stored.client is None:
        raise CheckpointLoadError(f"{model_states}: no biomtl client state")
    # clone(): tensors reconstructed from flat ZeRO buffers are views (saving
    # one would write the whole flat buffer)
    weights = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
               for k, v in model.items()}
    return lean_checkpoint(weights, stored.client)


# ---------------------------------------------------------------------------


def to_zero3_partitions(model: nn.Module, partitions: Partitions, ds_json: Mapping[str, Any],
                        precision_name: str) -> None:
    """Make every parameter of a model built by :mod:`dist_train.low_memory_build` a ZeRO-3
    parameter, one whole parameter at a time, as the engine does with a model built whole
    (cast to the 16-bit dtype, moved to the device, broadcast from rank 0, partitioned:
    ``deepspeed.zero.Init(module=...)``); the engine then takes them as a ``zero.Init`` model."""
    deepspeed = import_deepspeed()
    # DeepSpeed's communication wrapper around the toolkit's process group (initialize makes it too)
    deepspeed.init_distributed(dist_init_required=False, auto_mpi_discovery=False, verbose=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_name)
    first: nn.Parameter | None = None
    for p in model.parameters():
        whole = partitions.full(p)
        if dtype is not None and whole.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            whole = whole.to(dtype)  # the engine's own cast of a model built whole (params only)
        p.data = whole
        partitions.release(p)
        if first is None:
            holder = nn.Module()
            holder.register_parameter("p", p)
            deepspeed.zero.Init(module=holder, config_dict_or_path=json.loads(json.dumps(ds_json)))
            first = p
        else:
            first.convert_to_zero_parameters([p])  # the same Init settings


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine driven by the toolkit's trainer loop.

    Same constructor as :class:`DDPStrategy`; the process group is
    the toolkit's (``deepspeed.initialize`` wraps the existing
    ``torch.distributed`` group: ``init_distributed`` creates its
    ``TorchBackend`` around it without re-initialising)."""

    rows: RowsBesideEngine | None = None  # a sharded identity head's rows, beside the engine

    def __init__(self, model: nn.Module, device: torch.device,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 make_scheduler: Callable[[torch.optim.Optimizer], Any], options: StrategyOptions,
                 partitions: Partitions | None = None):
        """``partitions``: the model was built with its parameters sliced over the ranks
        (:mod:`dist_train.low_memory_build`, ZeRO-3 only); they become ZeRO-3 partitions
        one whole parameter at a time."""
        if options.deepspeed_json is None:
            raise ValueError("DeepSpeedStrategy needs options.deepspeed_json (preflight.deepspeed_json)")
        deepspeed = import_deepspeed()
        self.device = device
        self.precision = precision = options.precision  # (clipping: the JSON's gradient_clipping)
        world = options.world_size
        if precision.name == "fp16" and not fp16_supported_here():
            raise ConfigError("train.precision: fp16 with train.strategy=deepspeed needs a CUDA GPU; DeepSpeed "
                              "refuses fp16 on this CPU: use train.precision=bf16 or fp32")
        self.ds_config = json.loads(json.dumps(options.deepspeed_json))  # a deep copy: DeepSpeed may edit it
        if partitions is not None:
            to_zero3_partitions(model, partitions, self.ds_config, precision.name)
        model.to(device)
        self._module = model
        if precision.name in ("bf16", "fp16"):
            keep_batchnorm_stats_fp32(model)
        optimizer = make_optimizer(model)
        # a sharded identity head keeps its rows out of the engine (strategies/deepspeed_rows.py)
        self.rows = RowsBesideEngine(model, optimizer) if row_shards.row_sharded(model) else None
        scheduler = make_scheduler(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        if self.rows is not None:
            self.rows.after_initialize(self.optimizer, float(self.ds_config.get("gradient_clipping", 0.0) or 0.0))
        self.stage = int(self.engine.zero_optimization_stage())
        log.info("DeepSpeed engine: ZeRO stage %d, %s, optimizer %s, micro-batch %d x accum %d x world %d",
                 self.stage, precision.name, type(self.optimizer).__name__,
                 self.ds_config["train_micro_batch_size_per_gpu"], self.ds_config["gradient_accumulation_steps"],
                 world)

    @property
    def module(self) -> nn.Module:
        return self._module

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    # -- the step ----------------------------------------------------------
    def _forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        batch = move_batch(batch, self.device)
        # DeepSpeed's bf16/fp16 modes hold the weights in 16 bit but do not
        # cast inputs; autocast (as DDP uses) casts them where a layer needs
        # it and keeps losses / softmax / norms in fp32 as under DDP.
        with self.precision.autocast():
            return self.engine(batch)

    def micro_step(self, batch: Mapping[str, Any], loss_scale: float, boundary: bool) -> dict[str, Any]:
        # Accumulation with exactly the DDP strategy's semantics, including the
        # trainer's short last window of an epoch (batches % accum != 0):
        # - the trainer, not DeepSpeed's micro-step counter, decides where a
        #   window ends: set_gradient_accumulation_boundary(boundary) before
        #   the forward/backward, so ZeRO reduces gradients (and the engine
        #   steps) at the trainer's boundaries. DeepSpeed's own counter
        #   ((micro_steps + 1) % gradient_accumulation_steps) would run on
        #   across epochs and pair the short window with the next epoch's
        #   first batch;
        # - the loss is scaled by the trainer's 1/window_len, and
        #   engine.backward(scale_wrt_gas=False) keeps DeepSpeed from dividing
        #   by gradient_accumulation_steps again (it would divide a 1-batch
        #   last window by accum, where DDP divides by 1).
        # gradient_accumulation_steps stays train.grad_accum in the DeepSpeed
        # config (train_batch_size and DeepSpeed's throughput counters use it).
        self.engine.set_gradient_accumulation_boundary(boundary)
        out = self._forward(batch)
        self.engine.backward(out["loss"].float() * loss_scale, scale_wrt_gas=False)
        if not boundary:
            # backward/step on every micro-batch, as DeepSpeed expects: off a
            # boundary, step() only advances the engine's micro-step count.
            self.engine.step()
        return out

    def _local_grad_norm(self) -> float:
        """Without ZeRO and in fp32 DeepSpeed steps the plain torch optimizer
        and reports no norm; the gradients are all-reduced by now."""
        grads = [p.grad for p in self._module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def optimizer_step(self) -> StepStats:
        lr = float(self.engine.get_lr()[0])
        manual_norm = self._local_grad_norm() if not hasattr(self.optimizer, "_global_grad_norm") else None
        settings = self.rows.before_step() if self.rows else None
        skipped_before = self.engine.skipped_steps
        # The boundary step: DeepSpeed clips (gradient_clipping), steps the
        # optimizer, zeroes the gradients, and steps the LR schedule unless
        # an fp16 overflow made it skip the update (the same rule as DDP's).
        self.engine.step()
        skipped = self.engine.skipped_steps > skipped_before
        if skipped and (not dist.is_initialized() or dist.get_rank() == 0):
            # DeepSpeed itself only notes this at its own (disabled) progress prints.
            scale = getattr(self.optimizer, "loss_scale", None) or getattr(self.optimizer, "cur_scale", None)
            log.warning("fp16 overflow: DeepSpeed skipped the optimizer step (loss scale now %s; %d skipped "
                        "so far)", scale, self.engine.skipped_steps)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = manual_norm
        norm = float(norm) if norm is not None else float("nan")
        if self.rows is not None:  # the head's rows: their own optimizer, this step's settings and norm
            self.rows.step(settings, skipped, norm)
        return StepStats(lr=lr, grad_norm=norm if math.isfinite(norm) and norm >= 0 else float("nan"),
                         skipped=skipped)

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    @torch.no_grad()
    def eval_forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        # Through the engine: under ZeRO-3 its hooks gather the partitioned
        # weights (every rank makes the same number of calls).
        return self._forward(batch)

    # -- checkpoints -------------------------------------------------------
    @property
    def checkpoint_suffix(self) -> str:
        return ""  # a directory

    def lean_checkpoint(self, latest: Path) -> Any:
        # best / top-k: one file of consolidated fp32 weights and the client
        # state (no ZeRO optimizer partitions: only latest resumes), read from
        # the folder just written, on rank 0 (no collective).
        return lean_checkpoint_of(latest)

    @property
    def lean_suffix(self) -> str:
        return ".pt"

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        # Collective: every rank writes its own ZeRO partition files. DeepSpeed
        # barriers after rank 0 made the directory (which the manager has
        # emptied first) and again after all files and its 'latest' tag file
        # are written, so rank 0 may rename the directory as soon as this
        # returns.
        rows = self.rows.whole_in_saves(client_state) if self.rows else contextlib.nullcontext(client_state)
        with rows as client_state:
            self.engine.save_checkpoint(str(path), tag=TAG, client_state=deepspeed_client_state(client_state),
                                        save_latest=True)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        # DeepSpeed's own loader unpickles its directory format
        # (weights_only=False): every file is checked weights-only first (the
        # entry point already did so before writing anything, this covers a
        # restart's own checkpoint too), and DeepSpeed's reads run
        # weights-only as well, with the tag that was checked.
        tag_dir = checked_tag_dir(path)
        with weights_only_loads():
            load_path, client = self.engine.load_checkpoint(
                str(path), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True,
                custom_load_fn=self.rows.load_module if self.rows else None)
        try:
            if load_path is None:
                raise FormatError("DeepSpeed could not load it")
            client = dict(deepspeed_client(client))
        except FormatError as exc:
            raise RuntimeError(f"{path}: DeepSpeed could not load the checkpoint ({exc})") from None
        if self.rows is not None:
            self.rows.load_optimizer(client, path)
        return client

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights from the live engine (collective under
        ZeRO-3; every rank calls it): the fp32 master copy where DeepSpeed
        keeps one (ZeRO 1/2/3, bf16/fp16 optimizers), else the module's own."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name, tensor in self._module.state_dict(keep_vars=True).items():
            param = tensor if isinstance(tensor, nn.Parameter) else None  # (tied weights: both names)
            full = None
            if param is not None and param.requires_grad:
                full = safe_get_full_fp32_param(param)
            if full is None and param is not None and hasattr(param, "ds_id"):
                # a ZeRO-3 parameter the optimizer does not own (frozen): gather its 16-bit value
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.detach().clone()
            if full is None:
                full = tensor.detach()
            full = full.detach().cpu().clone()
            out[name] = full.float() if full.is_floating_point() else full
        row_shards.gathered_state(self._module, None, out, None)  # a sharded head: whole on rank 0
        return out


__all__ = ["DeepSpeedStrategy", "to_zero3_partitions", "CheckpointLoadError", "checked_tag_dir",
           "consolidated_weights", "deepspeed_safe_globals", "fp16_supported_here", "import_deepspeed",
           "load_checkpoint_file", "lean_checkpoint_of", "load_problem", "weights_only_loads", "TAG"]
