"""A manifest is untrusted input: a field of the wrong shape (``splits`` a list,
``image_stats.mean`` a string, ...) is one line naming the field in every
reader (``shards info``/``verify``, training preflight), never a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards import cli
from shards.manifest import MANIFEST_NAME, Manifest

BAD_FIELDS = [
    ({"splits": ["train"]}, "'splits' must be a mapping, got list"),
    ({"splits": {"train": {"file": "x.tar"}}}, "'splits.train' must be a list of shard entries, got dict"),
    ({"splits": {"train": ["x.tar"]}}, "'splits.train[0]' must be a mapping"),
    ({"image_stats": {"vis.png": {"mean": "0.5", "std": [0.2]}}},
     "'image_stats.vis.png.mean' must be a list of numbers, got str"),
    ({"image_stats": {"vis.png": {"width": 3}}}, "'image_stats.vis.png.width' must be a mapping of numbers"),
    ({"split_stats": {"train": {"labels": ["gender"]}}}, "'split_stats.train.labels' must be a mapping"),
    ({"split_stats": {"train": {"identity_ids": [0, "1"]}}}, "'split_stats.train.identity_ids' must be a list of identity indices"),
    ({"identities": "abc"}, "'identities' must be a list, got str"),
    ({"twin_pairs": [[0]]}, "'twin_pairs[0]' must be two identity indices"),
    ({"label_schemas": {"gender": "mf"}}, "'label_schemas.gender' must be a list of class names"),
    ({"pairs": [{"key1": "a", "key2": "b", "label": 2}]},
     "'pairs[0]' must be a mapping with key1, key2 and label 0 or 1"),
]


def _dataset(root: Path, fields: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).write_text(json.dumps({**Manifest(identities=["a", "b"]).to_dict(), **fields}))
    return root


@pytest.mark.parametrize("fields, fragment", BAD_FIELDS)
def test_a_malformed_field_is_one_line_naming_it(tmp_path: Path, fields: dict, fragment: str) -> None:
    root = _dataset(tmp_path / "d", fields)
    with pytest.raises(ValueError) as err:
        Manifest.load(root)
    assert f"{root / MANIFEST_NAME}: malformed manifest: {fragment}" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["info", "verify"])
@pytest.mark.parametrize("fields, fragment", BAD_FIELDS[:4])
def test_shards_info_and_verify_exit_2_in_one_line(tmp_path: Path, capsys, command: str, fields: dict,
                                                   fragment: str) -> None:
    root = _dataset(tmp_path / "d", fields)
    rc = cli.run([command, str(root)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and fragment in err[0], err


@pytest.mark.parametrize("fields, fragment", BAD_FIELDS[:4])
def test_training_preflight_names_the_field(tmp_path: Path, fields: dict, fragment: str) -> None:
    from dist_train.config import ConfigError
    from dist_train.preflight import load_checked_config
    from tests.conftest import REPO, tiny_overrides

    root = _dataset(tmp_path / "d", fields)
    with pytest.raises(ConfigError, match="unreadable manifest") as err:
        load_checked_config(REPO / "configs" / "facecom.yaml",
                            tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={root}"])
    assert fragment in str(err.value) and "\n" not in str(err.value)
