"""Training throughput of one recipe on one device: the toolkit's own step, with and without
``torch.compile``, its FLOPs, MFU on CUDA, the loader's headroom, and where the time goes.

    python benchmarks/train_throughput.py --config configs/facecom.yaml --device cpu --steps 20
    python benchmarks/train_throughput.py --config configs/dcal_twins.yaml --device cuda \\
        --set recipe.params.backbone=vit_small_patch16_224 recipe.params.img_size=224 \\
              recipe.params.patch_size=16 data.synthetic.image_size=224 data.batch_size=128
    benchmarks/gpu_all.sh OUT_DIR        # every GPU figure of docs/benchmarks.md in one go

What is timed is exactly what the trainer runs per optimizer step: the configured
strategy's ``micro_step`` + ``optimizer_step`` (``dist_train.strategies``: precision,
``train.channels_last``, ``train.compile``, fused AdamW on CUDA, clipping) on batches
from the recipe's real loader (``data.batching`` as configured, pinned on CUDA), copied
to the device inside the step as in training. Warm-up steps (compilation, cuDNN
autotuning, allocator growth) are not timed; CUDA is synchronised around the window.

Compilation stays out of the timed window: warm-up runs at least ``--warmup`` steps and
then on until a step compiled nothing (dynamo's own counters of captured graphs and
compiled backward graphs, ``torch._dynamo.utils.counters``, did not move), at most
``--max-warmup`` steps: a step that still compiles then is a recompile per step, reported
as an error. ``compile_s`` is the time dynamo / AOTAutograd / inductor spent compiling
(``torch._dynamo.utils.compilation_time_metrics``), reported apart with the warm-up steps.

* samples/s: ``data.batch_size`` x steps / seconds (a triplet batch counts its anchors).
* FLOPs per sample: ``torch.utils.flop_counter.FlopCounterMode`` over one eager
  forward + backward (matmuls and convolutions; the optimizer is not counted).
* MFU (CUDA): achieved FLOP/s / the device's *measured* dense bf16 matmul rate
  (8192^3 GEMMs), not the datasheet peak.
* loader: the same loader alone (``data.num_workers`` workers) in samples/s; headroom =
  loader rate / training rate (>= 1.5 wanted: the loader is not the bottleneck).
* ``--profile`` (default on CUDA when MFU < 35 %): a ``torch.profiler`` table of the
  ops that take the time, written next to the JSON.

Writes ``--json`` (default ``runs/train_throughput/<config>_<device>.json``) and prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MFU_PROFILE_BELOW = 0.35


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 GEMM rate of this device (FLOP/s): the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def take_batches(loader_factory: Any, count: int) -> list[dict[str, Any]]:
    out = []
    epoch = 0
    while len(out) < count:
        for batch in loader_factory.train(epoch):
            out.append(batch)
            if len(out) == count:
                break
        epoch += 1
    return out


def loader_rate(loader_factory: Any, batch_size: int, batches: int) -> float:
    """Samples/s of the training loader alone, from its first batch (worker start-up excluded)."""
    n, t0, epoch = 0, None, 0
    while n < batches:
        for _ in loader_factory.train(epoch):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += 1
            if n == batches:
                break
        epoch += 1
    return n * batch_size / (time.perf_counter() - t0)


def step_flops(strategy: Any, batch: dict[str, Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        strategy.micro_step(batch, 1.0, True)
    strategy.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# dynamo's compile-time entries: frame compilation (tracing + the backend's forward and
# joint graphs) and a backward graph compiled lazily at the first backward
COMPILE_TIME_METRICS = ("_compile.compile_inner", "backward._backward_impl")


def compile_state() -> tuple[int, float]:
    """(graphs compiled so far in this process, seconds spent compiling them)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    graphs = counters["stats"]["unique_graphs"] + counters["aot_autograd"]["total"]
    return graphs, sum(sum(compilation_time_metrics.get(k, ())) for k in COMPILE_TIME_METRICS)


