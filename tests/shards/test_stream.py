"""Tests of shards/: manifest, writer, synthetic data, train/eval streams."""
from __future__ import annotations

import io
import itertools
import os
import json
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from shards.manifest import Manifest, ShardEntry, file_sha256
from shards.stream import build_eval_loader, build_train_loader
from shards.synthetic import (LABEL_SCHEMAS, SyntheticSpec, _sample_params, _world, ensure_synthetic,
                              render_sample, split_plan)
from shards.writer import ShardSplitWriter, check_key

SMALL = SyntheticSpec(num_identities=8, samples_per_identity=6, twin_fraction=0.5, image_size=32,
                      seed=1, maxcount=10)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make_dataset(root: Path, counts: list[int], split: str = "train", bad: dict[int, set[int]] | None = None,
                 size: int = 8) -> Path:
    """A tiny dataset: one shard per entry of ``counts``; sample n has a size x size
    PNG whose pixels encode n, ``x.npy`` and ``json`` {"idx": n}. ``bad[shard]`` =
    positions in that shard whose PNG bytes are garbage."""
    bad = bad or {}
    root.mkdir(parents=True, exist_ok=True)
    entries: list[ShardEntry] = []
    n = 0
    for si, c in enumerate(counts):
        with ShardSplitWriter(root, split, maxcount=10 ** 6, start_index=si) as w:
            for j in range(c):
                img = np.full((size, size, 3), n % 256, np.uint8)
                img[0, 0] = [n // 256, 7, 9]
                w.write({"__key__": f"s{n:05d}",
                         "vis.png": b"this is not a png" if j in bad.get(si, ()) else img,
                         "x.npy": np.array([n], np.float32), "json": {"idx": n}})
                n += 1
        entries += w.close()
    Manifest(splits={split: entries}, identities=[f"p{i}" for i in range(3)],
             label_schemas={"idx": ["x"]}, modalities=["json", "vis.png", "x.npy"]).save(root)
    return root


def tf_noise(sample, train):
    """A transform with random augmentation from all three global RNGs."""
    x = torch.from_numpy(np.asarray(sample["vis.png"], np.float32)[..., 0] / 255.0)
    if train:
        x = x + torch.rand(x.shape) + float(np.random.rand()) + random.random()
    return {"x": x, "idx": sample["json"]["idx"], "npy": torch.from_numpy(sample["x.npy"])}


def tf_plain(sample, train):
    return {"idx": sample["json"]["idx"]}


def truncate_mid_sample(path: Path, sample_index: int) -> None:
    """Cut a tar in the middle of the first member of sample ``sample_index``."""
    with tarfile.open(path) as t:
        members = t.getmembers()
    keys = []
    for m in members:
        k = m.name.split(".", 1)[0]
        if not keys or keys[-1][0] != k:
            keys.append((k, m.offset))
    cut = keys[sample_index][1] + 700  # inside header+data of that member
    data = path.read_bytes()[:cut]
    path.write_bytes(data)


def batches_equal(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), SMALL)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("uneven"), [10, 3, 25])


