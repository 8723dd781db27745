"""The dcal_twins recipe: params, transform, verification metrics, config, tracking."""
from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.config import ConfigError, load_config, recipe_params
from dist_train.preflight import load_checked_config
from recipes.base import DataInfo, get_recipe
from tests.conftest import REPO
from tests.tolerance import ops_rtol

CONFIG = REPO / "configs" / "dcal_twins.yaml"


def dcal_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """configs/dcal_twins.yaml as a seconds-long CPU run (tiny ViT, tiny identity-split synthetic set)."""
    values = {
        "experiment.output_dir": str(tmp_path / "runs"),
        "data.synthetic.cache_dir": str(tmp_path.parent / "synthetic-cache-dcal"),
        "data.synthetic.num_identities": 16,
        "data.synthetic.samples_per_identity": 6,
        "data.synthetic.image_size": 32,
        "data.batch_size": 8,
        "recipe.params.img_size": 32,
        "recipe.params.patch_size": 8,
        "recipe.params.depth": 2,
        "train.precision": "fp32",
        "train.max_steps": 4,
        "train.val_every_steps": 2,
        "train.log_every_steps": 1,
        "logging.progress": "false",
        "logging.plot": "false",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


INFO = DataInfo(identities=tuple(f"p{i}" for i in range(6)), twin_pairs=((0, 1),), label_schemas={},
                modalities=("vis.png", "json"))


def _recipe(**params):
    cls = get_recipe("dcal_twins")
    from dist_train.config import build_dataclass

    base = dict(img_size=32, patch_size=8, depth=2)
    base.update(params)
    return cls(build_dataclass(cls.Params, base, prefix="recipe.params"), INFO)


def test_config_file_is_valid_and_monitors_eer(tmp_path):
    cfg = load_config(CONFIG, [f"experiment.output_dir={tmp_path}"])
    assert cfg.recipe.name == "dcal_twins" and cfg.data.synthetic.split_by == "identity"
    assert cfg.checkpoint.monitor == "eer" and cfg.checkpoint.mode == "min"
    assert "loss" not in cfg.train.early_stopping.metrics       # unseen identities: loss is meaningless
    p = recipe_params(cfg)
    assert p.backbone == "vit_tiny_patch16_224" and p.use_glca and p.use_pwca and p.top_r == 0.3
    assert get_recipe("dcal_twins").Params().top_r == 0.1      # the paper's default; the config's grid is 4x4
    with pytest.raises(ConfigError, match="top_r"):
        load_config(CONFIG, ["recipe.params.top_r=0"])
    with pytest.raises(ConfigError, match="recipe.params.head"):
        load_config(CONFIG, ["recipe.params.head=softmax"])
    with pytest.raises(ConfigError, match="weights_path"):
        load_config(CONFIG, ["recipe.params.weights_path=/no/such/file.pth"])


def test_transform_rgb_grey_and_twins():
    r = _recipe()
    rgb = Image.new("RGB", (64, 64), (120, 30, 200))
    out = r.transform({"vis.png": rgb, "json": {"identity": 2, "twin": 3}, "__key__": "x"}, train=True)
    assert out["image"].shape == (3, 32, 32) and out["identity"].item() == 2 and out["twin"].item() == 3
    grey = Image.new("L", (92, 112), 77)                       # ORL-like PGM, no twin field
    out = r.transform({"image.pgm": grey, "json": {"identity": 0}}, train=False)
    assert out["image"].shape == (3, 32, 32)
    raw = out["image"] * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + \
        torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    # grey -> RGB: equal channels, normalised and un-normalised again per channel, each a few roundings
    # on values <= 1 + mean (tests/tolerance.py: ops_rtol)
    tol = 2 * ops_rtol(6) * (1 + 0.485)
    assert torch.allclose(raw[0], raw[1], rtol=0, atol=tol) and torch.allclose(raw[1], raw[2], rtol=0, atol=tol)
    assert out["twin"].item() == 1                              # from the manifest's twin_pairs
    out = r.transform({"png": grey, "json": {}}, train=False)
    assert out["identity"].item() == -1 and out["twin"].item() == -1
    with pytest.raises(KeyError, match="no image"):
        r.transform({"json": {"identity": 0}, "__key__": "k"}, train=False)


def test_baseline_switch_and_param_groups():
    dcal = _recipe().build_model()
    base = _recipe(use_glca=False, use_pwca=False).build_model()
    assert dcal.embed_dim == 2 * base.embed_dim and not hasattr(base, "glca_block")
    assert len(base.vit.blocks) == 2 and base.vit.patch_embed.grid_size == (4, 4)
    groups = _recipe(backbone_lr_mult=0.1).param_groups(dcal, 1e-3)
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[-1]["weight_decay"] == 0.0
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in dcal.parameters())


