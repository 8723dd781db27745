"""The synthetic many-identities mode (``--base-faces``, ``data.synthetic.base_faces``;
shards/synthetic/many.py): N identities x K images in the normal shard format, labels
0..N-1, deterministic from the seed, identities told apart by their pixels, fast, and
bad input refused in one line."""
from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pytest

from dist_train.config import ConfigError, load_config, synthetic_spec
from shards.cli import run as shards_cli
from shards.manifest import Manifest
from shards.reading import ShardReader, decode_sample, shards_of
from shards.synthetic import SyntheticSpec, _world, ensure_synthetic, render_sample, spec_hash
from shards.synthetic import many
from tests.conftest import REPO


def _create(out: Path, *extra: str, identities: int = 300, samples: int = 2, size: int = 16,
            base_faces: int = 16) -> int:
    return shards_cli(["create", "--format", "synthetic", "--output", str(out), "--identities", str(identities),
                       "--samples", str(samples), "--size", str(size), "--base-faces", str(base_faces),
                       "--workers", "1", "--no-progress", *extra])


def _samples(out: Path) -> dict[str, list[dict]]:
    m = Manifest.load(out)
    return {split: [decode_sample(s) for shard in shards_of(out, m, split) for s in ShardReader(shard, None)]
            for split in m.splits}


def _forget_caches() -> None:
    """What a fresh process would have: no drawn base faces, looks, noise or worlds."""
    for f in (many._base, many._base_spec, many._chunk, many._noise_bank, many._upsampler):
        f.cache_clear()
    from shards.synthetic import world

    world._WORLD_CACHE.clear()


def test_cli_writes_n_identities_by_k_images_labelled_0_to_n_minus_1_in_time(tmp_path, capsys):
    """The suite's tiny case: 2000 identities x 2 images at 16 px, packed and read back
    through shards/reading.py, in well under 10 s of CPU (this process's time: one packing
    worker runs in it; wall time on a loaded machine says little)."""
    out = tmp_path / "many"
    t0 = time.process_time()
    rc = _create(out, "--twin-fraction", "0", "--maxcount", "2000", identities=2000, size=16, base_faces=64)
    seconds = time.process_time() - t0
    assert rc == 0, capsys.readouterr().err
    m = Manifest.load(out)
    assert m.identities == [f"syn{i:05d}" for i in range(2000)]
    assert m.modalities == ["json", "vis.png"] and m.twin_pairs == []
    by_split = _samples(out)
    seen = collections.Counter()
    ids_of = {}
    for split, rows in by_split.items():
        ids_of[split] = {s["json"]["identity"] for s in rows}
        for s in rows:
            meta = s["json"]
            assert m.identities[meta["identity"]] == meta["identity_name"]
            assert s["__key__"].startswith(f"id{meta['identity']:05d}_s")
            assert s["vis.png"].size == (16, 16) and s["vis.png"].mode == "RGB"
            seen[meta["identity"]] += 1
    assert seen == {i: 2 for i in range(2000)}
    # --split-by identity (the default): val and test hold identities train never saw
    assert not ids_of["train"] & ids_of["val"] and not ids_of["train"] & ids_of["test"]
    assert not ids_of["val"] & ids_of["test"]
    assert seconds < 10, f"2000 x 2 at 16 px took {seconds:.1f} s of CPU"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    """Deterministic from the seed alone: a second build in a state like a fresh
    process's, and one with packing workers (forked processes that draw their own base
    faces), write the same shard bytes; another seed other bytes."""
    def hashes(out: Path) -> list[str]:
        return [e.sha256 for entries in Manifest.load(out).splits.values() for e in entries]

    assert _create(tmp_path / "a", "--seed", "3", identities=120, samples=3) == 0
    _forget_caches()
    assert _create(tmp_path / "b", "--seed", "3", identities=120, samples=3) == 0
    _forget_caches()
    workers = shards_cli(["create", "--format", "synthetic", "--output", str(tmp_path / "c"), "--identities", "120",
                          "--samples", "3", "--size", "16", "--base-faces", "16", "--workers", "2", "--seed", "3",
                          "--no-progress"])
    assert workers == 0
    assert _create(tmp_path / "d", "--seed", "4", identities=120, samples=3) == 0
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b") == hashes(tmp_path / "c")
    assert set(hashes(tmp_path / "a")).isdisjoint(hashes(tmp_path / "d"))


