"""DeepSpeed strategy end to end: 2 ranks (gloo, CPU) through torchrun.

One module-scoped set of runs (each torchrun launch costs ~30-60 s of imports,
validation and artefacts on a 2-core box, so the runs are shared by the tests):
DDP, ZeRO-2 and ZeRO-3 over the same 5 optimizer steps, and ZeRO-2 stopped at
step 3 then resumed with ``--resume latest``.

The setting makes the comparison exact up to float summation order: a
LayerNorm ViT without dropout or a BatchNorm embedding (nothing random or
batch-dependent in the forward), fp32, SGD with momentum (linear in the
gradient: a 1-ulp difference in a reduced gradient stays a 1-ulp-sized
difference in the weights, where Adam's g/sqrt(v) would turn noise on a
near-zero gradient into an lr-sized step), global-norm clipping that is
active, weight decay, warmup + cosine LR, micro-batch 4 x accumulation 2 with
7 batches per epoch, so step 4 is the trainer's short last window (1 batch)
and step 5 is in the next epoch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import safe_load
from dist_train.config import ConfigError, load_config
from dist_train.preflight import load_checked_config
from tests.conftest import PYTHON, REPO, tiny_overrides

pytestmark = pytest.mark.integration  # torchrun / DeepSpeed / SLURM / full training runs

CONFIG = REPO / "configs" / "facecom.yaml"
DS_CONFIGS = REPO / "configs" / "deepspeed"

COMMON = dict(recipe__params__backbone="vit_tiny_patch16_224", recipe__params__img_size=32,
              recipe__params__embedding_norm="none", recipe__params__dropout=0.0,
              data__batch_size=4, train__grad_accum=2, train__max_steps=5,
              train__optimizer="sgd", train__lr=0.05, train__momentum=0.9, train__weight_decay=0.01,
              train__grad_clip=5.0, train__scheduler__warmup_steps=1, logging__tracking="none")

# Tolerances. Step 1 is bit-identical (same weights, same data, nothing
# reduced yet). After that the runs may differ only in how fp32 gradients are
# summed over ranks (DDP: bucketed all-reduce, then /world; ZeRO: pre-divided
# reduce-scatter / all-reduce of flat buffers): a few 1e-7 relative per
# element, which SGD carries linearly into the weights. Measured over these 5
# steps: logged losses equal to the CSV's 6 significant digits, grad norms
# within 2.3e-6 relative, weights within 6e-8 absolute (1 ulp at ~1).
# The bounds leave >= 4x (norms) to 16x (weights) room and stay orders of
# magnitude below what a real mistake moves: letting DeepSpeed's own
# micro-step counter and 1/gradient_accumulation_steps decide the windows
# instead of the trainer (tried) leaves the short step-4 window unapplied
# (grad norm 100.7 instead of 54.2) and moves the step-5 loss by 1.2%.
#
# These two are measured, not derived (tests/tolerance.py): the runs are whole trajectories, and
# how far a rounding difference in step k moves step k + 1 depends on the loss surface (the
# Hessian times the LR), which no dtype bound knows. A derived check would compare one step at a
# time from the same weights and optimizer state (as tests/dist_train/test_compile_channels_last.py
# does); with separate torchrun processes that needs a per-step checkpoint of each run loaded
# into the other, left for later.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def _launch(tmp: Path, *extra: str, resume: bool = False, **overrides: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(CONFIG), *(["--resume", "latest"] if resume else []),
           *tiny_overrides(tmp, **{**COMMON, **overrides}), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _run_dir(tmp: Path) -> Path:
    runs = sorted((tmp / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "logs" / "train_logs.csv").open() as fh:
        return list(csv.DictReader(fh))


def _ds(name: str) -> dict[str, str]:
    return dict(train__strategy="deepspeed", deepspeed__config=str(DS_CONFIGS / name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ds")
    out = {}
    for name, overrides in (("ddp", {}), ("zero2", _ds("zero2.json")), ("zero3", _ds("zero3.json"))):
        _launch(base / name, **overrides)
        out[name] = _run_dir(base / name)
    part = base / "zero2_resumed"
    _launch(part, train__stop_at_step=3, **_ds("zero2.json"))
    out["zero2_stopped"] = _run_dir(part)
    out["zero2_stopped_client_step"] = safe_load_client_step(out["zero2_stopped"])
    _launch(part, resume=True, **_ds("zero2.json"))
    out["zero2_resumed"] = _run_dir(part)
    return out


def safe_load_client_step(run: Path) -> int:
    from dist_train.strategies.deepspeed import TAG
    from recipes.model_file import deepspeed_client, deepspeed_states_file

    states = torch.load(deepspeed_states_file(run / "checkpoints" / "latest" / TAG),
                        map_location="cpu", weights_only=False)  # DeepSpeed's format, written by this test
    return int(deepspeed_client(states)["loop"]["step"])


def _model(path: Path) -> dict[str, torch.Tensor]:
    state = safe_load(path)  # weights_only=True: the consolidated file is plain tensors and data
    assert set(state) == {"model", "config", "data_info", "format_version"}
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    return state["model"]


# ---------------------------------------------------------------------------


def test_zero2_and_zero3_follow_ddp(runs: dict[str, Path]) -> None:
    ddp = _rows(runs["ddp"])
    assert [int(r["step"]) for r in ddp] == [1, 2, 3, 4, 5]
    for name in ("zero2", "zero3"):
        rows = _rows(runs[name])
        assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5], name
        assert [int(r["epoch"]) for r in rows] == [int(r["epoch"]) for r in ddp], name
        assert float(rows[0]["loss"]) == float(ddp[0]["loss"]), name  # same start, bit for bit
        for key in ("loss", "gender", "identity", "grad_norm"):
            ours, theirs = [float(r[key]) for r in rows], [float(r[key]) for r in ddp]
            assert ours == pytest.approx(theirs, rel=LOSS_RTOL), (name, key)
        assert [float(r["lr"]) for r in rows] == [float(r["lr"]) for r in ddp], name  # schedule per optimizer step
        assert float(ddp[0]["grad_norm"]) > COMMON["train__grad_clip"]  # clipping was active


def test_exported_weights_match_ddp(runs: dict[str, Path]) -> None:
    ddp = _model(runs["ddp"] / "model.pt")
    init_moved = False
    for name in ("zero2", "zero3"):
        ours = _model(runs[name] / "model.pt")
        assert ours.keys() == ddp.keys(), name
        for key in ddp:
            torch.testing.assert_close(ours[key], ddp[key], atol=WEIGHT_ATOL, rtol=0, msg=f"{name} {key}")
    # the DDP end-of-training file is the DDP checkpoint's weights
    ddp_ckpt = safe_load(runs["ddp"] / "checkpoints" / "latest.pt")["model"]
    for key in ddp:
        assert torch.equal(ddp[key], ddp_ckpt[key].float()), key
        init_moved |= bool((ddp[key] != 0).any())
    assert init_moved


def test_export_command_matches_the_end_of_training_file(runs: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """`biomtl export` of the final DeepSpeed checkpoint (zero_to_fp32 over the
    rank files) gives exactly the weights gathered from the live engine at the
    end of training; a run directory means its latest checkpoint; a DDP .pt
    exports too (optimizer state dropped)."""
    from dist_train.commands import export_cmd
    from dist_train.export import export_checkpoint

    out = tmp_path / "zero3.pt"  # the command line, in a fresh process
    proc = subprocess.run([PYTHON, "-m", "dist_train.cli", "export", "--checkpoint",
                           str(runs["zero3"] / "checkpoints" / "latest"), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exports = {"zero3": out,
               "zero2": export_checkpoint(runs["zero2"], tmp_path / "zero2.pt"),
               "ddp": export_checkpoint(runs["ddp"] / "checkpoints" / "latest.pt", tmp_path / "ddp.pt")}
    for name, path in exports.items():
        exported, live = _model(path), _model(runs[name] / "model.pt")
        assert exported.keys() == live.keys()
        for key in live:
            assert torch.equal(exported[key], live[key]), (name, key)
        assert safe_load(path)["config"]["train"]["strategy"] == ("ddp" if name == "ddp" else "deepspeed")
    assert "checkpoint shards" not in capsys.readouterr().err  # zero_to_fp32's progress bar is kept quiet
    assert export_cmd.run(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x.pt")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_loads_into_the_ddp_strategy_and_inference_engine(runs: dict[str, Path]) -> None:
    """ZeRO-3 export -> recipe model -> DDP strategy, and -> InferenceEngine
    (from the file and from the run directory): the same predictions and
    embeddings as the DDP-trained model."""
    from dist_train.export import load_exported
    from dist_train.inference import InferenceEngine
    from dist_train.precision import Precision
    from dist_train.strategies.base import StrategyOptions
    from dist_train.strategies.ddp import DDPStrategy

    model, cfg, info = load_exported(runs["zero3"] / "model.pt")
    reference, _, _ = load_exported(runs["ddp"] / "model.pt")
    strategy = DDPStrategy(model, torch.device("cpu"),
                           make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                           make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                           options=StrategyOptions(Precision("fp32", "cpu")))
    strategy.eval()
    size = cfg.recipe.params["img_size"]
    torch.manual_seed(0)
    batch = {"image": torch.randn(4, 3, size, size), "identity": torch.arange(4) % info.num_identities,
             "gender": torch.tensor([0, 1, 0, 1])}
    out, ref = strategy.eval_forward(batch), reference(batch)
    assert math.isfinite(float(out["loss"]))
    torch.testing.assert_close(out["identity_logits"], ref["identity_logits"], atol=1e-4, rtol=1e-4)
    expected = torch.nn.functional.normalize(ref["embedding"], dim=1)
    for source in (runs["zero3"] / "model.pt", runs["zero3"]):
        engine = InferenceEngine.from_checkpoint(source, device="cpu")
        torch.testing.assert_close(engine.embed_tensor(batch["image"]), expected, atol=1e-4, rtol=1e-4)


def test_resume_latest_ends_with_the_same_weights(runs: dict[str, Path]) -> None:
    assert runs["zero2_stopped_client_step"] == 3
    full, resumed = _model(runs["zero2"] / "model.pt"), _model(runs["zero2_resumed"] / "model.pt")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    rows, ref = _rows(runs["zero2_resumed"]), _rows(runs["zero2"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]  # no step lost or repeated
    # the resumed run repeats the same kernels on the same weights and data: the same losses, exactly
    assert [float(r["loss"]) for r in rows] == [float(r["loss"]) for r in ref]
    ckpt = runs["zero2_resumed"] / "checkpoints"
    assert (ckpt / "latest" / "latest").read_text().strip() == "state"
    assert (ckpt / "best.pt").is_file() and not list(ckpt.glob(".staging*"))  # best / top-k: weights-only files


# ---------------------------------------------------------------------------
# Configuration errors: one line, exit 2, before any process group.


def _write_json(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data, extra, needle", [
    ({"train_micro_batch_size_per_gpu": 16}, {}, "train_micro_batch_size_per_gpu=16 contradicts data.batch_size=8"),
    ({"gradient_accumulation_steps": 4}, {"train__grad_accum": 2}, "gradient_accumulation_steps=4 contradicts"),
    ({"train_batch_size": 64}, {}, "train_batch_size=64 contradicts"),
    ({"gradient_clipping": 1.0}, {"train__grad_clip": 5.0}, "gradient_clipping=1.0 contradicts train.grad_clip"),
    ({"bf16": {"enabled": True}}, {"train__precision": "fp32"}, "bf16.enabled=true contradicts train.precision"),
    ({"optimizer": {"type": "Adam"}}, {}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 4}}, {}, "zero_optimization.stage must be"),
])
def test_contradictions_are_config_errors(tmp_path: Path, data: dict, extra: dict, needle: str) -> None:
    path = _write_json(tmp_path, data)
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        load_checked_config(CONFIG, tiny_overrides(tmp_path, train__strategy="deepspeed", deepspeed__config=str(path),
                                           **extra))
    assert "\n" not in str(info.value)


def test_matching_or_auto_values_are_accepted(tmp_path: Path) -> None:
    from dist_train.preflight import deepspeed_json

    path = _write_json(tmp_path, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
                                  "gradient_clipping": 5.0, "bf16": {"enabled": True},
                                  "zero_optimization": {"stage": 2}})
    cfg = load_config(CONFIG, tiny_overrides(tmp_path, train__strategy="deepspeed", deepspeed__config=str(path),
                                             train__precision="bf16", train__grad_accum=3, train__grad_clip=5.0))
    ds = deepspeed_json(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (8, 3, 96)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 5.0
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"]
    offload = load_config(CONFIG, tiny_overrides(tmp_path, train__strategy="deepspeed",
                                                 deepspeed__config=str(DS_CONFIGS / "zero3_offload.json")))
    assert deepspeed_json(offload, 2)["zero_force_ds_cpu_optimizer"] is False  # the torch optimizer steps on CPU


def test_contradiction_exits_2_with_one_line(tmp_path: Path) -> None:
    path = _write_json(tmp_path, {"train_micro_batch_size_per_gpu": 16})
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(CONFIG),
                           *tiny_overrides(tmp_path, train__strategy="deepspeed", deepspeed__config=str(path))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: deepspeed.config"), proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is DeepSpeed-supported on a GPU")
def test_fp16_on_cpu_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dist_train.main import run
    from dist_train.strategies.deepspeed import fp16_supported_here

    if fp16_supported_here():
        pytest.skip("this CPU has oneDNN fp16 kernels: DeepSpeed accepts fp16 here")
    code = run(["--config", str(CONFIG), *tiny_overrides(tmp_path, train__strategy="deepspeed", train__precision="fp16",
                                                         deepspeed__config=str(DS_CONFIGS / "zero2.json"))])
    assert code == 2  # the entry point's exit status, before any process group
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fp16" in lines[0] and "CUDA" in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_overflow_skips_are_reported_as_skipped_steps() -> None:
    """fp16 overflow cannot happen on this CPU (DeepSpeed refuses fp16 here), so
    the plumbing is checked against a stand-in engine: a step DeepSpeed skipped
    (its ``skipped_steps`` counter moved) comes back as ``StepStats(skipped=True)``."""
    from dist_train.strategies.deepspeed import DeepSpeedStrategy

    class Engine:
        skipped_steps, steps = 0, 0

        def get_lr(self):
            return [0.1]

        def step(self):
            self.steps += 1
            self.skipped_steps += self.steps == 2  # the second step overflows

        def get_global_grad_norm(self):
            return float("inf") if self.steps == 2 else 3.0

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.engine, strategy.optimizer = Engine(), type("Zero", (), {"_global_grad_norm": 0.0, "loss_scale": 2.0})()
    first, second = strategy.optimizer_step(), strategy.optimizer_step()
    assert (first.skipped, first.grad_norm, first.lr) == (False, 3.0, 0.1)
    assert second.skipped and math.isnan(second.grad_norm) and strategy.skipped_steps == 1
