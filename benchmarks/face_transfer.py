"""Carry to faces never seen (issue 28, point 3): models fine-tuned on one real face set, scored on
the other one's test identities without any training on it, against the no-training baselines
fitted on the training set's images.

    python benchmarks/face_transfer.py --runs OUT/results.json        # a face_verification.py OUT
    python benchmarks/face_transfer.py --runs OUT/results.json --out runs/face_transfer

``--runs`` is the ``results.json`` of a ``benchmarks/face_verification.py`` run over
``--datasets orl,cmu`` (its packed shards under ``OUT/shards`` are reused). Every run trained on
ORL is scored by ``biomtl eval`` on CMU's test split (5 identities, 159 images, the same pairs as
CMU's own table) and every run trained on CMU on ORL's test split (10 identities, 100 images);
the reports go to ``RUN/eval/transfer_<set>/``. Baselines: raw pixels centred on the *training*
set's mean image, Eigenfaces and Fisherfaces fitted on the training set's images (grey, 32x32),
applied to the other set's test images. The table and ``transfer.json`` go to ``--out``; the
in-domain EER of each run is listed beside (from ``--runs``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import face_verification as fv  # noqa: E402  (the protocol, the baselines and the eval call)

OTHER = {"orl": "cmu", "cmu": "orl"}


def baselines(train_dir: Path, test_dir: Path) -> list[dict[str, Any]]:
    train, test = fv.split_images(train_dir, "train"), fv.split_images(test_dir, "test")
    return [{"model": name, **fv.verification_metrics(
        {**test, "embedding": fv.baseline_embeddings(name, train["embedding"], train["identity"], test["embedding"])})}
        for name in fv.BASELINES]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="results.json of benchmarks/face_verification.py")
    ap.add_argument("--out", type=Path, default=fv.REPO / "runs" / "face_transfer")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not args.runs.is_file():
        print(f"--runs: no such file: {args.runs}", file=sys.stderr)
        return 2
    src = json.loads(args.runs.read_text())
    shards = args.runs.parent / "shards"
    data = {d: shards / d for d in OTHER if (shards / d / "manifest.json").is_file()}
    if set(data) != set(OTHER):
        print(f"--runs: {shards} lacks packed orl and cmu shards (run face_verification.py --datasets orl,cmu)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = {"load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(sys.argv), "runs_from": src.get("command"), "started": started,
                              "baselines": {}, "runs": []}
    for trained, scored in OTHER.items():
        result["baselines"][f"{trained}->{scored}"] = baselines(data[trained], data[scored])
    for row in src.get("runs", []):
        if row["dataset"] not in OTHER or not Path(row["run"], "model.pt").is_file():
            continue
        scored = OTHER[row["dataset"]]
        moved = fv.evaluate({k: row[k] for k in ("model", "dataset", "seed", "run", "train_cpu_s", "load_before")},
                            data[scored], args.out, args.threads, report_name=f"transfer_{scored}")
        moved.update({"scored_on": scored, "in_domain_eer": row["eer"]})
        result["runs"].append(moved)
        print(json.dumps(moved), flush=True)
        (args.out / "transfer.json").write_text(json.dumps(result, indent=1, default=float))
    result["total"] = {"wall_s": round(time.perf_counter() - t0, 1), "children_cpu_s": round(fv.cpu_children(), 1),
                       "load_avg_end": os.getloadavg()}
    (args.out / "transfer.json").write_text(json.dumps(result, indent=1, default=float))
    text = table(result) + "\n"
    (args.out / "transfer.md").write_text(text)
    print(text)
    return 0


def table(result: dict[str, Any]) -> str:
    lines = ["| trained on -> scored on (test ids) | model | seeds | EER % there | TAR@FAR=1e-2 % | AUC % "
             "| EER % on its own set |", "|---|---|---|---|---|---|---|"]
    for trained, scored in OTHER.items():
        where = f"{trained.upper()} -> {scored.upper()} ({'5' if scored == 'cmu' else '10'})"
        for b in result["baselines"][f"{trained}->{scored}"]:
            lines.append(f"| {where} | {b['model']} (fitted on {trained.upper()} train) | - | {fv.pct(b['eer'])} | "
                         f"{fv.pct(b['tar_at_far_1e-2'])} | {fv.pct(b['auc'])} | - |")
        for key in fv.MODELS:
            rs = [r for r in result["runs"] if r["dataset"] == trained and r["model"] == key]
            if rs:
                lines.append(f"| {where} | {fv.MODELS[key].label} | {len(rs)} | "
                             f"{fv.mean_spread([r['eer'] for r in rs])} | "
                             f"{fv.mean_spread([r['tar_at_far_1e-2'] for r in rs])} | "
                             f"{fv.mean_spread([r['auc'] for r in rs])} | "
                             f"{fv.mean_spread([r['in_domain_eer'] for r in rs])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