def compile_cache_hits() -> int:
    """Graphs inductor took from its on-disk cache (a cold compile costs far more:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) measures that)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def warm_up(strategy: Any, batches: list[dict[str, Any]], device: torch.device, min_steps: int,
            max_steps: int) -> dict[str, Any]:
    """Untimed steps: at least ``min_steps``, then until one compiled nothing new."""
    graphs0, seconds0 = compile_state()
    hits0 = compile_cache_hits()
    t0 = time.perf_counter()
    last, steps = graphs0, 0
    while True:
        strategy.micro_step(batches[steps % len(batches)], 1.0, True)
        strategy.optimizer_step()
        sync(device)
        steps += 1
        graphs, seconds = compile_state()
        settled, last = graphs == last, graphs
        if steps >= min_steps and settled:
            break
        if steps >= max_steps:
            raise SystemExit(f"still compiling after {steps} warm-up steps ({graphs - graphs0} graphs): the step "
                             "recompiles; TORCH_LOGS=recompiles,graph_breaks names the cause")
    return {"warmup_steps": steps, "warmup_s": time.perf_counter() - t0, "compile_s": seconds - seconds0,
            "graphs_compiled": graphs - graphs0, "compile_cache_hits": compile_cache_hits() - hits0}


def time_steps(strategy: Any, batches: list[dict[str, Any]], device: torch.device, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps (after :func:`warm_up`); refuses a window in
    which something was compiled (a recompile on a later batch)."""
    graphs = compile_state()[0]
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        strategy.micro_step(batches[i % len(batches)], 1.0, True)
        strategy.optimizer_step()
    sync(device)
    seconds = time.perf_counter() - t0
    if compile_state()[0] != graphs:
        raise SystemExit("a graph was compiled inside the timed window (a recompile): "
                         "TORCH_LOGS=recompiles names the cause")
    return seconds


def profile_table(strategy: Any, batches: list[dict[str, Any]], device: torch.device, path: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(5):
            strategy.micro_step(batches[i % len(batches)], 1.0, True)
            strategy.optimizer_step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20)
    path.write_text(table)
    return table


