"""Per-rank memory of DDP vs DeepSpeed ZeRO-1/2/3 vs FSDP2 at world size 2.

For each strategy, one torchrun launch (2 ranks, gloo on CPU; NCCL on GPUs)
builds the FaceCom recipe model with a ResNet-50 backbone (~25 M parameters)
through the toolkit's own strategy classes, optimizer (AdamW) and schedule,
runs two optimizer steps on random 64x64 images, and takes a census of the
tensors each rank holds just before the second optimizer step (gradients
present, Adam state created by the first step). Tensors are counted once per
storage (views into DeepSpeed's flat buffers share one storage):

- parameters: the module's parameter storages (ZeRO-3: the rank's ``ds_tensor`` partitions;
  FSDP2: the local shards of the DTensor parameters, as are its gradients and Adam state);
- gradients: ``.grad`` of the module's and the optimizer's parameters plus
  the gradient partitions / reduction buckets the ZeRO optimizer owns;
- optimizer state: the torch optimizer's state (``exp_avg``, ``exp_avg_sq``, step);
- fp32 master: the optimizer's own fp32 copy of the parameters where it is
  not the module's storage (ZeRO keeps one per rank partition);
- buffers: anything else the ZeRO optimizer holds (reduction and all-gather
  buckets, flat staging buffers; sized by the JSON's bucket sizes);
- RSS at step: the rank process's resident memory at the census (libraries,
  data and activations included); peak RSS: ``resource.getrusage`` maxrss,
  which also holds initialisation transients and memory the allocator did
  not give back; build peak rise: how far the peak RSS rose over building the
  model as the trainer builds it (``dist_train.low_memory_build.build_model``:
  DDP builds it whole on every rank; FSDP2 and ZeRO-3 with
  ``train.low_memory_build=auto`` slice each parameter over the ranks as its
  module is built, ``--low-memory-build never`` builds it whole there too), the
  peak reset just before (``/proc/self/clear_refs``); on CUDA also the
  peak CUDA memory of the build (the build itself runs on the CPU). The ranks run with a fixed glibc mmap
  threshold (``MALLOC_MMAP_THRESHOLD_=131072``; the dynamic one keeps freed
  large tensors in the heap, which the peak would then count). DDP's C++ reducer buckets (one more
  gradient-sized buffer) are not visible to the census but are in the RSS.

    python benchmarks/memory.py                      # fp32 and bf16, prints a markdown table
    python benchmarks/memory.py --precision fp32 --steps 2 --json out.json
    python benchmarks/memory.py --strategy ddp zero3 fsdp --precision fp32 --low-memory-build never  # whole builds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = {"ddp": None, "zero1": "zero1.json", "zero2": "zero2.json", "zero3": "zero3.json", "fsdp": None}
MiB = 2**20


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Start a new peak (VmHWM) for this process (Linux >= 4.0: ``5 > clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _storages(tensors: Iterable[Any], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not counted yet."""
    import torch

    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):  # FSDP2: this rank's shard
            t = t.to_local()
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _tensors_in(obj: Any, grads: bool = True, depth: int = 0, visited: set[int] | None = None) -> Iterable[Any]:
    """Tensors reachable through the attributes / containers of ``obj`` (and their ``.grad``)."""
    import torch

    visited = set() if visited is None else visited
    if id(obj) in visited or depth > 4:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if grads and obj.grad is not None:
            yield obj.grad
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        children = list(vars(obj).values())
    else:
        return
    for v in children:
        yield from _tensors_in(v, grads, depth + 1, visited)


# Where DeepSpeed's ZeRO optimizers keep their fp32 master partitions and
# their gradient partitions (DeepSpeed 0.19; stage 3 detaches the master from
# the torch optimizer's param_groups between steps).
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
GRAD_ATTRS = ("averaged_gradients", "grad_partitions_flat_buffer", "fp32_groups_gradient_flat_partition")


