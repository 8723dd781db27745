"""One module owns the model-file and checkpoint formats (recipes/model_file.py):
no other shipped module spells their layout keys, and what it writes it reads
back (older files without ``format_version`` too; newer ones are refused)."""
from __future__ import annotations

import re

import pytest
import torch

from recipes import model_file as mf
from tests.conftest import REPO

OWNER = REPO / "recipes" / "model_file.py"
SHIPPED = ("dist_train", "recipes", "models", "shards", "launch")
# The layout keys as code would spell them to read or write a file's part.
LAYOUT = re.compile(r"""["'](client|data_info|biomtl_client|format_version|skipped_steps|ds_config)["']"""
                    r"""|\[["'](model|config|optimizer|scheduler|scaler|module)["']\]""")


def test_no_module_but_the_owner_spells_the_checkpoint_layout():
    found = []
    for pkg in SHIPPED:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path == OWNER:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if LAYOUT.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "checkpoint layout parsed outside recipes/model_file.py:\n" + "\n".join(found)


def test_the_grep_would_see_a_parser():
    assert LAYOUT.search('client = state["client"]') and LAYOUT.search('model = state["model"]')
    assert LAYOUT.search("data_info = obj.get('data_info')")


def test_model_file_round_trip_and_versions(tmp_path):
    weights = {"w": torch.ones(2)}
    path = tmp_path / "model.pt"
    torch.save(mf.model_file(weights, {"recipe": {"name": "facecom"}}, {"identities": []}, threshold=0.25), path)
    stored = mf.read_stored(mf.load_weights_only(path))
    assert stored.kind == "exported model" and stored.threshold == 0.25 and torch.equal(stored.model["w"], weights["w"])
    assert stored.config == {"recipe": {"name": "facecom"}}
    older = mf.model_file(weights, {}, {})
    del older["format_version"]  # written before the field existed: read the same way
    assert mf.read_stored(older).config == {}
    with pytest.raises(mf.FormatError, match="newer biomtl"):
        mf.read_stored({**older, "format_version": mf.FORMAT_VERSION + 1})


def test_trainer_checkpoint_round_trip():
    client = {"config": {"a": 1}, "data_info": {}, "loop": {"step": 7}}
    obj = mf.trainer_checkpoint({"w": torch.zeros(1)}, {"state": {}}, {}, {}, 2, client)
    state = mf.read_trainer_state(obj)
    assert state.skipped_steps == 2 and state.client is client
    stored = mf.read_stored(obj)
    assert stored.kind == "trainer checkpoint" and stored.step == 7 and stored.config == {"a": 1}
    with pytest.raises(mf.FormatError, match="an exported model file"):
        mf.read_trainer_state(mf.model_file({"w": torch.zeros(1)}, {}, {}))
    ds = {"module": {"w": torch.zeros(1)}, **mf.deepspeed_client_state(client)}
    assert mf.deepspeed_client(ds) is client
