"""Verification metrics and pair protocols (recipes.verification) against known answers
and direct (brute-force) computations."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from dist_train.checkpoint import atomic_write
from recipes import verification as ev
from recipes.verification_plots import write_report
from tests.tolerance import cosine_atol


# ----------------------------------------------------------------------------- brute force references

def _rates(gen: np.ndarray, imp: np.ndarray, t: float) -> tuple[float, float]:
    """(FAR, FRR) at threshold t (accept score >= t), by counting."""
    return float(np.mean(imp >= t)), float(np.mean(gen < t))


def _thresholds(gen, imp):
    return [np.inf] + sorted(set(np.r_[gen, imp].tolist()), reverse=True)


def _auc_direct(gen, imp) -> float:
    wins = sum((g > i) + 0.5 * (g == i) for g in gen for i in imp)
    return wins / (len(gen) * len(imp))


def _tar_direct(gen, imp, target) -> float:
    best = 0.0
    for t in _thresholds(gen, imp):
        far, frr = _rates(gen, imp, t)
        if far <= target:
            best = max(best, 1 - frr)
    return best


def _best_bacc_direct(gen, imp) -> float:
    return max(0.5 * ((1 - _rates(gen, imp, t)[1]) + (1 - _rates(gen, imp, t)[0])) for t in _thresholds(gen, imp))


def _split(scores, labels):
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    return s[y], s[~y]


# ----------------------------------------------------------------------------- known answers

def test_hand_made_set_known_answers():
    # genuine 0.8 0.6 0.4, impostor 0.7 0.3 0.1:
    # t=0.7: FAR 1/3, FRR 2/3; t=0.6: FAR 1/3, FRR 1/3 -> EER exactly 1/3.
    # AUC = (3 + 2 + 2) / 9. At FAR = 0 (t = 0.8) TAR = 1/3.
    scores = [0.8, 0.6, 0.4, 0.7, 0.3, 0.1]
    labels = [1, 1, 1, 0, 0, 0]
    r = ev.verification_report(scores, labels)["all"]
    assert r["eer"] == pytest.approx(1 / 3)
    assert r["auc"] == pytest.approx(7 / 9)
    assert r["tar_at_far_0.1"] == pytest.approx(1 / 3)
    assert r["tar_at_far_0.001"] == pytest.approx(1 / 3)
    assert r["best_acc"] == pytest.approx(5 / 6)   # t in (0.3, 0.4]: TAR 1, TRR 2/3
    assert 0.3 < r["best_threshold"] <= 0.4
    assert r["genuine_pairs"] == 3 and r["impostor_pairs"] == 3


def test_twin_impostors_scored_apart_from_all_impostors():
    gen = [0.9, 0.8, 0.7, 0.6]
    general = [0.1, 0.2, 0.3, 0.0]
    twins = [0.85, 0.65]
    scores = gen + general + twins
    labels = [1] * 4 + [0] * 6
    twin = [0] * 8 + [1] * 2
    r = ev.verification_report(scores, labels, twin)
    # all impostors: AUC = (6 + 5 + 5 + 4) / 24; FAR = FRR = 1/4 between t=0.7 and t=0.65
    assert r["all"]["auc"] == pytest.approx(20 / 24)
    assert r["all"]["eer"] == pytest.approx(0.25)
    assert r["all"]["impostor_pairs"] == 6
    # twin impostors only: AUC = (2 + 1 + 1 + 0) / 8, EER 1/2
    assert r["twin"]["auc"] == pytest.approx(0.5)
    assert r["twin"]["eer"] == pytest.approx(0.5)
    assert r["twin"]["impostor_pairs"] == 2 and r["twin"]["genuine_pairs"] == 4
    flat = ev.summary_metrics(r)
    assert flat["eer"] == pytest.approx(0.25) and flat["twin_eer"] == pytest.approx(0.5)


def test_separable_and_degenerate_sets():
    r = ev.verification_report([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])["all"]
    assert r["eer"] == 0.0 and r["auc"] == 1.0 and r["tar_at_far_0.001"] == 1.0 and r["best_acc"] == 1.0
    r = ev.verification_report([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])["all"]
    assert r["eer"] == 1.0 and r["auc"] == 0.0 and r["tar_at_far_0.1"] == 0.0
    r = ev.verification_report([0.5, 0.6], [1, 1])                # no impostors: undefined, not an error
    assert np.isnan(r["all"]["eer"]) and np.isnan(r["twin"]["auc"])
    assert "tar_at_far_0.0001" not in r["all"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_direct_computation(seed):
    rng = np.random.default_rng(seed)
    gen = np.round(rng.normal(1.0, 1.0, 60), 1)   # rounding makes ties
    imp = np.round(rng.normal(0.0, 1.0, 140), 1)
    scores, labels = np.r_[gen, imp], np.r_[np.ones(60, bool), np.zeros(140, bool)]
    r = ev.verification_report(scores, labels)["all"]
    assert r["auc"] == pytest.approx(_auc_direct(gen, imp))
    for t in (0.1, 0.01):
        assert r[f"tar_at_far_{t:g}"] == pytest.approx(_tar_direct(gen, imp, t))
    assert r["best_acc"] == pytest.approx(_best_bacc_direct(gen, imp))
    assert ev.balanced_accuracy(scores, labels, r["best_threshold"]) == pytest.approx(r["best_acc"])
    # EER: between the FAR and the FRR of the two thresholds around the crossing
    ts = _thresholds(gen, imp)
    rates = [_rates(gen, imp, t) for t in ts]
    k = next(i for i, (far, frr) in enumerate(rates) if frr <= far)
    lo, hi = rates[k - 1], rates[k]
    assert min(lo[0], hi[0]) - 1e-12 <= r["eer"] <= max(lo[0], hi[0]) + 1e-12
    assert min(lo[1], hi[1]) - 1e-12 <= r["eer"] <= max(lo[1], hi[1]) + 1e-12


def test_kfold_accuracy_matches_a_loop_over_folds():
    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + 1.5 * y, 2)
    folds = ev._fold_ids(300, 10, 7)
    accs = []
    for k in range(10):
        tr = folds != k
        g, i = s[tr & y], s[tr & ~y]
        ts = _thresholds(g, i)
        t_best = max(ts, key=lambda t: (0.5 * (np.mean(g >= t) + np.mean(i < t))))
        best = 0.5 * (np.mean(g >= t_best) + np.mean(i < t_best))
        _, thr = ev.best_accuracy_threshold(s[tr], y[tr])
        assert 0.5 * (np.mean(g >= thr) + np.mean(i < thr)) == pytest.approx(best)  # same training accuracy
        accs.append(ev.balanced_accuracy(s[~tr], y[~tr], thr))
    mean, std = ev.kfold_accuracy(s, y, folds=10, seed=7)
    assert mean == pytest.approx(np.mean(accs)) and std == pytest.approx(np.std(accs))


def test_far_1e4_only_with_enough_impostors():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(100, bool), np.zeros(10_000, bool)]
    r = ev.verification_report(rng.normal(size=labels.size) + labels, labels)["all"]
    assert "tar_at_far_0.0001" in r
    r = ev.verification_report(rng.normal(size=1000), labels[:1000] | (np.arange(1000) < 10))["all"]
    assert "tar_at_far_0.0001" not in r


def test_tied_scores_keep_every_operating_point():
    # genuine .9 .8 .7 .1, impostor .9 .8 .7: at t=.8 FAR 2/3, TAR 1/2. The ROC points
    # (1/3, 1/4), (2/3, 1/2), (1, 3/4) are collinear; dropping the middle one (sklearn's
    # default) reported TAR 0.25 at FAR <= 0.67.
    s = [.9, .9, .8, .8, .7, .7, .1]
    y = [1, 0, 1, 0, 1, 0, 1]
    r = ev.verification_report(s, y, far_targets=(0.67, 0.34))["all"]
    gen, imp = _split(s, y)
    assert r["tar_at_far_0.67"] == 0.5 == _tar_direct(gen, imp, 0.67)
    assert r["thr_at_far_0.67"] == 0.8
    assert r["tar_at_far_0.34"] == 0.25 == _tar_direct(gen, imp, 0.34)
    assert r["auc"] == pytest.approx(_auc_direct(gen, imp))
    assert r["eer"] == pytest.approx(4 / 7)  # FRR - FAR = 1 - 7/4 FAR on the line through the points


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_give_nan_metrics_and_one_warning(bad, caplog):
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(20, bool), np.zeros(40, bool)]
    twin = np.r_[np.zeros(20, bool), np.ones(5, bool), np.zeros(35, bool)]
    scores = rng.normal(size=60) + labels
    scores[[3, 30, 50]] = bad                         # a diverged model: a few scores NaN or inf
    with caplog.at_level("WARNING", logger="biomtl.eval"):
        r = ev.verification_report(scores, labels, twin, threshold=0.5)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1 and "3 of 60 scores are not finite" in warnings[0], warnings
    for block in ("all", "twin"):
        for key in ("auc", "eer", "eer_threshold", "best_acc", "best_threshold", "acc_10fold", "tar_at_far_0.1",
                    "acc_at_threshold", "far_at_threshold"):
            assert np.isnan(r[block][key]), (block, key)
    assert r["all"]["genuine_pairs"] == 20 and r["all"]["impostor_pairs"] == 40  # the counts stay
    assert all(np.isnan(v) for k, v in ev.summary_metrics(r).items() if "pairs" not in k)
    caplog.clear()
    with caplog.at_level("WARNING", logger="biomtl.eval"):
        assert all(np.isnan(ev.best_accuracy_threshold(scores, labels)))   # not a threshold ranked among NaNs
        assert all(np.isnan(ev.kfold_accuracy(scores, labels)))
    assert sum("3 of 60" in rec.getMessage() for rec in caplog.records) == 2


def test_validation_metrics_of_a_diverged_model_are_nan_not_an_exception(caplog):
    """The dcal_twins recipe's validation metrics on embeddings with a NaN row (fp16 blew up)."""
    import torch

    from recipes.verification import VerificationMetrics

    rng = np.random.default_rng(1)
    ident = np.repeat(np.arange(6), 4)
    emb = rng.normal(size=(ident.size, 8)).astype(np.float32)
    emb[5] = np.nan
    m = VerificationMetrics(seed=0)
    m.update({"embedding": torch.from_numpy(emb)}, {"identity": torch.from_numpy(ident),
                                                    "twin": torch.full((ident.size,), -1)})
    with caplog.at_level("WARNING", logger="biomtl.eval"):
        out = VerificationMetrics.compute([m.state()])
    assert np.isnan(out["eer"]) and np.isnan(out["auc"]) and np.isnan(out["threshold"])
    n_pairs = ident.size * (ident.size - 1) // 2
    assert any(f"{ident.size - 1} of {n_pairs} scores are not finite" in r.getMessage() for r in caplog.records)