def census(strategy: Any) -> dict[str, float]:
    module = strategy.module
    params = list(module.parameters())
    wrapper = getattr(strategy, "optimizer", None)
    inner = getattr(wrapper, "optimizer", wrapper)  # ZeRO wraps the torch optimizer
    zero = wrapper is not inner
    seen: set[int] = set()
    out = {"parameters": _storages([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params],
                                   seen)}
    inner_params = [p for g in inner.param_groups for p in g["params"]]
    masters = list(_tensors_in([getattr(wrapper, a, None) for a in MASTER_ATTRS], grads=False)) if zero else []
    out["fp32 master"] = _storages(inner_params + masters, seen)
    out["optimizer state"] = _storages((t for s in inner.state.values() for t in s.values()), seen)
    grads = [p.grad for p in params + inner_params if p.grad is not None]
    grads += list(_tensors_in([getattr(wrapper, a, None) for a in GRAD_ATTRS])) if zero else []
    out["gradients"] = _storages(grads, seen)
    # what else the ZeRO optimizer holds: reduction / all-gather buckets, flat staging buffers
    out["buffers"] = _storages(_tensors_in(wrapper), seen) if zero else 0
    return {k: v / MiB for k, v in out.items()}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from dist_train import distributed
    from dist_train.config import load_config, recipe_params
    from dist_train.main import seed_everything
    from dist_train.precision import Precision
    from recipes.base import DataInfo, get_recipe
    from dist_train.schedulers import build_scheduler
    from dist_train.strategies import build_strategy
    from dist_train.low_memory_build import build_model
    from dist_train.trainer import build_optimizer, strategy_options
    from launch.env import detect

    overrides = [f"train.precision={args.precision}", f"data.batch_size={args.batch_size}",
                 f"train.low_memory_build={args.low_memory_build}",
                 "train.optimizer=adamw", "recipe.params.backbone=resnet50", "recipe.params.img_size=64"]
    if args.strategy == "fsdp":
        overrides += ["train.strategy=fsdp"]
    if STRATEGIES[args.strategy]:
        overrides += ["train.strategy=deepspeed",
                      f"deepspeed.config={REPO / 'configs' / 'deepspeed' / STRATEGIES[args.strategy]}"]
    cfg = load_config(REPO / "configs" / "facecom.yaml", overrides)
    env = detect()
    with distributed.process_group(env, "auto", 600) as ctx:
        info = DataInfo(identities=tuple(f"id{i}" for i in range(args.identities)), twin_pairs=(),
                        label_schemas={"gender": ("female", "male")}, modalities=("vis",))
        recipe = get_recipe("facecom")(recipe_params(cfg), info)
        if cfg.train.strategy == "deepspeed":  # its imports are not the model's memory
            from dist_train.strategies.deepspeed import import_deepspeed

            deepspeed = import_deepspeed()
            # nor its communication wrapper
            deepspeed.init_distributed(dist_init_required=False, auto_mpi_discovery=False, verbose=False)
        options = strategy_options(cfg, Precision(cfg.train.precision, ctx.device.type), ctx.world_size)
        rss_before = _rss_mib()
        seed_everything(0)
        # the build, as the trainer does it: the rise of the peak RSS over it
        import gc

        gc.collect()
        build_from = _status_mib("VmRSS")
        reset = _reset_peak_rss()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, partitions = build_model(recipe.build_model, cfg.train.low_memory_build, cfg.train.strategy,
                                        options.deepspeed_json, ctx.rank, ctx.world_size, ctx.device)
        build = {"build peak rise": _status_mib("VmHWM") - build_from if reset else float("nan")}
        if ctx.device.type == "cuda":
            build["build peak CUDA"] = torch.cuda.max_memory_allocated() / MiB
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        strategy = build_strategy(cfg.train.strategy, model=model, device=ctx.device,
                                  make_optimizer=build_optimizer(cfg, recipe),
                                  make_scheduler=lambda opt: build_scheduler(cfg.train.scheduler, opt, 100),
                                  options=options, **({"partitions": partitions} if partitions else {}))
        strategy.train()
        g = torch.Generator().manual_seed(ctx.rank)
        measured: dict[str, float] = {}
        for step in range(args.steps):
            batch = {"image": torch.randn(args.batch_size, 3, 64, 64, generator=g),
                     "identity": torch.randint(0, args.identities, (args.batch_size,), generator=g),
                     "gender": torch.randint(0, 2, (args.batch_size,), generator=g)}
            strategy.micro_step(batch, 1.0, True)
            if step == args.steps - 1:
                measured = census(strategy)
                measured["RSS at step"] = _current_rss_mib()
            strategy.optimizer_step()
        measured.update(build)
        measured["peak RSS"] = _rss_mib()
        measured["RSS rise"] = measured["peak RSS"] - rss_before
        if ctx.device.type == "cuda":
            measured["peak CUDA"] = torch.cuda.max_memory_allocated() / MiB
        rows = distributed.all_gather_objects(measured)
        if ctx.is_main:
            Path(args.json).write_text(json.dumps({"strategy": args.strategy, "precision": args.precision,
                                                   "build": "sliced" if partitions is not None else "whole",
                                                   "params": n_params, "world": dist.get_world_size(),
                                                   "ranks": rows}))


