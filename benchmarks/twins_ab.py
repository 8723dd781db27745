"""Do the twin-aware batches matter? An A/B on synthetic co-twins that can be told apart.

    python benchmarks/twins_ab.py                       # 3 seeds -> runs/twins_ab/{results.md,results.json}
    python benchmarks/twins_ab.py --seeds 0 --jobs 2    # a single-seed probe
    python benchmarks/twins_ab.py --resume              # keep the runs results.json already holds

The protocol of ``benchmarks/face_verification.py`` (its packing, training and
``biomtl eval`` steps are reused): an identity-disjoint split, final weights
scored, mean ± half-range over seeds. The data are the built-in synthetic faces
with ``--twin-style marked`` co-twins (a cheek mark, thicker brows, wider-set
eyes: docs/differences.md), 200 identities x 8 images at 64 px, half of them in
co-twin pairs, ``train=0.6,val=0.15,test=0.25`` by identity (co-twins stay
together), seed 0. Each model is trained from scratch three ways that differ
only in how the training batches are drawn:

* ``twin1``: P x K batches (8 identities x 4 images) with ``data.twin_prob=1``:
  each identity's co-twin joins its batch (the twin-aware hard negatives);
* ``twin0``: the same P x K batches with ``data.twin_prob=0``;
* ``random``: plain random batches (``data.batching=stream``).

Every run is scored on the val identities (what settings may be chosen on) and on
the test identities (the table); the test split is never used for a choice.
"Twin-impostor EER" is genuine pairs vs co-twin impostor pairs only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import face_verification as fv  # noqa: E402  (the protocol's packing, training and evaluation)

fv.PACK["twins"] = ["--format", "synthetic", "--identities", "200", "--samples", "8", "--size", "64",
                    "--twin-fraction", "0.5", "--twin-style", "marked", "--modalities", "vis",
                    "--splits", "train=0.6,val=0.15,test=0.25", "--split-by", "identity", "--seed", "0"]
ARMS = {"twin1": {"data.batching": "pk", "data.pk_k": 4, "data.twin_prob": 1.0},
        "twin0": {"data.batching": "pk", "data.pk_k": 4, "data.twin_prob": 0.0},
        "random": {"data.batching": "stream"}}
ARM_LABELS = {"twin1": "P x K, twin_prob=1", "twin0": "P x K, twin_prob=0", "random": "random batches"}
BASE_MODELS = {"cnn": 300, "dcal_cnn": 200}  # face_verification's models and their synthetic step counts
TARGET_EER, TARGET_GAIN = 0.30, 0.05  # issue 28: twin-impostor EER <= 30 % with twin1, >= 5 points below twin0


def register(model: str, arm: str, steps: int) -> str:
    """A face_verification model entry for one arm (its overrides + the arm's batching)."""
    key = f"{model}_{arm}"
    base = fv.MODELS[model]
    fv.MODELS[key] = dataclasses.replace(base, label=f"{base.label}; {ARM_LABELS[arm]}", steps={"twins": steps},
                                         overrides={**base.overrides, **ARMS[arm]}, per_dataset={})
    return key


def evaluate(row: dict[str, Any], data_dir: Path, out: Path, threads: int, split: str) -> dict[str, Any]:
    """``biomtl eval`` of the run's exported model on one split (a report folder per split)."""
    run_dir = Path(row["run"])
    report = run_dir / "eval" / split
    cpu, _ = fv.run_tool(["-m", "dist_train.cli", "eval", "--checkpoint", str(run_dir / "model.pt"), "--data",
                          str(data_dir), "--split", split, "--output", str(report), "--no-progress", "--device",
                          "cpu"], threads, out / "logs" / f"eval_{split}_{run_dir.name}.log")
    m = json.loads((report / "metrics.json").read_text())
    return {f"{split}_{k}": v for k, v in {**fv.flat_metrics(m["all_impostors"], m["twin_impostors"]),
                                            "eval_cpu_s": round(cpu, 1)}.items()}


def one_run(model: str, arm: str, seed: int, steps: int, data_dir: Path, out: Path, threads: int) -> dict[str, Any]:
    key = register(model, arm, steps)
    row = fv.train(key, "twins", data_dir, seed, steps, out, threads, None)
    row = {**row, "base_model": model, "arm": arm}
    for split in ("val", "test"):
        row.update(evaluate(row, data_dir, out, threads, split))
    return row


def table(rows: list[dict[str, Any]], baselines: dict[str, list[dict]], split: str) -> str:
    lines = [f"| model | batches | seeds | {split} EER % | {split} twin-impostor EER % | train CPU s per run | "
             "load avg before runs |", "|---|---|---|---|---|---|---|"]
    for b in baselines.get(split, []):
        lines.append(f"| {b['model']} (no training) | - | - | {fv.pct(b['eer'])} | {fv.pct(b['twin_eer'])} | 0 | - |")
    for model in BASE_MODELS:
        for arm in ARMS:
            rs = [r for r in rows if r["base_model"] == model and r["arm"] == arm]
            if not rs:
                continue
            loads = [r["load_before"] for r in rs]
            lines.append(f"| {fv.MODELS[model].label} | {ARM_LABELS[arm]} | {len(rs)} | "
                         f"{fv.mean_spread([r[f'{split}_eer'] for r in rs])} | "
                         f"{fv.mean_spread([r[f'{split}_twin_eer'] for r in rs])} | "
                         f"{np.mean([r['train_cpu_s'] for r in rs]):.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Each model's targets on the test split, said plainly (means over seeds)."""
    out = []
    for model in BASE_MODELS:
        mean = {arm: np.mean([r["test_twin_eer"] for r in rows if r["base_model"] == model and r["arm"] == arm])
                for arm in ARMS if any(r["base_model"] == model and r["arm"] == arm for r in rows)}
        if "twin1" not in mean or "twin0" not in mean:
            continue
        eer_ok, gain = mean["twin1"] <= TARGET_EER, mean["twin0"] - mean["twin1"]
        out.append(f"- {model}: twin-impostor EER with twin-aware batches {100 * mean['twin1']:.1f} % "
                   f"({'met' if eer_ok else 'NOT met'}: target <= {100 * TARGET_EER:.0f} %); "
                   f"{100 * gain:.1f} points better than twin_prob=0 "
                   f"({'met' if gain >= TARGET_GAIN else 'NOT met'}: target >= {100 * TARGET_GAIN:.0f})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=fv.REPO / "runs" / "twins_ab")
    ap.add_argument("--models", default=",".join(BASE_MODELS), help=f"of {', '.join(BASE_MODELS)}")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's steps")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per training run (default 1)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    ap.add_argument("--resume", action="store_true", help="keep the runs OUT/results.json already holds")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    arms = [a for a in args.arms.split(",") if a]
    for name, got, known in (("--models", models, BASE_MODELS), ("--arms", arms, ARMS)):
        bad = [x for x in got if x not in known]
        if bad:
            print(f"{name}: unknown {bad[0]!r} (known: {', '.join(known)})", file=sys.stderr)
            return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = {"load_avg": os.getloadavg(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = fv.pack("twins", out, False)
    baselines = {s: fv.run_baselines(data, s) for s in ("val", "test")}
    result: dict[str, Any] = {"command": " ".join(sys.argv), "started": started, "pack": fv.PACK["twins"],
                              "baselines": baselines, "runs": []}
    results_file = out / "results.json"
    if args.resume and results_file.is_file():
        result["runs"] = [r for r in json.loads(results_file.read_text())["runs"]
                          if Path(r["run"], "model.pt").is_file()]
    done = {(r["base_model"], r["arm"], r["seed"]) for r in result["runs"]}
    lock = threading.Lock()

    def finish(row: dict[str, Any]) -> None:
        with lock:
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            results_file.write_text(json.dumps(result, indent=1, default=float))

    steps = lambda m: max(10, int(round(BASE_MODELS[m] * args.steps_scale)))  # noqa: E731
    tasks = [(lambda m=m, a=a, s=s: one_run(m, a, s, steps(m), data, out, args.threads), finish)
             for m in sorted(models, key=lambda m: m != "dcal_cnn") for s in seeds for a in arms
             if (m, a, s) not in done]
    fv.run_parallel(tasks, args.jobs)
    rows = sorted(result["runs"], key=lambda r: (r["base_model"], r["arm"], r["seed"]))
    result["runs"] = rows
    result["total"] = {"wall_s": round(time.perf_counter() - t0, 1), "children_cpu_s": round(fv.cpu_children(), 1),
                       "load_avg_end": os.getloadavg()}
    result["verdict"] = verdict(rows)
    results_file.write_text(json.dumps(result, indent=1, default=float))
    text = "\n".join(["## Test identities", "", table(rows, baselines, "test"), "", "## Val identities", "",
                      table(rows, baselines, "val"), "", *result["verdict"], ""])
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