def test_nan_threshold_gives_nan_accuracy():
    r = ev.verification_report([0.9, 0.7, 0.4, 0.6, 0.2], [1, 1, 1, 0, 0], threshold=float("nan"))["all"]
    assert np.isnan(r["acc_at_threshold"]) and np.isnan(r["far_at_threshold"]) and np.isnan(r["frr_at_threshold"])
    assert r["eer"] == pytest.approx(1 / 3)                  # the scores themselves are fine


def test_accuracy_at_a_given_threshold():
    r = ev.verification_report([0.9, 0.7, 0.4, 0.6, 0.2], [1, 1, 1, 0, 0], threshold=0.5)["all"]
    assert r["far_at_threshold"] == pytest.approx(0.5) and r["frr_at_threshold"] == pytest.approx(1 / 3)
    assert r["acc_at_threshold"] == pytest.approx(0.5 * (2 / 3 + 0.5))


def test_two_million_pairs_run():
    """No timing assert (shared CI box); the speed is in the report. Vectorised paths only."""
    rng = np.random.default_rng(0)
    n = 2_000_000
    labels = rng.random(n) < 0.1
    twin = ~labels & (rng.random(n) < 0.02)
    scores = rng.normal(size=n) + 2.0 * labels + 1.0 * twin   # co-twins look alike
    t0 = time.perf_counter()
    r = ev.verification_report(scores, labels, twin)
    print(f"verification_report on 2M pairs: {time.perf_counter() - t0:.2f} s")
    assert r["all"]["impostor_pairs"] == int((~labels).sum())
    assert 0.1 < r["all"]["eer"] < 0.2 and r["twin"]["eer"] > r["all"]["eer"]
    assert "tar_at_far_0.0001" in r["all"]


