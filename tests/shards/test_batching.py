"""Twin-aware P×K and triplet batching (shards/batching.py), the resampled stream
mode, and the trainer's use of them. Property tests use hypothesis."""
from __future__ import annotations

import collections
import random
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.batching import _Groups, build_index, build_pk_loader, build_triplet_loader, pk_plan, triplet_plan
from shards.manifest import Manifest, ShardEntry
from shards.stream import build_train_loader
from shards.writer import ShardSplitWriter

FAST = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# a small identity dataset: json {"identity", "idx"} + a tiny array
# ---------------------------------------------------------------------------
def make_ids(root: Path, per_identity: list[int], twin_pairs=(), shard_sizes: list[int] | None = None,
             split: str = "train", id_offset: int = 0, n_identities: int | None = None, seed: int = 0,
             bad: set[int] = frozenset(), extra_splits: dict | None = None) -> Path:
    """Identity i (global index i + id_offset) has per_identity[i] samples; samples
    are shuffled then cut into shards of ``shard_sizes`` (default one shard)."""
    rows = [(i + id_offset, k) for i, n in enumerate(per_identity) for k in range(n)]
    random.Random(seed).shuffle(rows)
    sizes = shard_sizes or [len(rows)]
    assert sum(sizes) == len(rows)
    entries, pos = [], 0
    for si, c in enumerate(sizes):
        with ShardSplitWriter(root, split, maxcount=10 ** 6, start_index=si) as w:
            for ident, k in rows[pos:pos + c]:
                n = pos
                w.write({"__key__": f"id{ident:03d}_{k:03d}", "json": {"identity": ident, "idx": n},
                         "x.npy": b"garbage" if n in bad else np.array([ident, k], np.int64)})
                pos += 1
        entries += w.close()
    m = Manifest.load(root) if (root / "manifest.json").exists() else Manifest(
        identities=[f"p{i}" for i in range(n_identities or (len(per_identity) + id_offset))],
        twin_pairs=[tuple(sorted(p)) for p in twin_pairs], modalities=["json", "x.npy"])
    m.splits[split] = entries
    m.save(root)
    return root


def tf(sample, train):
    x = sample["x.npy"]
    return {"identity": int(sample["json"]["identity"]), "k": int(x[1]), "ident_from_data": int(x[0]),
            "r": torch.rand(()) + float(np.random.rand()) + random.random()}


