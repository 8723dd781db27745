"""Co-twins of the synthetic faces (``twin_style``, shards/synthetic/world.py; docs/differences.md).

The "marked" co-twin is the first twin's face plus three marks of documented size; measured on
:func:`canonical_params` captures (frontal, bare, frontal light, no noise, the same RNG draws),
where two identities differ only where their latent faces do:

* the twins' latent faces differ in exactly the documented fields, by the documented amounts;
* every pixel where the twins' captures differ lies in the marks' region (the mark's disc and a
  box around each eye and brow, from the constants and the twin's own latents, plus the
  anti-aliasing edge), so their mean pixel distance is at most that region's share of the
  image: a bound from the generator's parameters; non-twins differ by more than it;
* no difference is a mirror image: a flip does not turn one twin into the other.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from shards.synthetic import SpecError, SyntheticSpec, _world, spec_hash
from shards.synthetic import world as W
from shards.synthetic.faces import _head_masks, _posed_face, canonical_params, render_face

SIZE = 64
SPEC = SyntheticSpec(num_identities=24, samples_per_identity=1, twin_fraction=0.5, image_size=SIZE,
                     modalities=("vis",), seed=3, twin_style="marked")
# 8-bit images: outside the marks' region the co-twins' captures may differ by rounding and the
# far tails of the eye sockets' Gaussian shading (< 2.5 widths away: below one 8-bit level)
LEVELS = 2


def _grey(spec: SyntheticSpec, i: int) -> np.ndarray:
    return render_face(spec, i, 0, canonical_params(spec, i))["vis"].astype(np.int64).sum(-1)


def _mark_region(spec: SyntheticSpec, twin: int) -> np.ndarray:
    """Where the marked co-twin may differ from the first twin, in its own (frontal) pixel grid."""
    lat = _world(spec).latents[twin]
    f = _posed_face(spec, lat, canonical_params(spec, twin))
    _head_masks(f)
    x, y, edge = f.x, f.y, 2 * f.px  # anti-aliasing edge and the depth blur: 2 pixels
    mx, mdy, mr = lat["twin_mole"]
    region = (x - mx) ** 2 + (y - lat["eye_y"] - mdy) ** 2 <= (mr + edge) ** 2
    # eyes (widest shading: the socket's and brow ridge's Gaussians, 1.6 eye widths, 2.5 of them),
    # at the first twin's and the twin's spacing; brows up to their top edge + the ridge's Gaussian
    half_w = 2.5 * 1.6 * lat["eye_rw"] + edge
    inner, outer = lat["eye_dx"] - W.MARK_EYE_DX - half_w, lat["eye_dx"] + half_w
    top = lat["eye_y"] - lat["brow_dy"] - 0.02 * abs(lat["brow_arch"]) - lat["brow_th"] - 2.5 * 0.035 - edge
    bottom = lat["eye_y"] + 2.5 * 1.1 * lat["eye_rw"] + edge
    return region | ((np.abs(x) >= inner) & (np.abs(x) <= outer) & (y >= top) & (y <= bottom))


def _pairs(spec: SyntheticSpec) -> list[tuple[int, int]]:
    """(first twin, marked co-twin): the world draws the lower index and marks its co-twin."""
    return [(a, b) for a, b in _world(spec).twin_pairs]


def test_marked_twins_differ_in_the_documented_fields_only():
    w = _world(SPEC)
    assert _pairs(SPEC)
    for a, b in _pairs(SPEC):
        la, lb = w.latents[a], w.latents[b]
        assert {k for k in lb if la.get(k) != lb[k]} == {"brow_th", "eye_dx", "twin_mole"}
        assert lb["brow_th"] - la["brow_th"] == pytest.approx(W.MARK_BROW_TH)
        assert lb["eye_dx"] - la["eye_dx"] == pytest.approx(W.MARK_EYE_DX)
        assert abs(lb["twin_mole"][0]) == W.MARK_MOLE_DX and lb["twin_mole"][1:] == (W.MARK_MOLE_DY, W.MARK_MOLE_R)


def test_marks_are_large_enough_to_see_at_the_benchmark_size():
    # one face unit is SIZE / 2 pixels: the mark is >= 3 px across, brows >= 1 px thicker, eyes >= 1 px apart
    unit = SIZE / 2
    assert 2 * W.MARK_MOLE_R * unit >= 3 and W.MARK_BROW_TH * unit >= 1 and W.MARK_EYE_DX * unit >= 0.95
    for a, b in _pairs(SPEC):  # and each twin's mark shows: >= 0.3 of the grey range over its disc's core
        d = np.abs(_grey(SPEC, b) - _grey(SPEC, a)) / (3 * 255)
        assert d.max() >= 0.15, (a, b)


def _differing(ga: np.ndarray, gb: np.ndarray) -> int:
    """Pixels whose grey level (sum of the 8-bit channels) differs by more than rounding."""
    return int((np.abs(gb - ga) > 3 * LEVELS).sum())


def test_twins_differ_only_in_the_marks_region_and_less_than_non_twins():
    bound = 0
    for a, b in _pairs(SPEC):
        region = _mark_region(SPEC, b)
        d = np.abs(_grey(SPEC, b) - _grey(SPEC, a))
        assert d[~region].max() <= 3 * LEVELS, (a, b, d[~region].max())
        bound = max(bound, int(region.sum()))  # so the twins differ in at most this many pixels
    w = _world(SPEC)
    non_twins = [(i, j) for i in range(SPEC.num_identities) for j in range(i + 1, SPEC.num_identities)
                 if w.twins[i] != j][:60]
    counts = [_differing(_grey(SPEC, i), _grey(SPEC, j)) for i, j in non_twins]
    # non-twins differ in more pixels than any twin pair may: most of them, in fact all but a few
    assert np.median(counts) > bound and np.mean(np.array(counts) > bound) >= 0.9, (sorted(counts)[:10], bound)
    assert bound < SIZE * SIZE / 4  # the marks' region is a small part of the image


def _mirror_ratio(diff: np.ndarray) -> float:
    """||D + flip(D)|| / ||D|| of a twin difference D: 0 when D is its own negated mirror image (a
    flip turns one twin into the other, as a mirrored parting does), 2 when D is symmetric."""
    return float(np.linalg.norm(diff + diff[:, ::-1]) / np.linalg.norm(diff))


def test_a_flip_does_not_turn_one_marked_twin_into_the_other():
    for a, b in _pairs(SPEC):
        ga, gb = _grey(SPEC, a), _grey(SPEC, b)
        assert _mirror_ratio((gb - ga).astype(float)) >= 1.0, (a, b)
        # the flipped twin still carries its mark where the first twin has none
        assert np.abs(gb[:, ::-1] - ga).max() >= 0.15 * 3 * 255
    # what the ratio catches: a difference that is a mirror image (the twin vs its own flip)
    gb = _grey(SPEC, _pairs(SPEC)[0][1]).astype(float)
    assert _mirror_ratio(gb - gb[:, ::-1]) < 1e-9


def test_default_style_keeps_older_datasets():
    subtle = dataclasses.replace(SPEC, twin_style="subtle")
    assert "twin_style" not in subtle.to_dict() and spec_hash(subtle) != spec_hash(SPEC)
    w = _world(subtle)
    a, b = w.twin_pairs[0]
    assert w.latents[b]["part"] == -w.latents[a]["part"] and "twin_mole" not in w.latents[b]
    with pytest.raises(SpecError, match="twin_style"):
        SyntheticSpec(twin_style="mirror")


def test_config_and_cli_carry_the_style():
    from dist_train.config import ConfigError, load_config, synthetic_spec
    from shards.sources.synthetic import SOURCE

    cfg = load_config(None, ["data.synthetic.twin_style=marked"], start=False)
    assert synthetic_spec(cfg).twin_style == "marked"
    assert synthetic_spec(load_config(None, [], start=False)).twin_style == "subtle"
    with pytest.raises(ConfigError, match="data.synthetic.twin_style"):
        load_config(None, ["data.synthetic.twin_style=mirror"], start=False)
    import argparse
    ap = argparse.ArgumentParser()
    SOURCE.add_arguments(ap)
    args = ap.parse_args(["--twin-style", "marked", "--identities", "4", "--twin-fraction", "1", "--size", "16"])
    args.seed = 0
    scan = SOURCE.scan(None, args)
    assert scan.notes["spec"]["twin_style"] == "marked" and len(scan.twin_pairs) == 2