# ----------------------------------------------------------------------------- pairs

def test_generate_all_pairs_small_split():
    ident = np.array([0, 0, 1, 1, 2, 2, -1])
    twin = np.array([1, 1, 0, 0, -1, -1, -1])
    p = ev.generate_pairs(ident, twin, max_pairs=None)
    assert len(p) == 15                                  # C(6, 2): the unlabelled sample is left out
    assert p.counts() == {"genuine": 3, "impostor": 12, "twin_impostor": 4}
    assert (ident[p.a[p.label]] == ident[p.b[p.label]]).all()
    assert (twin[p.a[p.twin]] == ident[p.b[p.twin]]).all()


def test_generate_capped_pairs_is_deterministic_and_keeps_twins():
    ident = np.repeat(np.arange(200), 10)
    twin = np.full(ident.size, -1)
    for a in range(0, 20, 2):                            # identities 0..19 are 10 twin pairs
        twin[ident == a], twin[ident == a + 1] = a + 1, a
    p = ev.generate_pairs(ident, twin, max_pairs=20_000, seed=3)
    q = ev.generate_pairs(ident, twin, max_pairs=20_000, seed=3)
    r = ev.generate_pairs(ident, twin, max_pairs=20_000, seed=4)
    assert len(p) == 20_000
    assert np.array_equal(p.a, q.a) and np.array_equal(p.b, q.b)
    assert not np.array_equal(p.a, r.a)
    c = p.counts()
    assert c["genuine"] == 200 * 45 and c["twin_impostor"] == 10 * 100
    imp = ~p.label & ~p.twin
    assert (ident[p.a[imp]] != ident[p.b[imp]]).all() and not (twin[p.a[imp]] == ident[p.b[imp]]).any()
    codes = p.a * ident.size + p.b
    assert np.unique(codes).size == codes.size           # no duplicate pair


