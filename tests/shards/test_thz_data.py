"""What the THz recipes read: the synthetic THz / visible modalities (new ones
added without changing the old ones' bytes) and the ``thz`` source's samples."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import Manifest
from shards.reading import decode_sample
from shards.synthetic import MODALITIES, SyntheticSpec, _sample_fields, _sample_params, ensure_synthetic, render_sample

SPEC = SyntheticSpec(num_identities=6, image_size=24, twin_fraction=0.5, seed=3)
SAMPLES = [(0, 0), (1, 3), (2, 1), (4, 5), (5, 2)]
# sha256 of vis, thz, thz_target (uint8) of SAMPLES, computed with the generator as it
# was before thz_dense / vis_target existed (commit 846ed3c): older outputs must not move.
GOLDEN = "ea1ea8083c7b2e4d2a0125dbf38987c301a465f41a5e4bd69ea0ed9733be03ef"


def test_existing_modalities_are_byte_identical_to_before():
    h = hashlib.sha256()
    for i, k in SAMPLES:
        r = render_sample(SPEC, i, k)
        for key in ("vis", "thz", "thz_target"):
            h.update(np.ascontiguousarray(r[key]).tobytes())
    assert h.hexdigest() == GOLDEN


def _concealed_and_not(spec: SyntheticSpec, identity: int = 0) -> tuple[int, int]:
    flags = {k: _sample_params(spec, identity, k)["concealed"] for k in range(20)}
    return next(k for k, c in flags.items() if c), next(k for k, c in flags.items() if not c)


def test_dense_fabric_hides_much_more_than_thin_fabric_and_never_the_target():
    spec = SyntheticSpec(num_identities=4, image_size=32, seed=1)
    diffs_thin, diffs_dense = [], []
    for i in range(4):
        kc, ku = _concealed_and_not(spec, i)
        c, u = render_sample(spec, i, kc), render_sample(spec, i, ku)
        diffs_thin.append(np.abs(c["thz"].astype(int) - c["thz_target"]).mean())
        diffs_dense.append(np.abs(c["thz_dense"].astype(int) - c["thz_target"]).mean())
        assert np.array_equal(u["thz_dense"], u["thz_target"]) and np.array_equal(u["thz"], u["thz_target"])
        assert np.array_equal(u["vis_target"], u["vis"])
        # the unconcealed visible twin differs only where the concealment is: the lower face
        rows = np.flatnonzero((c["vis_target"] != c["vis"]).any(axis=(1, 2)))
        assert rows.size and rows.min() >= 32 * 0.4
    assert np.mean(diffs_dense) > 4 * np.mean(diffs_thin)


def test_modalities_choose_the_fields():
    r = render_sample(SPEC, 0, 0)
    both = _sample_fields(SyntheticSpec(modalities=("thz_dense", "vis", "vis_target")), r)
    assert set(both) == {"json", "thz.png", "thz_target.png", "vis.png", "vis_target.png"}
    assert np.array_equal(both["thz.png"], r["thz_dense"]) and np.array_equal(both["vis_target.png"], r["vis_target"])
    thin = _sample_fields(SyntheticSpec(modalities=("thz",)), r)
    assert set(thin) == {"json", "thz.png", "thz_target.png"} and np.array_equal(thin["thz.png"], r["thz"])
    assert set(MODALITIES) == {"vis", "vis_target", "thz", "thz_dense", "maps", "ear"}
    with pytest.raises(ValueError, match="both write thz.png"):
        SyntheticSpec(modalities=("thz", "thz_dense"))
    with pytest.raises(ValueError, match="vis_target"):
        SyntheticSpec(modalities=("radar",))


def _members(root: Path) -> dict[str, dict]:
    import tarfile

    out: dict[str, dict] = {}
    for tar in sorted(root.glob("*/*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_built_dataset_carries_the_thz_fields_and_old_members_keep_their_bytes(tmp_path):
    base = dict(num_identities=4, samples_per_identity=3, image_size=16, seed=5, maxcount=50)
    new = ensure_synthetic(tmp_path, SyntheticSpec(modalities=("thz_dense", "vis", "vis_target"), **base))
    old = ensure_synthetic(tmp_path, SyntheticSpec(modalities=("vis",), **base))
    m = Manifest.load(new)
    assert m.modalities == ["json", "thz.png", "thz_target.png", "vis.png", "vis_target.png"]
    a, b = _members(new), _members(old)
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:
        assert a[key]["vis.png"] == b[key]["vis.png"] and a[key]["json"] == b[key]["json"]
        s = decode_sample({"__key__": key, **{k: v for k, v in a[key].items()}})
        assert s["thz.png"].mode == "L" and s["vis_target.png"].mode == "RGB"
        assert {"identity", "posture", "concealed", "twin"} <= set(s["json"])


def test_thz_source_records_the_target_posture(tmp_path):
    from shards.build import create
    from tests.shards.test_sources import make_thz, samples_of

    raw = make_thz(tmp_path / "thz")
    r = create("thz", raw, tmp_path / "out", split_by="sample", splits="train=1")
    # make_thz pairs b<p>b with n<p>n, except its row p1_b5b_99 (positive p1_n2n_02; its anchor file is missing)
    assert r.manifest.created_with["notes"]["target_posture_differs"] == 1
    s = {x["__key__"]: x for x in samples_of(tmp_path / "out")}
    assert s["p2_b3b_02"]["json"]["target_posture"] == 2 == s["p2_b3b_02"]["json"]["posture"]