def launch(strategy: str, precision: str, steps: int, batch_size: int, low_memory_build: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--strategy", strategy, "--precision", precision, "--steps", str(steps),
               "--batch-size", str(batch_size), "--low-memory-build", low_memory_build, "--json", str(out)]
        # A fixed mmap threshold: glibc's dynamic one rises after large frees, and the
        # freed per-module tensors of a ZeRO-3 build then stay in the heap, counted as peak
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{strategy}/{precision} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(results: list[dict[str, Any]]) -> str:
    """Rank 0's numbers; in brackets, the ratio to DDP's at the same precision."""
    cols = ["parameters", "gradients", "optimizer state", "fp32 master", "buffers"]
    lines = ["| strategy | precision | build | " + " | ".join(f"{c} MiB" for c in cols)
             + " | sum MiB | RSS at step MiB | peak RSS MiB | build peak rise MiB |",
             "|---|---|---|" + "---:|" * (len(cols) + 4)]
    base: dict[str, dict[str, float]] = {}
    for r in results:
        rank0 = dict(r["ranks"][0])
        rank0["all"] = sum(rank0[c] for c in cols)
        if r["strategy"] == "ddp":
            base[r["precision"]] = rank0
        ref = base.get(r["precision"])

        def cell(key: str) -> str:
            if ref is None or r["strategy"] == "ddp" or not ref[key]:
                return f"{rank0[key]:.1f}"
            return f"{rank0[key]:.1f} ({rank0[key] / ref[key]:.2f})"

        lines.append(f"| {r['strategy']} | {r['precision']} | {r.get('build', 'whole')} | "
                     + " | ".join(cell(c) for c in cols + ["all"])
                     + f" | {rank0['RSS at step']:.0f} | {rank0['peak RSS']:.0f} | {cell('build peak rise')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=list(STRATEGIES), nargs="+", default=None,
                        help="some of the strategies (the first must be ddp for the ratios); default: all")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--low-memory-build", choices=["auto", "never"], default="auto",
                        help="train.low_memory_build for FSDP2 / ZeRO-3 (auto: sliced build; never: whole)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        args.strategy = args.strategy[0]
        worker(args)
        return
    results = []
    for precision in [args.precision] if args.precision else ["fp32", "bf16"]:
        for strategy in args.strategy or list(STRATEGIES):
            r = launch(strategy, precision, args.steps, args.batch_size, args.low_memory_build)
            print(f"{strategy}/{precision}: {r['params'] / 1e6:.1f} M params, rank 0: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["ranks"][0].items()), flush=True)
            results.append(r)
    print()
    print(f"world size 2, FaceCom + ResNet-50 ({results[0]['params'] / 1e6:.1f} M parameters), AdamW, "
          "MiB per rank (rank 0)")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