def test_model_forward_on_recipe_batch():
    r = _recipe(verification_head=True)
    model = r.build_model().train()
    imgs = [Image.new("RGB", (40, 40), (i * 30, 80, 120)) for i in range(6)]
    rows = [r.transform({"vis.png": im, "json": {"identity": i // 2, "twin": {0: 1, 1: 0}.get(i // 2, -1)}},
                        train=True) for i, im in enumerate(imgs)]
    batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
    out = model(batch)
    assert set(out["terms"]) == {"sa", "glca", "pwca", "metric", "verif"}
    out["loss"].backward()
    # the distractor of a twin sample is its co-twin when the batch has one
    d = out["distractor"]
    assert batch["identity"][d[:2]].tolist() == [1, 1] and batch["identity"][d[2:4]].tolist() == [0, 0]


def _state(emb, ident, twin, valid=None, max_pairs=1000):
    m = _recipe(val_max_pairs=max_pairs).new_metrics()
    batch = {"identity": torch.tensor(ident), "twin": torch.tensor(twin)}
    if valid is not None:
        batch["_valid"] = torch.tensor(valid)
    m.update({"embedding": torch.tensor(emb, dtype=torch.float32)}, batch)
    return m, m.state()


def test_verification_metrics_gathered_states_and_padding():
    rng = np.random.default_rng(0)
    ident = np.repeat(np.arange(6), 4)
    twin = np.where(ident < 2, 1 - ident, -1)
    centres = rng.normal(size=(6, 8))
    centres[1] = centres[0] + 0.2 * rng.normal(size=8)
    emb = centres[ident] + 0.3 * rng.normal(size=(24, 8))
    m, whole = _state(emb, ident, twin)
    one = type(m).compute([whole])
    # two "ranks", the second with a padding row that must be ignored
    _, s1 = _state(emb[:10], ident[:10], twin[:10])
    pad_emb = np.r_[emb[10:], emb[:1]]
    _, s2 = _state(pad_emb, np.r_[ident[10:], ident[:1]], np.r_[twin[10:], twin[:1]], valid=[True] * 14 + [False])
    two = type(m).compute([s1, s2])
    assert one.keys() == two.keys()
    for k in one:
        # the same pairs scored by the same row-wise kernels, whatever the rank split: exact
        assert one[k] == two[k] or (np.isnan(one[k]) and np.isnan(two[k])), k
    assert {"eer", "auc", "tar_at_far_0.01", "threshold", "twin_eer", "twin_auc"} <= set(one)
    assert one["twin_eer"] >= one["eer"]                         # co-twins are the hard impostors
    assert whole["embedding"].dtype == np.float16               # small gathers
    empty = type(m).compute([])
    assert np.isnan(empty["eer"])


# ----------------------------------------------------------------------------- tracking

def _train(tmp_path, **overrides):
    from dist_train.main import train

    cfg = load_config(CONFIG, dcal_overrides(tmp_path, **overrides))
    metrics = train(cfg, None)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    return runs[0], metrics


def test_tracking_none_writes_only_local_files(tmp_path):
    run, metrics = _train(tmp_path, logging__tracking="none", train__max_steps=2, train__val_every_steps=2)
    assert not (run / "tb").exists() and not (run / "mlruns").exists()
    assert {p.name for p in run.iterdir()} <= {"checkpoints", "config.yaml", "eval", "final_metrics.json", "logs",
                                                "plots", "model.pt", "launch_id"}
    assert "eer" in metrics and "test_eer" in metrics


def test_tensorboard_holds_the_runs_pictures_hparams_and_config(tmp_path):
    """A real run, read with TensorBoard's own reader: the plots at each validation,
    the report's pictures at the end, the config as text and hparams with the final metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = _train(tmp_path, train__max_steps=4, train__val_every_steps=2, logging__plot="true")
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {"pictures/plots/latest", "pictures/eval/test/roc", "pictures/eval/test/score_histograms"} <= images
    assert [e.step for e in acc.Images("pictures/plots/latest")] == [2, 4]     # each validation (and the end)
    assert "config/text_summary" in acc.PluginTagToContent("text")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_mlflow_tracking(tmp_path, monkeypatch):
    """Two runs of one output dir land in one SQLite store that MLflow's own
    client reads as it is (no MLFLOW_ALLOW_FILE_STORE), with params and metrics."""
    if os.environ.get("CI") != "true":      # the dev extra installs it, so CI runs this test
        pytest.importorskip("mlflow", reason="optional extra: pip install mlflow")
    from mlflow.tracking import MlflowClient

    from dist_train.main import train

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)                      # nothing may land in the working folder
    for depth in (1, 2):
        train(load_config(CONFIG, dcal_overrides(tmp_path, logging__tracking="mlflow", train__max_steps=2,
                                                 train__val_every_steps=2, recipe__params__depth=depth)), None)
    out = tmp_path / "runs"
    runs = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("dcal_twins_"))
    assert len(runs) == 2 and all(list((r / "tb").glob("events.out.tfevents.*")) for r in runs)  # TB stays on
    assert not any((r / "mlruns").exists() for r in runs) and not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("dcal_twins")
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert sorted(r.info.run_name for r in found) == [r.name for r in runs]
    assert [r.data.params["recipe.params.depth"] for r in found] == ["1", "2"]
    for r in found:
        assert r.info.status == "FINISHED" and r.data.params["recipe.name"] == "dcal_twins"
        assert {"train/loss", "val/eer", "val/auc", "val/threshold", "test/eer"} <= set(r.data.metrics)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2]
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "logs", "eval"} <= arts
        assert Path(r.info.artifact_uri.removeprefix("file://")).is_relative_to(out.resolve())


def test_mlflow_holds_the_pictures_of_each_validation(tmp_path, monkeypatch):
    """As TensorBoard: every PNG a validation wrote is an MLflow image at that
    validation's step (the plots at both validations), the report's at the end;
    read back with MLflow's own client."""
    if os.environ.get("CI") != "true":      # the dev extra installs it, so CI runs this test
        pytest.importorskip("mlflow", reason="optional extra: pip install mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from dist_train.main import train

    train(load_config(CONFIG, dcal_overrides(tmp_path, logging__tracking="mlflow", train__max_steps=4,
                                             train__val_every_steps=2, logging__plot="true")), None)
    (run,) = (p for p in (tmp_path / "runs").iterdir() if p.name.startswith("dcal_twins_"))
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}")
    (found,) = client.search_runs([client.get_experiment_by_name("dcal_twins").experiment_id])
    steps: dict[str, set[int]] = {}
    for art in client.list_artifacts(found.info.run_id, "images"):
        name = Path(art.path).name          # <key with / as ~>+step+<step>+timestamp+<ms>+<uuid>.png
        if name.endswith(".png") and "+step+" in name:
            key, _, rest = name.partition("+step+")
            steps.setdefault(key.replace("~", "/"), set()).add(int(rest.split("+")[0]))
    assert steps["pictures/plots/latest"] == {2, 4}                # at each validation, not only at the end
    assert steps["pictures/eval/test/roc"] == {4}
    local = client.download_artifacts(found.info.run_id, next(
        a.path for a in client.list_artifacts(found.info.run_id, "images") if "eval~test~roc+step+4" in a.path
        and a.path.endswith(".png")), str(tmp_path / "back"))
    assert Image.open(local).size == Image.open(run / "eval" / "test" / "roc.png").size


def test_mlflow_missing_is_a_one_line_config_error(monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ConfigError, match="pip install mlflow") as exc:
        load_checked_config(CONFIG, ["logging.tracking=mlflow"])
    assert "\n" not in str(exc.value)
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"


@pytest.mark.integration
@pytest.mark.parametrize("sharding", ["none", "partial_fc"])
def test_two_ranks_gather_the_verification_state(tmp_path, sharding):
    """torchrun, 2 ranks: validation metrics and the test report see every sample once;
    with the identity centres sharded across the ranks (Partial FC) too, whose
    checkpoint then holds both ranks' centres."""
    import json
    import subprocess

    from shards.manifest import Manifest
    from tests.conftest import PYTHON

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(CONFIG), *dcal_overrides(tmp_path, train__max_steps=2, train__val_every_steps=2,
                                                    logging__tracking="none", data__batch_size=4,
                                                    recipe__params__identity_head_sharding=sharding)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    final = json.loads((run / "final_metrics.json").read_text())
    assert 0.0 <= final["eer"] <= 1.0 and 0.0 <= final["test_eer"] <= 1.0
    report = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    data = next((tmp_path.parent / "synthetic-cache-dcal").glob("synthetic-*"))
    m = Manifest.load(data)
    n = m.split_size("test")
    assert report["samples"] == n                        # no padding row, no sample twice
    per_id = n // report["identities"]
    assert report["pairs"]["genuine"] == report["identities"] * per_id * (per_id - 1) // 2
    from dist_train.checkpoint import safe_load

    centres = safe_load(run / "checkpoints" / "latest.pt")["model"]["head_sa.weight"]
    assert centres.shape[0] == m.data_info().num_identities


def test_recipe_params_check_the_backbone_family_in_one_line():
    from dist_train.config import ConfigError, build_dataclass
    from recipes.dcal_twins import DCALTwinsParams

    def params(**kw):
        return build_dataclass(DCALTwinsParams, kw, prefix="recipe.params")

    with pytest.raises(ConfigError, match="recipe.params: backbone 'swin_tiny_patch4_window7_224'") as err:
        params(backbone="swin_tiny_patch4_window7_224")
    assert "\n" not in str(err.value) and "hybrid" in str(err.value)
    with pytest.raises(ConfigError, match=r"recipe.params: attention_dim \(0\) and num_heads \(0\)"):
        params(backbone="resnet18")                       # a CNN needs the attention blocks' shape
    with pytest.raises(ConfigError, match="CNN backbone only"):
        params(backbone="vit_tiny_patch16_224", attention_dim=64, num_heads=4)
    with pytest.raises(ConfigError, match="conv_stem / patch_size apply to a ViT"):
        params(backbone="resnet18", attention_dim=64, num_heads=4, patch_size=8)
    assert params(backbone="vit_small_r26_s32_224", depth=1).model_config(3).backbone == "vit_small_r26_s32_224"
    cnn = params(backbone="resnet50", attention_dim=512, num_heads=8).model_config(3)
    assert (cnn.attention_dim, cnn.num_heads, cnn.attention_depth) == (512, 8, 2)   # depth 0: two blocks


CNN_CONFIG = REPO / "configs" / "dcal_twins" / "cnn.yaml"


def test_dcal_on_a_cnn_trains_and_its_stored_config_rebuilds_it(tmp_path, capsys):
    """configs/dcal_twins/cnn.yaml: a few steps, then the exported model.pt is rebuilt from its
    stored config (what biomtl eval / verify / demo / export do) with the same weights, the
    attention maps cover the CNN grid, and biomtl eval reproduces the run's own test EER."""
    import json

    from dist_train.cli import main as cli
    from dist_train.inference import InferenceEngine
    from dist_train.main import train
    from models.cnn_tokens import CNNFeatureMap

    cfg = load_config(CNN_CONFIG, dcal_overrides(tmp_path, **{"recipe.params.patch_size": 0,
                                                               "logging.tracking": "none"}))
    final = train(cfg, None)
    (run,) = (tmp_path / "runs").iterdir()
    engine = InferenceEngine.from_checkpoint(run / "model.pt", device="cpu")
    model = engine.model
    assert isinstance(model.vit.patch_embed.backbone, CNNFeatureMap) and model.vit.embed_dim == 128
    assert [b.attn.num_heads for b in model.vit.blocks] == [4, 4]
    stored = torch.load(run / "model.pt", map_location="cpu", weights_only=True)["model"]
    state = model.state_dict()
    assert set(stored) == set(state) and all(torch.equal(stored[k], state[k].to(stored[k].dtype)) for k in stored)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8))
              for i in range(2)]
    maps = engine.attention_maps(images)
    assert maps.shape == (2, 4, 4)                            # the CNN's 4x4 grid, scaled to [0, 1] per image
    assert maps.reshape(2, -1).min(1).tolist() == [0.0, 0.0] and maps.reshape(2, -1).max(1).tolist() == [1.0, 1.0]
    assert engine.attention_maps(images, upsample=True).shape == (2, 32, 32)
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(run / "model.pt"), "--output", str(tmp_path / "ev"), "--no-progress",
                "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    pairs = report["pairs"]["genuine"] + report["pairs"]["impostor"]
    # the same embeddings up to float rounding: at most a pair's worth of difference in the EER
    assert report["all_impostors"]["eer"] == pytest.approx(final["test_eer"], abs=1.0 / pairs)