# ---------------------------------------------------------------------------
# manifest and writer
# ---------------------------------------------------------------------------
def test_manifest_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Manifest.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Manifest.load(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a biomtl shard manifest"):
        Manifest.load(tmp_path)


def test_manifest_roundtrip_and_atomic_save(tmp_path):
    m = Manifest(splits={"train": [ShardEntry("train/shard-000000.tar", 3, 100, "ab")]},
                 identities=["a", "b"], twin_pairs=[(0, 1)], label_schemas={"g": ["f", "m"]},
                 modalities=["vis.png"], image_stats={"vis.png": {"mean": [0.5]}})
    m.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left
    m2 = Manifest.load(tmp_path)
    assert m2 == m
    assert m2.split_size("train") == 3
    info = m2.data_info()
    assert info.num_identities == 2 and info.twin_pairs == ((0, 1),) and info.split_sizes == {"train": 3}
    assert info.label_schemas["g"] == ("f", "m")
    with pytest.raises(KeyError, match="val"):
        m2.split_size("val")


def test_writer_rollover_and_keys(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        check_key("a.b")
    with ShardSplitWriter(tmp_path, "train", maxcount=4) as w:
        for i in range(10):
            w.write({"__key__": f"k{i}", "json": {"i": i}, "a.npy": np.arange(3)})
        with pytest.raises(ValueError, match="duplicate"):
            w.write({"__key__": "k0", "json": {}})
    entries = w.close()
    assert [e.count for e in entries] == [4, 4, 2]
    assert [e.file for e in entries] == [f"train/shard-00000{i}.tar" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    for e in entries:
        assert file_sha256(tmp_path / e.file) == e.sha256
        assert (tmp_path / e.file).stat().st_size == e.bytes
    # maxsize rollover
    with ShardSplitWriter(tmp_path, "big", maxcount=100, maxsize=5000) as w:
        for i in range(6):
            w.write({"__key__": f"k{i}", "x.npy": np.zeros(500, np.uint8)})
    assert len(w.close()) > 1


# ---------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------
def test_synthetic_deterministic(tmp_path, syn):
    again = ensure_synthetic(tmp_path, SMALL)
    assert again.name == syn.name
    m1, m2 = Manifest.load(syn), Manifest.load(again)
    assert m1.splits == m2.splits  # same files, counts, sizes, sha256
    for e in itertools.chain.from_iterable(m1.splits.values()):
        assert (syn / e.file).read_bytes() == (again / e.file).read_bytes()
    a = render_sample(SMALL, 3, 2)
    b = render_sample(dataclass_replace(SMALL, seed=2), 3, 2)
    assert not np.array_equal(a["vis"], b["vis"])
    assert ensure_synthetic(tmp_path, SMALL) == again  # second call reuses it
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.integration
def test_ensure_synthetic_recovers_from_crashes(tmp_path):
    import socket

    from shards.synthetic import spec_hash

    spec = dataclass_replace(SMALL, num_identities=2, samples_per_identity=3)
    name = f"synthetic-{spec_hash(spec)}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "half.tar").write_bytes(b"x")  # a crashed non-atomic writer's leftover
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".{name}.tmp-{socket.gethostname()}-{dead.pid}-1"
    stale.mkdir()
    out = ensure_synthetic(tmp_path, spec)
    assert out == tmp_path / name and Manifest.load(out).verify(out) == []
    assert not (out / "half.tar").exists() and not stale.exists()


def dataclass_replace(spec, **kw):
    import dataclasses

    return dataclasses.replace(spec, **kw)


def test_render_sample_contents():
    r = render_sample(SMALL, 0, 0)
    S = SMALL.image_size
    assert r["vis"].shape == (S, S, 3) and r["vis"].dtype == np.uint8
    assert r["thz"].shape == (S, S) and r["thz_target"].shape == (S, S)
    assert r["albedo"].shape == (S, S, 3) and r["depth"].shape == (S, S)
    np.testing.assert_allclose(np.linalg.norm(r["normal"], axis=-1), 1.0, atol=1e-4)
    assert r["depth"].max() > 0 and r["depth"][0, 0] == 0  # head in front of the background
    lab = r["labels"]
    assert set(lab) == {"identity", "identity_name", "gender", "emotion", "facial_hair", "spectacles",
                        "posture", "concealed", "twin"}
    for k, names in LABEL_SCHEMAS.items():
        assert 0 <= lab[k] < len(names)
    # concealment changes the THz image only a little and never the THz target
    for k in range(30):
        if _sample_params(SMALL, 0, k)["concealed"]:
            c = render_sample(SMALL, 0, k)
            d = np.abs(c["thz"].astype(int) - c["thz_target"].astype(int))
            assert 0 < d.mean() < 12
            break
    else:
        pytest.fail("no concealed sample")


def test_twins_more_similar_than_random_pairs():
    spec = SyntheticSpec(num_identities=12, twin_fraction=0.5, image_size=32, seed=3)
    w = _world(spec)
    assert len(w.twin_pairs) == 3

    def by_posture(i):  # unconcealed sample per posture, so the pairs are comparable
        out = {}
        for k in range(80):
            sp = _sample_params(spec, i, k)
            if not sp["concealed"] and sp["posture"] not in out:
                out[sp["posture"]] = render_sample(spec, i, k)["vis"].astype(np.float32)
        assert len(out) == 5
        return out

    F = {i: by_posture(i) for i in range(12)}

    def dist(a, b):
        return np.mean([np.sqrt(((F[a][p] - F[b][p]) ** 2).mean()) for p in range(5)])

    twin = [dist(a, b) for a, b in w.twin_pairs]
    other = [dist(a, b) for a, b in itertools.combinations(range(12), 2) if w.twins[a] != b]
    assert np.mean(twin) < 0.9 * np.mean(other)
    for a, b in w.twin_pairs:
        assert w.latents[a]["gender"] == w.latents[b]["gender"]
        assert w.twins[a] == b and w.twins[b] == a


def test_synthetic_manifest_complete(syn):
    m = Manifest.load(syn)
    assert set(m.splits) == {"train", "val", "test"}
    n = SMALL.num_identities * SMALL.samples_per_identity
    assert sum(m.split_size(s) for s in m.splits) == n
    assert m.identities == [f"syn{i:05d}" for i in range(SMALL.num_identities)]
    assert len(m.twin_pairs) == 2 and all(a < b for a, b in m.twin_pairs)
    assert set(m.label_schemas) == {"gender", "emotion", "facial_hair", "spectacles", "posture", "concealed"}
    assert m.modalities == sorted(["vis.png", "thz.png", "thz_target.png", "albedo.npy", "normal.npy",
                                   "depth.npy", "json"])
    assert set(m.image_stats) >= {"vis.png", "thz.png", "depth.npy"} and len(m.image_stats["vis.png"]["mean"]) == 3
    assert m.verify(syn) == []
    assert m.created_with["spec"]["seed"] == SMALL.seed
    # split_by="sample": every identity appears in every split (closed set)
    for split in m.splits:
        ids = set()
        for s in wds.WebDataset([str(syn / e.file) for e in m.splits[split]], shardshuffle=False).decode():
            ids.add(s["json"]["identity"])
        assert ids == set(range(SMALL.num_identities)), split


def test_split_by_identity_keeps_twins_together():
    spec = dataclass_replace(SMALL, num_identities=20, split_by="identity")
    plan = split_plan(spec)
    ids = {s: {i for i, _ in items} for s, items in plan.items()}
    assert all(ids.values())
    for a, b in itertools.combinations(ids, 2):
        assert not ids[a] & ids[b]
    assert set().union(*ids.values()) == set(range(20))
    for a, b in _world(spec).twin_pairs:
        assert any(a in v and b in v for v in ids.values())
    assert sum(len(v) for v in plan.values()) == 20 * spec.samples_per_identity


def test_stock_webdataset_and_tar_read_every_shard(syn):
    m = Manifest.load(syn)
    for split, entries in m.splits.items():
        urls = [str(syn / e.file) for e in entries]
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        assert len(samples) == m.split_size(split)
        for s in samples:
            assert "." not in s["__key__"]
            assert set(k for k in s if not k.startswith("__")) == set(m.modalities)
            labels = json.loads(s["json"])
            assert s["__key__"] == f"id{labels['identity']:05d}_s{s['__key__'][-4:]}"
            arr = np.load(io.BytesIO(s["normal.npy"]), allow_pickle=False)
            assert arr.dtype == np.float16 and arr.shape == (32, 32, 3)
        for e in entries:
            out = subprocess.run(["tar", "tf", str(syn / e.file)], capture_output=True, text=True, check=True)
            names = out.stdout.split()
            assert len(names) == e.count * len(m.modalities)
            assert all(n.split(".", 1)[1] in m.modalities for n in names)


# ---------------------------------------------------------------------------
# train stream
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_equal_batches_uneven_shards(uneven, num_workers):
    # 38 samples, batch 4, 2 ranks -> 4 batches per rank; 3 shards < 4 slots with 2 workers
    counts = []
    for rank in range(2):
        L = build_train_loader(uneven, "train", tf_plain, 4, rank, 2, num_workers, seed=0, epoch=0)
        assert len(L) == 38 // 8
        bs = list(L)
        counts.append(len(bs))
        assert all(b["idx"].shape == (4,) for b in bs)
        assert L.corrupt_count() == 0
    assert counts == [4, 4]


def test_train_equal_batches_shard_level(tmp_path):
    d = make_dataset(tmp_path, [7, 1, 2, 12, 5])  # 5 shards >= 2 ranks x 2 workers
    for rank in range(2):
        L = build_train_loader(d, "train", tf_plain, 3, rank, 2, 2, seed=5, epoch=1)
        assert len(list(L)) == len(L) == 27 // 6


def test_train_one_shard_sample_level_split(tmp_path):
    d = make_dataset(tmp_path, [25])
    keys = []
    for rank in range(2):
        L = build_train_loader(d, "train", tf_plain, 1, rank, 2, 2, seed=0, epoch=0)
        assert len(L) == 12
        bs = list(L)
        assert len(bs) == 12
        keys += [k for b in bs for k in b["__key__"]]
    # every (rank, worker) slot keeps different samples: 24 distinct of 25
    assert len(keys) == 24 and len(set(keys)) == 24


def test_train_more_slots_than_samples(tmp_path):
    d = make_dataset(tmp_path, [3])
    for rank in range(2):
        L = build_train_loader(d, "train", tf_plain, 4, rank, 2, 2, seed=0, epoch=0)
        bs = list(L)
        assert len(L) == 1 and len(bs) == 1 and bs[0]["idx"].shape == (4,)


def test_shard_order_per_epoch_same_on_all_ranks(tmp_path):
    d = make_dataset(tmp_path, [2] * 8)

    def assignment(epoch):
        out = {}
        for rank in range(2):
            L = build_train_loader(d, "train", tf_plain, 2, rank, 2, 2, seed=7, epoch=epoch)
            for w in range(2):
                shards, mode, _, _ = L.plan.slot_shards(w)
                assert mode == "shard"
                out[(rank, w)] = [s.name for s in shards]
        return out

    e0, e0b, e1 = assignment(0), assignment(0), assignment(1)
    assert e0 == e0b
    # a partition of all shards: ranks computed the same global order
    flat = [s for v in e0.values() for s in v]
    assert sorted(flat) == sorted(f"train/shard-{i:06d}.tar" for i in range(8)) and len(set(flat)) == 8
    assert e0 != e1
    # and the data a rank sees differs between epochs
    k0 = [k for b in build_train_loader(d, "train", tf_plain, 2, 0, 2, 0, seed=7, epoch=0) for k in b["__key__"]]
    k1 = [k for b in build_train_loader(d, "train", tf_plain, 2, 0, 2, 0, seed=7, epoch=1) for k in b["__key__"]]
    assert k0 != k1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exact_tail(uneven, num_workers):
    def run(skip, rank=0):
        return list(build_train_loader(uneven, "train", tf_noise, 2, rank, 2, num_workers, seed=3, epoch=2,
                                       skip_batches=skip, shuffle_buffer=16))

    full = run(0)
    assert len(full) == 38 // 4
    assert not torch.equal(full[0]["x"], full[1]["x"])
    again = run(0)
    assert all(batches_equal(a, b) for a, b in zip(full, again))
    for k in (1, 4, len(full) - 1, len(full)):
        tail = run(k)
        assert len(tail) == len(full) - k
        assert all(batches_equal(a, b) for a, b in zip(full[k:], tail)), k


def test_augmentation_is_a_function_of_seed_epoch_key(uneven):
    def noise_by_key(batch_size, epoch, num_workers=0):
        out = {}
        L = build_train_loader(uneven, "train", tf_noise, batch_size, 0, 1, num_workers, seed=3, epoch=epoch)
        for b in L:
            for k, x in zip(b["__key__"], b["x"]):
                out[k] = x - x[1, 1]  # the clean image is constant but for pixel (0, 0)
        return out

    a, b, c = noise_by_key(2, 0), noise_by_key(5, 0), noise_by_key(2, 1)
    assert len(a) == 38 and len(b) == 35  # one pass each: every key met once
    assert all(torch.equal(a[k], b[k]) for k in b)  # other batches, same augmentation per key
    assert not any(torch.equal(a[k], c[k]) for k in a)  # another epoch: another augmentation


def test_resume_does_not_decode_skipped_samples(uneven):
    calls = []

    def tf(sample, train):
        calls.append(sample["__key__"])
        return tf_plain(sample, train)

    L = build_train_loader(uneven, "train", tf, 2, 0, 1, 0, seed=0, epoch=0, skip_batches=10)
    assert len(list(L)) == len(L) - 10 == 9
    assert len(calls) == 9 * 2


def test_train_loader_pickles_and_runs_in_spawned_workers(uneven):
    import pickle

    L = build_train_loader(uneven, "train", tf_noise, 4, 1, 2, 1, seed=0, epoch=0)
    a = list(L)
    b = list(pickle.loads(pickle.dumps(L)))
    # one spawned worker (a fresh interpreter: everything it gets must pickle)
    c = list(build_train_loader(uneven, "train", tf_noise, 4, 1, 2, 1, seed=0, epoch=0, mp_context="spawn"))
    assert len(a) == len(b) == len(c) == 4
    assert all(batches_equal(x, y) and batches_equal(x, z) for x, y, z in zip(a, b, c))


def test_train_in_process_leaves_global_rng_alone(uneven):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_train_loader(uneven, "train", tf_noise, 4, 0, 1, 0, seed=0, epoch=0))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------
# eval stream
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_every_sample_once(uneven, num_workers):
    valid_keys, nb = [], []
    for rank in range(3):
        L = build_eval_loader(uneven, "train", tf_noise, 4, rank, 3, num_workers=num_workers)
        bs = list(L)
        nb.append(len(bs))
        assert len(bs) == len(L)
        for b in bs:
            assert b["_valid"].dtype == torch.bool and isinstance(b["__key__"], list)
            valid_keys += [k for k, v in zip(b["__key__"], b["_valid"].tolist()) if v]
            idx = b["idx"][b["_valid"]]
            assert all(i % 3 == rank for i in idx.tolist())  # rank r gets i % world == r
    assert nb == [4, 4, 4]  # ceil(ceil(38 / 3) / 4)
    assert sorted(valid_keys) == [f"s{n:05d}" for n in range(38)]


def test_eval_fixed_order_and_no_augmentation(uneven):
    a = list(build_eval_loader(uneven, "train", tf_noise, 5, 2, 3, num_workers=0))
    b = list(build_eval_loader(uneven, "train", tf_noise, 5, 2, 3, num_workers=2))
    assert all(batches_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 3
    assert [len(x["idx"]) for x in a] == [5, 5, 3]
    idx = torch.cat([x["idx"] for x in a]).tolist()
    assert idx == list(range(2, 38, 3)) + [0]  # 12 rows of rank 2, then a padding row
    assert torch.cat([x["_valid"] for x in a]).tolist() == [True] * 12 + [False]
    # no augmentation at eval: x is the plain image
    assert torch.equal(a[0]["x"][0], torch.full((8, 8), 2 / 255.0).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(0.0)))


# ---------------------------------------------------------------------------
# corrupt data
# ---------------------------------------------------------------------------
def test_corrupt_samples_skipped_and_counted(tmp_path, caplog):
    d = make_dataset(tmp_path, [10, 3, 25], bad={2: {4}})
    truncate_mid_sample(d / "train/shard-000001.tar", 1)  # sample 0 survives, 1 and 2 are lost
    L = build_train_loader(d, "train", tf_noise, 1, 0, 1, 0, seed=0, epoch=0, shuffle_buffer=1,
                           max_corrupt_fraction=0.5)
    with caplog.at_level("WARNING", logger="shards.stream"):
        bs = list(L)
    assert len(bs) == len(L) == 38
    assert L.corrupt_count() == 3  # two lost to the truncation, one undecodable image
    assert all(b["x"].shape == (1, 8, 8) for b in bs)
    keys = {k for b in bs for k in b["__key__"]}
    assert "s00010" in keys and "s00011" not in keys and "s00017" not in keys
    assert 1 <= len(caplog.records) <= 5
    assert any("shard-000001" in r.getMessage() for r in caplog.records)
    # eval: the lost samples become padding rows, the rest are there once
    E = build_eval_loader(d, "train", tf_noise, 4, 0, 1, max_corrupt_fraction=0.5)
    eb = list(E)
    assert len(eb) == 10 and E.corrupt_count() == 3
    valid = [k for b in eb for k, v in zip(b["__key__"], b["_valid"].tolist()) if v]
    assert len(valid) == 35 and "s00017" not in valid and "s00011" not in valid


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_count_survives_workers(tmp_path, num_workers):
    d = make_dataset(tmp_path, [3, 3, 3, 3], bad={0: {1}, 1: {0}, 2: {2}, 3: {1}})
    L = build_train_loader(d, "train", tf_plain, 1, 0, 1, num_workers, seed=0, epoch=0, shuffle_buffer=1,
                           max_corrupt_fraction=0.5)
    assert len(list(L)) == 12
    assert L.corrupt_count() == 4


def test_transform_keyerror_counts_as_corrupt(uneven):
    def tf(sample, train):
        if sample["json"]["idx"] == 5:
            return {"idx": sample["missing"]}
        return tf_plain(sample, train)

    L = build_train_loader(uneven, "train", tf, 1, 0, 1, 0, seed=0, epoch=0, shuffle_buffer=1,
                           max_corrupt_fraction=0.1)
    assert len(list(L)) == 38 and L.corrupt_count() == 1

    def buggy(sample, train):
        raise TypeError("a bug, not bad data")

    with pytest.raises(TypeError, match="a bug"):
        list(build_train_loader(uneven, "train", buggy, 1, 0, 1, 0, seed=0, epoch=0))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_many_corrupt_raises_naming_shard(tmp_path, num_workers):
    d = make_dataset(tmp_path / "a", [10, 3, 25])
    truncate_mid_sample(d / "train/shard-000001.tar", 1)
    with pytest.raises(RuntimeError, match=r"too many corrupt.*shard-000001\.tar"):
        list(build_train_loader(d, "train", tf_plain, 2, 0, 1, num_workers, seed=0, epoch=0))
    d = make_dataset(tmp_path / "b", [10, 3, 25], bad={2: {0, 1, 2}})
    with pytest.raises(RuntimeError, match=r"too many corrupt.*shard-000002\.tar"):
        list(build_train_loader(d, "train", tf_plain, 2, 0, 1, num_workers, seed=0, epoch=0,
                                max_corrupt_fraction=0.05, shuffle_buffer=1))  # bad ones come first
    with pytest.raises(RuntimeError, match=r"too many corrupt.*shard-000002\.tar"):
        list(build_eval_loader(d, "train", tf_plain, 2, 0, 1, num_workers=num_workers))
    (d / "train/shard-000000.tar").unlink()  # a missing shard counts as lost samples
    with pytest.raises(RuntimeError, match=r"too many corrupt.*shard-000000\.tar.*FileNotFoundError"):
        list(build_eval_loader(d, "train", tf_plain, 2, 0, 1, num_workers=num_workers, max_corrupt_fraction=0.2))


# ---------------------------------------------------------------------------
# end to end on the synthetic data
# ---------------------------------------------------------------------------
def test_synthetic_through_loaders(syn):
    def tf(s, train):
        x = torch.from_numpy(np.array(s["vis.png"], np.float32) / 255.0).permute(2, 0, 1)
        return {"vis": x, "thz": torch.from_numpy(np.array(s["thz.png"], np.uint8)),
                "normal": torch.from_numpy(s["normal.npy"].astype(np.float32)),
                "identity": s["json"]["identity"], "posture": s["json"]["posture"]}

    m = Manifest.load(syn)
    L = build_train_loader(syn, "train", tf, 4, 0, 1, 2, seed=0, epoch=0)
    bs = list(L)
    assert len(bs) == m.split_size("train") // 4
    assert bs[0]["vis"].shape == (4, 3, 32, 32) and bs[0]["normal"].shape == (4, 32, 32, 3)
    assert s_mode(syn) == "L"
    E = build_eval_loader(syn, "val", tf, 3, 0, 1)
    assert sum(int(b["_valid"].sum()) for b in E) == m.split_size("val")


def s_mode(syn) -> str:
    from shards.reading import decode_sample

    m = Manifest.load(syn)
    raw = next(iter(wds.WebDataset([str(syn / m.splits["train"][0].file)], shardshuffle=False)))
    return decode_sample(raw)["thz.png"].mode


def tf_pid(sample, train):
    out = tf_noise(sample, train)
    out["pid"] = os.getpid()
    return out


@pytest.mark.parametrize("mp_context", [None, "spawn"])
def test_workers_live_across_epochs_with_the_same_batches(uneven, mp_context):
    """One TrainLoader told each epoch by set_epoch keeps its DataLoader worker
    processes, and yields exactly the batches of a loader built for that epoch
    (augmentation included), resumes (skip) too."""
    kept = build_train_loader(uneven, "train", tf_pid, 2, 1, 2, 2, seed=3, epoch=0, shuffle_buffer=16,
                              mp_context=mp_context)
    pids = []
    try:
        for epoch, skip in ((0, 0), (1, 0), (2, 3), (3, 0)):
            kept.set_epoch(epoch, skip)
            ours = list(kept)
            fresh = list(build_train_loader(uneven, "train", tf_pid, 2, 1, 2, 2, seed=3, epoch=epoch,
                                            skip_batches=skip, shuffle_buffer=16, mp_context=mp_context))
            assert len(ours) == len(fresh) == len(kept) - skip
            assert all(batches_equal({k: v for k, v in a.items() if k != "pid"},
                                     {k: v for k, v in b.items() if k != "pid"}) for a, b in zip(ours, fresh))
            assert {int(p) for b in ours for p in b["pid"]}.isdisjoint(int(p) for b in fresh for p in b["pid"])
            pids.append({int(p) for b in ours for p in b["pid"]})
    finally:
        kept.close()
    assert len(pids[0]) == 2 and all(p == pids[0] for p in pids)  # the same two workers every epoch
    assert os.getpid() not in pids[0]