def test_an_identitys_images_are_closer_to_each_other_than_to_other_identities():
    """Pixel L2: within an identity well below between identities, also between two
    identities drawn on the same base face (only their transforms tell them apart:
    a mode that gave every identity of a base face the same look fails here), and the
    nearest image is mostly the identity's own (a model can learn the labels)."""
    spec = SyntheticSpec(num_identities=120, samples_per_identity=3, image_size=24, modalities=("vis",),
                         base_faces=4, twin_fraction=0.0)
    n, k = spec.num_identities, spec.samples_per_identity
    x = np.stack([[render_sample(spec, i, j)["vis"].astype(np.float64).ravel() for j in range(k)]
                  for i in range(n)])
    face = np.array([int(many.identity_look(spec, i)["face"]) for i in range(n)])
    intra = np.mean([np.linalg.norm(x[i, a] - x[i, b]) for i in range(n) for a in range(k) for b in range(a + 1, k)])
    d = np.linalg.norm(x[:, None, 0] - x[None, :, 1], axis=-1)  # image 0 of i to image 1 of j
    other = ~np.eye(n, dtype=bool)
    same_face = other & (face[:, None] == face[None, :])
    assert same_face.sum() > n  # the check below has pairs to look at
    assert intra < 0.7 * d[same_face].mean() and intra < 0.6 * d[other].mean()
    assert (d.argmin(axis=1) == np.arange(n)).mean() > 0.5  # chance: 1/120


def test_co_twins_share_the_face_and_differ_by_their_pattern():
    spec = SyntheticSpec(num_identities=40, samples_per_identity=2, image_size=24, modalities=("vis",), base_faces=8,
                         twin_fraction=0.5)
    w = _world(spec)
    assert len(w.twin_pairs) == 10 and not w.latents
    for a, b in w.twin_pairs:
        la, lb = many.identity_look(spec, a), many.identity_look(spec, b)
        assert la["face"] == lb["face"] and la["capture"] == lb["capture"]
        assert np.array_equal(la["gain"], lb["gain"]) and not np.array_equal(la["grid"], lb["grid"])
        ra, rb = render_sample(spec, a, 0), render_sample(spec, b, 0)
        assert ra["labels"]["twin"] == b and rb["labels"]["twin"] == a
        assert ra["labels"]["gender"] == rb["labels"]["gender"]


def test_an_identitys_look_does_not_depend_on_how_many_identities_there_are():
    small = SyntheticSpec(num_identities=50, samples_per_identity=2, image_size=16, modalities=("vis",),
                          base_faces=16, twin_fraction=0.0)
    large = SyntheticSpec(num_identities=5000, samples_per_identity=2, image_size=16, modalities=("vis",),
                          base_faces=16, twin_fraction=0.0)
    for i in (0, 7, 49):
        assert np.array_equal(render_sample(small, i, 1)["vis"], render_sample(large, i, 1)["vis"])


def test_the_normal_modes_datasets_keep_their_names():
    """base_faces=0 leaves every older spec's hash (its cache folder) and description as they were."""
    assert spec_hash(SyntheticSpec()) == "2318644e27ea"  # its value before base_faces existed
    assert "base_faces" not in SyntheticSpec().to_dict()
    assert SyntheticSpec(base_faces=8, modalities=("vis",)).to_dict()["base_faces"] == 8


@pytest.mark.parametrize("args, line", [
    (["--identities", "1"], "--identities: must be >= 2 in the many-identities mode, got 1"),
    (["--samples", "0"], "--samples: must be >= 1, got 0"),
    (["--size", "12"], "--size: must be >= 16, got 12"),
    (["--base-faces", "-1"], "--base-faces: must be >= 0 (0: every identity its own face), got -1"),
    (["--modalities", "vis,maps"], "--modalities: the many-identities mode draws only vis; got vis, maps"),
])
def test_bad_input_is_one_line_naming_the_option_exit_2_nothing_written(tmp_path, capsys, args, line):
    out = tmp_path / "out"
    rc = shards_cli(["create", "--format", "synthetic", "--output", str(out), "--base-faces", "8", "--identities",
                     "10", "--size", "16", "--workers", "1", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [f"biomtl shards create: error: {line}"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, line", [
    ("data.synthetic.base_faces=-1", "data.synthetic.base_faces: must be >= 0 (0: every identity its own face), got -1"),
    ("data.synthetic.num_identities=1", "data.synthetic.num_identities: must be >= 2 in the many-identities mode, "
                                        "got 1"),
    ("data.synthetic.image_size=8", "data.synthetic.image_size: must be >= 16, got 8"),
    ("data.synthetic.modalities=[vis,maps]", "data.synthetic.modalities: the many-identities mode draws only vis; "
                                             "got vis, maps"),
])
def test_config_settings_are_checked_by_the_generators_rules(override, line):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "facecom.yaml", ["data.synthetic.base_faces=8", override])
    assert str(info.value) == line


def test_a_config_makes_the_many_identities_data(tmp_path):
    """data.synthetic.base_faces reaches the generator: the cached set is the many-identities one."""
    cfg = load_config(REPO / "configs" / "facecom.yaml", [
        "data.synthetic.base_faces=8", "data.synthetic.num_identities=30", "data.synthetic.samples_per_identity=2",
        "data.synthetic.image_size=16", f"data.synthetic.cache_dir={tmp_path}"])
    spec = synthetic_spec(cfg)
    assert spec.base_faces == 8
    m = Manifest.load(ensure_synthetic(tmp_path, spec))
    assert m.created_with["spec"]["base_faces"] == 8 and len(m.identities) == 30
    assert sum(m.split_size(s) for s in m.splits) == 60 and m.modalities == ["json", "vis.png"]
