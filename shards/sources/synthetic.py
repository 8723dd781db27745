"""``synthetic``: the built-in procedural dataset (:mod:`shards.synthetic`) through
the general ``create`` pipeline (splits, shard sizes, workers, report).

No ``--input``. Options: ``--identities``, ``--samples`` (per identity),
``--size`` (pixels), ``--twin-fraction``, ``--modalities vis,thz,maps``;
``--seed`` seeds both the generator and the split. Keys, fields and labels
are those of :func:`shards.synthetic.ensure_synthetic` datasets (``vis.png``,
``thz.png``, ``thz_target.png``, ``albedo/normal/depth.npy`` (float16),
``json`` with identity, gender, emotion, facial_hair, spectacles, posture,
concealed, twin), but the split follows ``--splits``/``--split-by``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import Field, InputError, Item, Scan, Source, array_stats


class SyntheticLoader:
    def __init__(self, spec):
        self.spec = spec

    def __call__(self, item: Item) -> dict[str, Any]:
        from ..synthetic import _sample_fields, render_sample
        from ..writer import encode_value

        r = render_sample(self.spec, item.payload["identity"], item.payload["index"])
        out: dict[str, Any] = {}
        for ext, value in _sample_fields(self.spec, r).items():
            if ext == "json":
                out["json"] = {k: v for k, v in value.items() if k not in ("identity", "identity_name", "twin")}
                continue
            data = encode_value(ext, value)
            if ext.endswith(".png"):
                out[ext] = Field(data, stats=array_stats(value.astype("float64") / 255.0),
                                 size=(value.shape[1], value.shape[0]))
            else:
                out[ext] = Field(data, stats=array_stats(value))
        return out


class SyntheticSource(Source):
    name = "synthetic"
    help = "the built-in procedural biometric dataset (no --input)"
    needs_input = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("synthetic options")
        g.add_argument("--identities", type=int, default=40, help="synthetic: identities (default 40)")
        g.add_argument("--samples", type=int, default=20, help="synthetic: samples per identity (default 20)")
        g.add_argument("--size", type=int, default=64, help="synthetic: image size in pixels (default 64)")
        g.add_argument("--twin-fraction", type=float, default=0.25, help="synthetic: fraction of identities in "
                                                                         "twin pairs (default 0.25)")
        g.add_argument("--modalities", default="vis,thz,maps", help="synthetic: subset of vis,thz,maps")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        from ..synthetic import LABEL_SCHEMAS, SyntheticSpec, _world, sample_key

        try:
            spec = SyntheticSpec(num_identities=int(args.identities), samples_per_identity=int(args.samples),
                                 twin_fraction=float(args.twin_fraction), image_size=int(args.size),
                                 modalities=tuple(m.strip() for m in str(args.modalities).split(",") if m.strip()),
                                 seed=int(args.seed or 0))
        except ValueError as e:
            raise InputError(f"synthetic: {e}") from None
        w = _world(spec)
        items = [Item(key=sample_key(i, k), identity=w.names[i], payload={"identity": i, "index": k},
                      origin=f"synthetic identity {i} sample {k}")
                 for i in range(spec.num_identities) for k in range(spec.samples_per_identity)]
        return Scan(items=items, schemas={k: list(v) for k, v in LABEL_SCHEMAS.items()},
                    twin_pairs=[(w.names[a], w.names[b]) for a, b in w.twin_pairs],
                    notes={"spec": spec.to_dict()}, loader=SyntheticLoader(spec))


SOURCE = SyntheticSource()