def batches_equal(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def fake_groups(per_identity: list[int], twin_pairs) -> tuple[_Groups, np.ndarray]:
    identity = np.repeat(np.arange(len(per_identity)), per_identity)
    identity = identity[np.random.default_rng(0).permutation(len(identity))]
    return _Groups.of(types.SimpleNamespace(identity=identity), twin_pairs), identity


@st.composite
def worlds(draw, max_ids=14):
    n = draw(st.integers(2, max_ids))
    per = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    ids = list(range(n))
    draw(st.randoms(use_true_random=False)).shuffle(ids)
    n_pairs = draw(st.integers(0, n // 2))
    pairs = [(ids[2 * k], ids[2 * k + 1]) for k in range(n_pairs)]
    return per, pairs


# ---------------------------------------------------------------------------
# P×K plans: composition and the twin rule
# ---------------------------------------------------------------------------
@FAST
@given(w=worlds(), data=st.data())
def test_pk_batch_composition(w, data):
    per, pairs = w
    P = data.draw(st.integers(1, len(per)))
    K = data.draw(st.integers(1, 5))
    twin_prob = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    groups, identity = fake_groups(per, pairs)
    twin = dict(pairs) | {b: a for a, b in pairs}
    for b in range(5):
        rows = pk_plan(groups, P, K, twin_prob, np.random.default_rng(b))
        assert len(rows) == P * K
        idents = [rows[i * K][0] for i in range(P)]
        assert len(set(idents)) == P  # P distinct identities ...
        for i, ident in enumerate(idents):  # ... each K consecutive rows of its own samples
            block = rows[i * K:(i + 1) * K]
            assert all(r[0] == ident and identity[r[1]] == ident for r in block)
            if per[ident] >= K:
                assert len({r[1] for r in block}) == K  # no repeats when it has enough
        lone = [i for i in idents if i in twin and twin[i] not in idents]
        both = [i for i in idents if i in twin and twin[i] in idents]
        n_units = len(per) - len(pairs)
        if twin_prob == 1.0:
            assert len(lone) <= 1  # only the last free slot may take a lone twin
            if P % 2 == 0 and len(pairs) * 2 == len(per):
                assert not lone
        if twin_prob == 0.0 and P <= n_units:  # (more would force co-twins in)
            assert not both


@pytest.mark.parametrize("twin_prob", [0.25, 0.6, 0.9])
def test_pk_twin_cooccurrence_rate(twin_prob):
    per = [4] * 60
    pairs = [(2 * k, 2 * k + 1) for k in range(15)]  # 30 twins, 30 singletons
    groups, _ = fake_groups(per, pairs)
    with_member = together = 0
    for b in range(1500):
        idents = {r[0] for r in pk_plan(groups, 8, 2, twin_prob, np.random.default_rng([7, b]))}
        for a, c in pairs:
            if a in idents or c in idents:
                with_member += 1
                together += a in idents and c in idents
    rate = together / with_member
    sigma = (twin_prob * (1 - twin_prob) / with_member) ** 0.5
    assert abs(rate - twin_prob) < 4 * sigma + 0.01, (rate, twin_prob, with_member)


@pytest.mark.parametrize("twin_prob", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n_ids, n_pairs, P", [(20, 3, 4), (30, 10, 5)])
def test_pk_identities_uniform(n_ids, n_pairs, P, twin_prob):
    """Each identity is in P/N of the batches, twins as often as singletons, whatever
    twin_prob (the old weighted unit order gave twins 0.54-0.66x at twin_prob 0 and
    1.12-1.46x at 1 here); the co-twin rules hold in every batch."""
    pairs = [(2 * k, 2 * k + 1) for k in range(n_pairs)]
    groups, _ = fake_groups([3] * n_ids, pairs)
    batches = 4000
    c = collections.Counter()
    for b in range(batches):
        idents = [r[0] for r in pk_plan(groups, P, 1, twin_prob, np.random.default_rng([5, b]))]
        c.update(idents)
        present = set(idents)
        together = [a in present and t in present for a, t in pairs if a in present or t in present]
        if twin_prob == 1.0:
            assert all(together)  # singletons are left for every odd slot: co-twins always together
        if twin_prob == 0.0:
            assert not any(together)
    freq = np.array([c[i] for i in range(n_ids)]) / batches
    ratio = freq[:2 * n_pairs].mean() / freq[2 * n_pairs:].mean()
    assert 0.95 < ratio < 1.05, ratio  # 4000 batches: the ratio's sd is ~1.5%
    assert np.all(np.abs(freq / (P / n_ids) - 1) < 0.15), freq  # every identity ~P/N (sd 3-4%)


# ---------------------------------------------------------------------------
# triplet plans
# ---------------------------------------------------------------------------
@FAST
@given(w=worlds(), twin_prob=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 10 ** 6))
def test_triplet_roles(w, twin_prob, seed):
    per, pairs = w
    groups, identity = fake_groups(per, pairs)
    twin = dict(pairs) | {b: a for a, b in pairs}
    anchors = np.arange(len(identity))
    for a, p, n, is_twin in triplet_plan(groups, anchors, identity, twin_prob, np.random.default_rng(seed)):
        ia, ip, ineg = identity[a], identity[p], identity[n]
        assert ia == ip and ia != ineg
        assert (p != a) == (per[ia] > 1)
        assert is_twin == (ia in twin and twin[ia] == ineg)
        if twin_prob == 1.0 and ia in twin:
            assert is_twin
        if twin_prob == 0.0 and ia in twin and len(per) > 2:
            assert not is_twin


def test_triplet_twin_negative_rate():
    per = [3] * 40
    pairs = [(2 * k, 2 * k + 1) for k in range(10)]
    groups, identity = fake_groups(per, pairs)
    twinned = np.flatnonzero(identity < 20)
    rows = triplet_plan(groups, np.tile(twinned, 30), identity, 0.4, np.random.default_rng(3))
    rate = np.mean([r[3] for r in rows])
    assert abs(rate - 0.4) < 4 * (0.4 * 0.6 / len(rows)) ** 0.5


# ---------------------------------------------------------------------------
# the loaders on real shards
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twins_ds(tmp_path_factory) -> Path:
    """train: identities 0..11 (pairs (0,1), (2,3), (4,5)), 3 uneven shards; val: 12..15 with (12,13)."""
    root = tmp_path_factory.mktemp("twins")
    make_ids(root, [4, 3, 5, 4, 2, 6, 4, 4, 3, 5, 4, 4], [(0, 1), (2, 3), (4, 5), (12, 13)],
             shard_sizes=[20, 5, 23], n_identities=16)
    make_ids(root, [3, 3, 3, 3], split="val", id_offset=12, n_identities=16)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pk_loader_equal_batches_and_layout(twins_ds, num_workers):
    # 48 samples, P=2, K=3, 2 ranks -> 4 batches per rank on 3 uneven shards, 2 workers each
    counts = []
    for rank in range(2):
        L = build_pk_loader(twins_ds, "train", tf, 2, 3, rank, 2, num_workers, seed=1, epoch=0)
        bs = list(L)
        counts.append((len(L), len(bs)))
        for b in bs:
            assert b["pk_identity"].tolist() == b["identity"].tolist() == b["ident_from_data"].tolist()
            ids = b["identity"].view(2, 3)
            assert (ids == ids[:, :1]).all() and ids[0, 0] != ids[1, 0]
            assert set(ids[:, 0].tolist()) in ({0, 1}, {2, 3}, {4, 5}) or not (set(ids[:, 0].tolist()) & set(range(6)))
        assert L.corrupt_count() == 0
    assert counts == [(4, 4), (4, 4)]


@FAST
@given(skip=st.integers(0, 8), world=st.integers(1, 3), seed=st.integers(0, 5))
def test_pk_resume_exact(twins_ds, skip, world, seed):
    rank = world - 1
    full = list(build_pk_loader(twins_ds, "train", tf, 2, 2, rank, world, 0, seed=seed, epoch=3))
    assert len(full) == max(1, 48 // (world * 4))
    skip = min(skip, len(full))
    tail = list(build_pk_loader(twins_ds, "train", tf, 2, 2, rank, world, 0, seed=seed, epoch=3, skip_batches=skip))
    assert len(tail) == len(full) - skip
    assert all(batches_equal(a, b) for a, b in zip(full[skip:], tail))


def test_resume_with_workers_and_other_epoch(twins_ds):
    full = list(build_pk_loader(twins_ds, "train", tf, 2, 2, 0, 1, 0, seed=0, epoch=1))
    tail = list(build_pk_loader(twins_ds, "train", tf, 2, 2, 0, 1, 2, seed=0, epoch=1, skip_batches=5))
    assert len(full) == 12 and len(tail) == 7
    assert all(batches_equal(a, b) for a, b in zip(full[5:], tail))  # worker count does not matter
    other = list(build_pk_loader(twins_ds, "train", tf, 2, 2, 0, 1, 0, seed=0, epoch=2))
    assert [b["__key__"] for b in other] != [b["__key__"] for b in full]
    # repeated keys in a batch get different augmentations (seeded by row, not key)
    b = full[0]
    assert len(set(b["r"].tolist())) == len(b["r"])


def test_triplet_loader_layout_anchors_and_resume(twins_ds):
    L = [build_triplet_loader(twins_ds, "train", tf, 4, r, 2, 0, seed=2, epoch=0) for r in range(2)]
    bs = [list(x) for x in L]
    assert [len(x) for x in L] == [6, 6] and [len(x) for x in bs] == [6, 6]
    b = bs[0][0]
    assert set(b) == {"identity", "k", "ident_from_data", "r", "pos_identity", "pos_k", "pos_ident_from_data",
                      "pos_r", "neg_identity", "neg_k", "neg_ident_from_data", "neg_r", "neg_is_co_twin", "__key__",
                      "__pos_key__", "__neg_key__"}
    anchors = []
    for batch in bs[0] + bs[1]:
        assert (batch["identity"] == batch["pos_identity"]).all()
        assert (batch["identity"] != batch["neg_identity"]).all()
        twin = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4}
        for a, n, t in zip(batch["identity"].tolist(), batch["neg_identity"].tolist(), batch["neg_is_co_twin"].tolist()):
            assert t == (twin.get(a) == n) and (t or a not in twin)  # twin_prob=1: always the co-twin
        anchors += batch["__key__"]
    assert len(anchors) == 48 and len(set(anchors)) == 48  # every sample is an anchor once per epoch
    tail = list(build_triplet_loader(twins_ds, "train", tf, 4, 1, 2, 2, seed=2, epoch=0, skip_batches=2))
    assert all(batches_equal(a, b) for a, b in zip(bs[1][2:], tail))


def test_no_identity_leakage_across_identity_disjoint_splits(tmp_path):
    from shards.build import create

    raw = tmp_path / "raw"
    from PIL import Image

    for i in range(12):
        for k in range(3):
            p = raw / f"p{i:02d}" / f"{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4), i * 10 + k, np.uint8)).save(p)
    twins = tmp_path / "twins.json"
    twins.write_text('[["p00", "p01"], ["p02", "p03"], ["p04", "p05"], ["p06", "p07"]]')
    import argparse

    create("folder", raw, tmp_path / "ds", splits="train=0.5,val=0.25,test=0.25", split_by="identity", seed=3,
           options=argparse.Namespace(twins=twins))
    m = Manifest.load(tmp_path / "ds")

    def tf_img(s, train):
        return {"identity": s["json"]["identity"]}

    split_ids = {}
    for split in m.splits:
        idx = build_index(tmp_path / "ds", split)
        split_ids[split] = set(idx.identity.tolist())
    assert not (split_ids["train"] & split_ids["val"]) and not (split_ids["train"] & split_ids["test"])
    seen = set()
    for rank in range(2):
        for b in build_pk_loader(tmp_path / "ds", "train", tf_img, 2, 2, rank, 2, 0, seed=0, epoch=0):
            seen |= set(b["identity"].tolist())
        for b in build_triplet_loader(tmp_path / "ds", "train", tf_img, 3, rank, 2, 0, seed=0, epoch=0, twin_prob=0.5):
            seen |= set(b["identity"].tolist()) | set(b["pos_identity"].tolist()) | set(b["neg_identity"].tolist())
    assert seen <= split_ids["train"]


def test_triplet_flag_leaves_the_negatives_own_twin_field(twins_ds):
    """A transform that returns ``twin`` (DCAL, THz) gets the negative's co-twin id in
    ``neg_twin``; the batcher's co-twin flag has its own name and does not overwrite it."""
    twin = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4}

    def with_twin(sample, train):
        out = tf(sample, train)
        return {**out, "twin": twin.get(out["identity"], -1)}
    for b in build_triplet_loader(twins_ds, "train", with_twin, 4, 0, 1, 0, seed=2, epoch=0):
        assert b["neg_twin"].tolist() == [twin.get(n, -1) for n in b["neg_identity"].tolist()]
        assert b["neg_is_co_twin"].dtype == torch.bool


def test_twin_across_splits_is_never_a_negative(tmp_path):
    # a manifest whose pair (0, 12) spans train and val: the train loaders must not look for 12
    make_ids(tmp_path, [3] * 6, [(0, 12)], n_identities=16)
    make_ids(tmp_path, [3], split="val", id_offset=12, n_identities=16)
    for b in build_triplet_loader(tmp_path, "train", tf, 6, 0, 1, 0, seed=0, epoch=0):
        assert not b["neg_is_co_twin"].any() and 12 not in b["neg_identity"].tolist()


# ---------------------------------------------------------------------------
# corrupt data in the indexed loaders
# ---------------------------------------------------------------------------
def test_pk_bad_sample_replaced_by_same_identity(tmp_path):
    make_ids(tmp_path, [4] * 6, shard_sizes=[12, 12], bad={3})
    L = build_pk_loader(tmp_path, "train", tf, 3, 4, 0, 1, 0, seed=0, epoch=0, max_corrupt_fraction=0.5)
    n_bad_rows = 0
    for b in L:
        ids = b["identity"].view(3, 4)
        assert (ids == ids[:, :1]).all()  # composition kept
        assert b["identity"].tolist() == b["ident_from_data"].tolist()
    assert L.corrupt_count() == 1
    with pytest.raises(RuntimeError, match=r"too many corrupt.*shard-00000\d\.tar"):
        list(build_pk_loader(tmp_path, "train", tf, 3, 4, 0, 1, 0, seed=0, epoch=0, max_corrupt_fraction=0.001))


def test_truncated_shard_in_index(tmp_path, caplog):
    make_ids(tmp_path, [4] * 10, shard_sizes=[20, 20])
    p = tmp_path / "train" / "shard-000001.tar"
    with tarfile.open(p) as t:
        cut = [m for m in t.getmembers()][10].offset + 700
    p.write_bytes(p.read_bytes()[:cut])
    with caplog.at_level("WARNING", logger="shards.batching"):
        L = build_pk_loader(tmp_path, "train", tf, 2, 2, 0, 1, 0, seed=0, epoch=0, max_corrupt_fraction=0.5)
    assert any("shard-000001.tar" in r.getMessage() for r in caplog.records)
    assert len(list(L)) == len(L) == 10
    assert L.corrupt_count() == 40 - len(L.plan.index)
    with pytest.raises(RuntimeError, match=r"too many corrupt.*shard-000001\.tar"):
        build_pk_loader(tmp_path, "train", tf, 2, 2, 0, 1, 0, seed=0, epoch=0)


def test_pk_needs_enough_identities(tmp_path):
    make_ids(tmp_path, [5, 5])
    with pytest.raises(ValueError, match="P=3"):
        build_pk_loader(tmp_path, "train", tf, 3, 2, 0, 1, 0, seed=0, epoch=0)


# ---------------------------------------------------------------------------
# the resampled stream
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_equal_batches_and_resume(twins_ds, num_workers):
    def run(rank, skip=0, epoch=0):
        return list(build_train_loader(twins_ds, "train", tf, 3, rank, 2, num_workers, seed=4, epoch=epoch,
                                       skip_batches=skip, shuffle_buffer=8, resampled=True))

    full = [run(r) for r in range(2)]
    assert [len(x) for x in full] == [8, 8]  # 48 // (2 * 3) on 3 uneven shards
    for k in (1, 3, 8):
        tail = run(1, skip=k)
        assert len(tail) == 8 - k and all(batches_equal(a, b) for a, b in zip(full[1][k:], tail))
    assert [b["__key__"] for b in run(0, epoch=1)] != [b["__key__"] for b in full[0]]  # epochs draw anew


def test_resampled_draws_with_replacement(twins_ds):
    L = build_train_loader(twins_ds, "train", tf, 4, 0, 1, 0, seed=0, epoch=0, resampled=True, shuffle_buffer=4)
    keys = [k for b in L for k in b["__key__"]]
    assert len(keys) == 48
    assert len(set(keys)) < 48  # some samples repeat within the virtual epoch, others are missing
    r_by_key = collections.defaultdict(set)
    for b in L:
        for k, r in zip(b["__key__"], b["r"].tolist()):
            r_by_key[k].add(r)
    assert any(len(v) > 1 for v in r_by_key.values())  # a repeated sample is augmented anew


def test_resampled_corrupt_shard_counted(tmp_path):
    make_ids(tmp_path, [4] * 10, shard_sizes=[10, 10, 20], bad={0, 15, 30})  # one in every shard
    L = build_train_loader(tmp_path, "train", tf, 4, 0, 1, 0, seed=0, epoch=0, resampled=True,
                           max_corrupt_fraction=0.5, shuffle_buffer=1)
    assert len(list(L)) == 10 and L.corrupt_count() >= 1


# ---------------------------------------------------------------------------
# the trainer's LoaderFactory and config
# ---------------------------------------------------------------------------
def test_loader_factory_and_config(twins_ds, tmp_path):
    from dist_train.config import ConfigError, load_config
    from dist_train.trainer import LoaderFactory
    from tests.conftest import REPO, tiny_overrides

    cfg = load_config(REPO / "configs" / "facecom.yaml",
                      tiny_overrides(tmp_path, data__batching="pk", data__pk_k=2, data__batch_size=4,
                                     data__twin_prob=0.5))
    assert cfg.data.batching == "pk" and cfg.data.pk_k == 2
    with pytest.raises(ConfigError, match="data.pk_k"):
        load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path, data__batching="pk", data__pk_k=3,
                                                                       data__batch_size=4))
    with pytest.raises(ConfigError, match="data.twin_prob"):
        load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path, data__twin_prob=1.5))
    with pytest.raises(ConfigError, match="data.batching"):
        load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path, data__batching="pq"))
    ctx = types.SimpleNamespace(rank=1, world_size=2, device=torch.device("cpu"))
    recipe = types.SimpleNamespace(transform=tf)
    f = LoaderFactory(cfg, ctx, twins_ds, recipe)
    L = f.train(0, skip_batches=1)
    assert L.plan.mode == "pk" and L.plan.P == 2 and L.plan.K == 2 and L.plan.twin_prob == 0.5
    assert f.train_batches_per_epoch() == 48 // 8 and len(list(L)) == 5 and L.corrupt_count() == 0
    cfg.data.batching = "triplet"
    assert f.train(0).plan.mode == "triplet"
    cfg.data.batching, cfg.data.resampled = "stream", True
    assert f.train(0).plan.resampled


def test_trainer_runs_with_pk_batches(tmp_path):
    from dist_train.config import load_config
    from dist_train.main import train
    from tests.conftest import REPO, tiny_overrides

    cfg = load_config(REPO / "configs" / "facecom.yaml",
                      tiny_overrides(tmp_path, data__batching="pk", data__pk_k=2, data__batch_size=8,
                                     data__synthetic__twin_fraction=0.5, train__max_steps=3,
                                     logging__tracking="none"))
    metrics = train(cfg, None)
    assert np.isfinite(metrics["loss"])
