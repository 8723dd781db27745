"""Streaming from where shards live: samples/s of ``shards.stream.build_train_loader``
(one DataLoader worker, the 8-bit hand-off the recipes use) from the local
folder, from a loopback HTTP server (Python's ``http.server``, threaded) and
from moto's S3 server on loopback (s3fs), same shards, same augmentation as
``benchmarks/data_throughput.py``; best of ``--repeats`` runs of at least
``--seconds``, the three interleaved. Loopback leaves the network out: what
is measured is the cost of the remote reading path (HTTP parsing, s3fs, the
server in this same machine's CPUs) against reading a file.

    python benchmarks/remote_throughput.py [--size 112] [--identities 40] [--samples 10] [--maxcount 100]
                                           [--seconds 3] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_throughput import BATCH, Augment, _compare  # noqa: E402

from shards.cli import run as shards_run  # noqa: E402
from shards.stream import build_train_loader  # noqa: E402


class VisAugment(Augment):
    """data_throughput's augmentation on the synthetic faces' ``vis.png``."""

    def __call__(self, sample: dict, train: bool = True) -> dict:
        return {"image": self.image(sample["vis.png"]), "identity": sample["json"]["identity"]}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _http(folder: Path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def _s3(folder: Path):
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for f in folder.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "bench", f"shards/{f.relative_to(folder)}")
    return srv, "s3://bench/shards"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--maxcount", type=int, default=100, help="samples per shard")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="remote-bench-") as tmp:
        data = Path(tmp) / "syn"
        if shards_run(["create", "--format", "synthetic", "--output", str(data), "--identities", str(args.identities),
                       "--samples", str(args.samples), "--size", str(args.size), "--splits", "train=1",
                       "--split-by", "sample", "--maxcount", str(args.maxcount), "--no-progress"]) != 0:
            return 1
        http_srv, http_url = _http(data)
        s3_srv, s3_url = _s3(data)
        aug = VisAugment((args.size, args.size), pixels=True)
        epoch = iter(range(10 ** 9))

        def stream(where):
            return lambda: build_train_loader(where, "train", aug, BATCH, 0, 1, 1, seed=0, epoch=next(epoch),
                                              shuffle_buffer=256)

        try:
            best = _compare({"local": stream(data), "http": stream(http_url), "s3": stream(s3_url)},
                            args.seconds, args.repeats)
        finally:
            http_srv.shutdown()
            s3_srv.stop()
    n = args.identities * args.samples
    print(f"{n} samples ({args.size}x{args.size} PNG), {-(-n // args.maxcount)} shards, 1 worker, batch {BATCH}; "
          "steady samples/s (whole epochs), samples per CPU-s of this process + workers")
    for k, (whole, steady, per_cpu) in best.items():
        rel = steady / best["local"][1]
        print(f"  {k:5s} {steady:7.0f} ({whole:6.0f})  {per_cpu:6.0f}/CPU-s  {rel:5.0%} of local")
    if args.json:
        Path(args.json).write_text(json.dumps({k: dict(zip(("whole", "steady", "per_cpu_s"), v))
                                               for k, v in best.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
