"""Identity heads at scale: the replicated margin head vs the sharded one (Partial FC,
``models/partial_fc.py``) at world size 2, per identity count.

Each (identities, head) case is one torchrun launch of 2 ranks (gloo on CPU, NCCL
on GPUs), so peak memory is the case's own. A rank holds a small trunk (a linear
layer on 512 features, so the head dominates, as it does at these counts) and the
head, trained with AdamW through the toolkit's DDP strategy (the same
``row_shards`` handling as a run: DDP ignores the sharded rows, the checkpointed
head is whole); random features and labels of the whole identity range.

Per case, rank 0 reports:
- head bytes per rank: its centre rows (fp32) + AdamW's two moments of them (what
  the strategy keeps across steps; the gradient is transient and equal in size to
  the rows, counted apart);
- peak RSS of the rank (peak CUDA memory on a GPU);
- step time: median and spread of the steps after ``--warmup``.

    python benchmarks/identity_scale.py                               # 1e4, 1e5, 1e6
    python benchmarks/identity_scale.py --identities 10000 100000 --json out.json
    python benchmarks/identity_scale.py --identities 2000000 --heads sharded_r0.1

On CPU the run is bound by the host's cores; run it on a quiet machine and
report the load average beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
HEADS = {"replicated": ("none", 1.0), "sharded_r1": ("partial_fc", 1.0), "sharded_r0.1": ("partial_fc", 0.1)}
MiB = 2**20


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from dist_train.precision import Precision
    from dist_train.strategies.base import StrategyOptions
    from dist_train.strategies.ddp import DDPStrategy
    from recipes.base import ParallelContext
    from recipes.identity_head import build_head, identity_outputs

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    sharding, rate = HEADS[args.head]
    parallel = ParallelContext(rank, world, training=True)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(args.dim, args.dim)
            self.identity_head = build_head("arcface", sharding, rate, args.dim, args.identities, 64.0, 0.5, parallel)

        def forward(self, batch: dict) -> dict:
            emb = self.trunk(batch["x"])
            loss, _ = identity_outputs(self.identity_head, emb, batch["y"], 0.0, True)
            return {"loss": loss, "terms": {}}

    model = Model()
    precision = Precision("fp32", device.type)
    strategy = DDPStrategy(model, device, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                           lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                           StrategyOptions(precision=precision, world_size=world))
    head = model.identity_head.weight
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        batch = {"x": torch.randn(args.batch, args.dim, generator=gen),
                 "y": torch.randint(0, args.identities, (args.batch,), generator=gen)}
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        strategy.micro_step(batch, 1.0, True)
        strategy.optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    adam = strategy.optimizer.state[head]
    state_bytes = sum(t.numel() * t.element_size() for t in adam.values() if t.dim() >= 1)
    peak = (torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report = {"identities": args.identities, "head": args.head, "rank": rank, "world": world,
              "head_rows": int(head.shape[0]), "head_weight_mib": head.numel() * head.element_size() / MiB,
              "head_adam_mib": state_bytes / MiB, "peak_mib": peak, "peak_kind": "cuda" if device.type == "cuda"
              else "rss", "step_s": times, "device": str(device)}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(args.out).write_text(json.dumps(reports))
    dist.destroy_process_group()


def _case(identities: int, head: str, args: argparse.Namespace) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--head", head, "--identities", str(identities), "--dim", str(args.dim),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            errors = [line for line in proc.stderr.splitlines() if "Error" in line and "ChildFailed" not in line]
            tail = (errors or proc.stderr.strip().splitlines() or ["(no output)"])[0]
            print(f"{identities} {head}: failed ({proc.returncode}): {tail}", file=sys.stderr)
            return {"identities": identities, "head": head, "failed": tail}
        ranks = json.loads(out.read_text())
    first = ranks[0]
    steps = [max(r["step_s"][i] for r in ranks) for i in range(len(first["step_s"]))]  # the slower rank sets the pace
    return {"identities": identities, "head": head, "head_rows_rank0": first["head_rows"],
            "head_state_mib_rank0": first["head_weight_mib"] + first["head_adam_mib"],
            "peak_mib_max": max(r["peak_mib"] for r in ranks), "peak_kind": first["peak_kind"],
            "step_s_median": statistics.median(steps), "step_s_min": min(steps), "step_s_max": max(steps),
            "device": first["device"]}


def _table(rows: list[dict]) -> str:
    lines = ["| identities | head | head rows (rank 0) | head + Adam MiB/rank | vs replicated | peak MiB | "
             "step s median (min-max) | vs replicated |", "|---|---|---|---|---|---|---|---|"]
    base = {r["identities"]: r for r in rows if r["head"] == "replicated" and "failed" not in r}
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['identities']:,} | {r['head']} | failed: {r['failed'][:60]} | | | | | |")
            continue
        b = base.get(r["identities"])
        mem = f"{r['head_state_mib_rank0'] / b['head_state_mib_rank0']:.2f}" if b else "-"
        step = f"{r['step_s_median'] / b['step_s_median']:.2f}" if b else "-"
        lines.append(f"| {r['identities']:,} | {r['head']} | {r['head_rows_rank0']:,} | "
                     f"{r['head_state_mib_rank0']:.1f} | {mem} | {r['peak_mib_max']:.0f} | "
                     f"{r['step_s_median']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | {step} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=list(HEADS))
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--head", choices=sorted(HEADS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.identities = args.identities[0]
        _worker(args)
        return
    rows = [_case(n, head, args) for n in args.identities for head in args.heads]
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
