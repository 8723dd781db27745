"""``synthetic``: the built-in procedural dataset (:mod:`shards.synthetic`) through
the general ``create`` pipeline (splits, shard sizes, workers, report).

No ``--input``. Options: ``--identities``, ``--samples`` (per identity),
``--size`` (pixels), ``--twin-fraction``, ``--twin-style subtle|marked`` (how co-twins
differ: docs/differences.md), ``--modalities vis,thz,maps``,
``--base-faces B`` (the many-identities mode: B drawn faces, each identity one
of them under its own cheap transform, :mod:`shards.synthetic.many`; ``vis``
only, the default modalities then);
``--seed`` seeds both the generator and the split. Keys, fields and labels
are those of :func:`shards.synthetic.ensure_synthetic` datasets (``vis.png``,
``thz.png``, ``thz_target.png``, ``albedo/normal/depth.npy`` (float16),
``json`` with identity, gender, emotion, facial_hair, spectacles, posture,
concealed, twin), but the split follows ``--splits``/``--split-by``.

10^5 identities x 2 images for the identity-head benchmarks (shards/synthetic/many.py):
90 s of one core at 32 px; ``--workers 1``: the packing workers would each draw
the base faces again and ship every image back, which doubled the CPU time on a
2-core machine::

    biomtl shards create --format synthetic --output DIR --identities 100000 --samples 2 \\
        --size 32 --base-faces 256 --twin-fraction 0 --maxcount 10000 --workers 1

(``--splits train=1``: every identity's images in training, a closed set; the
default identity-disjoint ``train=0.8,val=0.1,test=0.1`` trains 80 % of them.)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import Field, InputError, Item, Scan, Source, array_stats


# SyntheticSpec field -> the option that sets it (a bad value's one line names the option)
_OPTION = {"num_identities": "--identities", "samples_per_identity": "--samples", "image_size": "--size",
           "twin_fraction": "--twin-fraction", "modalities": "--modalities", "base_faces": "--base-faces",
           "twin_style": "--twin-style", "seed": "--seed"}


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
        g.add_argument("--twin-style", default="subtle", choices=("subtle", "marked"),
                       help="synthetic: how co-twins differ: subtle (default; sub-pixel, mirrored parting) or marked "
                            "(a cheek mole, thicker brows, wider-set eyes: docs/differences.md)")
        g.add_argument("--modalities", default=None, help="synthetic: subset of vis,thz,maps (default vis,thz,maps; "
                                                          "vis with --base-faces)")
        g.add_argument("--base-faces", type=int, default=0, metavar="B",
                       help="synthetic: many-identities mode: draw B base faces and make each identity one of them "
                            "under its own colour/offset/pattern transform (fast: 10^5 identities x 2 in ~90 s of one "
                            "core at 32 px, with --workers 1; vis only); 0 (default): every identity drawn as its own face")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        from ..synthetic import LABEL_SCHEMAS, SpecError, SyntheticSpec, _world, sample_key

        base_faces = int(args.base_faces or 0)
        modalities = args.modalities if args.modalities is not None else ("vis" if base_faces else "vis,thz,maps")
        try:
            spec = SyntheticSpec(num_identities=int(args.identities), samples_per_identity=int(args.samples),
                                 twin_fraction=float(args.twin_fraction), image_size=int(args.size),
                                 modalities=tuple(m.strip() for m in str(modalities).split(",") if m.strip()),
                                 seed=int(args.seed or 0), base_faces=base_faces,
                                 twin_style=str(getattr(args, "twin_style", "subtle")))
        except SpecError as e:
            raise InputError(f"{_OPTION.get(e.field, e.field)}: {e.reason}") from None
        w = _world(spec)
        items = [Item(key=sample_key(i, k), identity=w.names[i], payload={"identity": i, "index": k},
                      origin=f"synthetic identity {i} sample {k}")
                 for i in range(spec.num_identities) for k in range(spec.samples_per_identity)]
        return Scan(items=items, schemas={k: list(v) for k, v in LABEL_SCHEMAS.items()},
                    twin_pairs=[(w.names[a], w.names[b]) for a, b in w.twin_pairs],
                    notes={"spec": spec.to_dict()}, loader=SyntheticLoader(spec))


SOURCE = SyntheticSource()