@pytest.mark.parametrize("override, fragment", [
    ("recipe.params.num_heads=3", "recipe.params: attention_dim (128) must be a multiple of num_heads (3)"),
    ("recipe.params.attention_dim=0", "recipe.params: attention_dim (0) and num_heads (4) must be >= 1")])
def test_a_bad_attention_shape_exits_2_in_one_line_writing_nothing(tmp_path, capsys, override, fragment):
    from dist_train.main import run

    capsys.readouterr()
    assert run(["--config", str(CNN_CONFIG), *dcal_overrides(tmp_path, **{"recipe.params.patch_size": 0}),
                override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "runs").exists()


MULTI_NODE = REPO / "configs" / "dcal_twins" / "multi_node.yaml"


def test_multi_node_preset_on_a_cpu_machine_is_one_line_or_runs_with_auto(tmp_path, capsys, monkeypatch):
    """The preset's dist.backend=nccl on a machine without GPUs: one line naming the key, exit 2,
    nothing written (it was a RuntimeError traceback); with dist.backend=auto it trains on gloo."""
    from dist_train.main import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a GPU machine
    tiny = dcal_overrides(tmp_path, **{"train.max_steps": 2, "logging.tracking": "none", "data.num_workers": 0,
                                       "data.synthetic.cache_dir": str(tmp_path / "data")})
    capsys.readouterr()
    assert run(["--config", str(MULTI_NODE), *tiny]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: dist.backend=nccl needs CUDA GPUs"), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    assert run(["--config", str(MULTI_NODE), *tiny, "dist.backend=auto"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("dcal_twins_multinode_") and (run_dir / "model.pt").is_file()


def _wandb_records(path):
    """The records of an offline W&B run file. W&B no longer ships a reader; the file
    is a LevelDB-style log (7-byte file header, 32 KiB blocks, chunks of
    crc32/length/type headers) of protobuf ``Record``s, decoded with W&B's own protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_tracking(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional extra: pip install wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")           # offline needs no account
    run, _ = _train(tmp_path, logging__tracking="wandb", train__max_steps=2, train__val_every_steps=2,
                    logging__plot="true")
    assert list((run / "tb").glob("events.out.tfevents.*"))    # TensorBoard stays on
    (offline,) = (run / "wandb").glob("offline-run-*")          # offline: `wandb sync` uploads it later
    run_id = (run / "wandb" / "biomtl_run_id").read_text().strip()
    assert offline.name.endswith(run_id)
    records = _wandb_records(offline / f"run-{run_id}.wandb")
    history, media = {}, {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                value = json.loads(item.value_json)
                if len(item.nested_key) == 2:   # a wandb.Image: {tag: {"_type", "path", ...}} as nested keys
                    media.setdefault(item.nested_key[0], {})[item.nested_key[1]] = value
                else:
                    history.setdefault(item.key or item.nested_key[0], []).append((r.history.step.num, value))
    assert [s for s, _ in history["train/loss"]] == [1, 2]
    assert {"val/eer", "val/auc", "test/eer"} <= set(history)
    config = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {u.key for c in config for u in c.update}
    assert {"recipe", "train", "data"} <= keys
    files = offline / "files"                       # the run's files, at their paths in the run directory
    for rel in ("config.yaml", "logs/train_logs.csv", "logs/validation_logs.csv", "logs/test_logs.csv",
                "plots/latest.png", "eval/test/roc.png"):
        assert not (files / rel).is_symlink() and (files / rel).read_bytes() == (run / rel).read_bytes(), rel
    # the pictures as W&B media (wandb.Image), at the step of the validation / end that wrote them
    assert media["pictures/plots/latest"]["_type"] == "image-file"
    assert media["pictures/eval/test/roc"]["_type"] == "image-file"
    assert (files / media["pictures/eval/test/roc"]["path"]).is_file()
    exit_records = [r for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_records and exit_records[-1].exit.exit_code == 0


def test_wandb_missing_is_a_one_line_config_error(monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="pip install wandb") as exc:
        load_checked_config(CONFIG, ["logging.tracking=wandb"])
    assert "\n" not in str(exc.value)