def measure(cfg: Any, device: torch.device, make_strategy: Callable[[Any], Any], batches: list[dict[str, Any]],
            args: argparse.Namespace, peak: float | None, flops: int, out_dir: Path, tag: str) -> dict[str, Any]:
    strategy = make_strategy(cfg)
    warm = warm_up(strategy, batches, device, args.warmup, args.max_warmup)
    seconds = time_steps(strategy, batches, device, args.steps)
    rate = cfg.data.batch_size * args.steps / seconds
    row: dict[str, Any] = {"compile": cfg.train.compile, "samples_per_s": rate, "step_ms": 1000 * seconds / args.steps,
                           **warm}
    if flops:
        row["achieved_tflops"] = flops * args.steps / seconds / 1e12
        if peak:
            row["mfu"] = flops * args.steps / seconds / peak
    if args.profile == "on" or (args.profile == "auto" and row.get("mfu") is not None and row["mfu"] < MFU_PROFILE_BELOW):
        path = out_dir / f"{tag}_profile.txt"
        profile_table(strategy, batches, device, path)
        row["profile"] = str(path)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    ap.add_argument("--precision", default="", help="default: bf16 on CUDA, the config's on CPU")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10, help="at least this many untimed steps")
    ap.add_argument("--max-warmup", type=int, default=50, help="more untimed steps while the step still compiles")
    ap.add_argument("--compile", choices=["both", "on", "off"], default="both")
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--profile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")

    from dist_train import distributed
    from dist_train.config import load_config, recipe_params
    from dist_train.main import prepare_data, seed_everything
    from dist_train.precision import Precision, resolve_precision
    from dist_train.schedulers import build_scheduler
    from dist_train.strategies import build_strategy
    from dist_train.trainer import LoaderFactory, build_optimizer, strategy_options
    from launch.env import detect
    from recipes.base import get_recipe
    from shards.manifest import Manifest

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    precision = args.precision or ("bf16" if args.device == "cuda" else "")
    overrides = [f"experiment.output_dir={work / 'runs'}", f"data.synthetic.cache_dir={work / 'data'}",
                 "logging.progress=false", *([f"train.precision={precision}"] if precision else []), *args.set]
    base = load_config(args.config, overrides)
    out_json = args.json or REPO / "runs" / "train_throughput" / f"{args.config.stem}_{args.device}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    env = detect()
    with distributed.process_group(env, "auto", 600, cpu_threads=base.dist.cpu_threads) as ctx:
        device = ctx.device if args.device == "cuda" else torch.device("cpu")
        ctx = distributed.DistContext(env=ctx.env, device=device, backend=ctx.backend)
        data_dir = prepare_data(base, ctx)
        recipe = get_recipe(base.recipe.name)(recipe_params(base), Manifest.load(data_dir).data_info())
        loaders = LoaderFactory(base, ctx, data_dir, recipe)
        batches = take_batches(loaders, 8)
        prec = Precision(resolve_precision(base.train.precision, device), device.type)

        def make_strategy(cfg: Any) -> Any:
            seed_everything(cfg.experiment.seed)
            return build_strategy(cfg.train.strategy, model=recipe.build_model(), device=device,
                                  make_optimizer=build_optimizer(cfg, recipe),
                                  make_scheduler=lambda opt: build_scheduler(cfg.train.scheduler, opt, 10 ** 6),
                                  options=strategy_options(cfg, prec, world_size=1))

        eager = load_config(args.config, [*overrides, "train.compile=false"])
        flops = step_flops(make_strategy(eager), batches[0])
        peak = matmul_peak_flops(device) if device.type == "cuda" else None
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
        rows = []
        for on in modes:
            cfg = load_config(args.config, [*overrides, f"train.compile={str(on).lower()}"])
            rows.append(measure(cfg, device, make_strategy, batches, args, peak, flops, out_json.parent,
                                f"{args.config.stem}_{args.device}_{'compiled' if on else 'eager'}"))
        load_rate = loader_rate(loaders, base.data.batch_size, args.loader_batches)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    best = max(r["samples_per_s"] for r in rows)
    result = {"config": str(args.config), "overrides": args.set, "device": name, "precision": prec.name,
              "batch_size": base.data.batch_size, "steps": args.steps, "warmup": args.warmup,
              "flops_per_sample": flops / base.data.batch_size, "matmul_peak_tflops": peak / 1e12 if peak else None,
              "rows": rows, "loader_samples_per_s": load_rate, "loader_workers": base.data.num_workers,
              "loader_headroom": load_rate / best, "load_avg": os.getloadavg(), "torch": torch.__version__}
    out_json.write_text(json.dumps(result, indent=1))
    print(f"{args.config.name} on {name}, {prec.name}, batch {base.data.batch_size}, {args.steps} timed steps "
          f"after >= {args.warmup} warm-up steps (until nothing compiles); "
          f"{flops / base.data.batch_size / 1e9:.2f} GFLOP per sample (fwd+bwd)"
          + (f"; measured bf16 matmul {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print("\n| torch.compile | samples/s | step ms | TFLOP/s | MFU | warm-up steps | compile s |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "-"
        print(f"| {'on' if r['compile'] else 'off'} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
              f"{r.get('achieved_tflops', 0):.3f} | {mfu} | {r['warmup_steps']} | {r['compile_s']:.1f} |")
    print(f"\nloader alone ({base.data.num_workers} workers{', pinned' if device.type == 'cuda' else ''}): "
          f"{load_rate:.1f} samples/s = {result['loader_headroom']:.2f}x the fastest step's consumption "
          f"(want >= 1.5)\nJSON: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