def test_pairs_from_file(tmp_path):
    keys = ["a1", "a2", "b1", "c1"]
    f = tmp_path / "test_pairs.json"
    f.write_text(json.dumps([{"img1": "a1", "img2": "a2", "label": 1}, {"img1": "a1", "img2": "b1", "label": 0},
                             {"img1": "b1", "img2": "c1", "label": 0}]))
    p = ev.pairs_from_file(f, keys, identity=np.array([0, 0, 1, 2]), twin=np.array([-1, -1, 2, 1]))
    assert p.a.tolist() == [0, 0, 2] and p.b.tolist() == [1, 2, 3]
    assert p.label.tolist() == [True, False, False] and p.twin.tolist() == [False, False, True]
    f.write_text(json.dumps([{"img1": "a1", "img2": "zz", "label": 1}]))
    with pytest.raises(KeyError, match="zz"):
        ev.pairs_from_file(f, keys)


def test_cosine_scores():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    s = ev.cosine_scores(emb, np.array([0, 0, 0]), np.array([1, 2, 3]))
    # float32 cosines of 2-d rows (normalise, then a 2-term dot)
    assert s.tolist() == pytest.approx([1.0, 0.0, 2 ** -0.5], rel=0, abs=cosine_atol(2))


# ----------------------------------------------------------------------------- report files

def test_write_report_files(tmp_path):
    rng = np.random.default_rng(0)
    ident = np.repeat(np.arange(6), 5)
    twin = np.where(ident < 2, 1 - ident, -1)
    centres = rng.normal(size=(6, 16))
    centres[1] = centres[0] + 0.3 * rng.normal(size=16)   # co-twins look alike
    emb = centres[ident] + 0.5 * rng.normal(size=(ident.size, 16))
    keys = [f"k{i}" for i in range(ident.size)]
    table = {"embedding": emb.astype(np.float32), "identity": ident, "twin": twin, "keys": keys}
    pairs = ev.generate_pairs(ident, twin)
    images = {k: Image.new("L", (20, 24), color=10 * i) for i, k in enumerate(keys)}
    m = write_report(tmp_path, table, pairs, atomic_write, threshold=0.5, threshold_source="test", images=images,
                     identity_names=[f"id{i}" for i in range(6)], title="unit test")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["pairs"] == {"genuine": 60, "impostor": 375, "twin_impostor": 25}
    assert saved["all_impostors"]["eer"] == m["all_impostors"]["eer"]     # JSON keeps a float64 exactly
    assert saved["twin_impostors"]["eer"] >= saved["all_impostors"]["eer"]
    for name in ("roc.png", "score_histograms.png", "hardest_errors.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200, name
    assert set(ev.hardest_error_keys(table, pairs)) <= set(keys)
