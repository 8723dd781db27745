"""FSDP2 strategy end to end: 2 ranks (gloo, CPU) through torchrun, beside DDP.

The same setting as tests/dist_train/test_deepspeed.py (see there why it makes
the comparison exact up to float summation order): a LayerNorm ViT without
dropout, fp32, SGD with momentum, active global-norm clipping, weight decay,
warmup + cosine, micro-batch 4 x accumulation 2 over 7 batches per epoch (step
4 is the short last window, step 5 in the next epoch). One module-scoped set
of runs: DDP, FSDP over the same 5 steps, and FSDP stopped at step 3 then
resumed with ``--resume latest``.
"""
from __future__ import annotations

import math
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import safe_load
from tests.conftest import PYTHON, REPO, tiny_overrides
from tests.tolerance import gamma, unit_roundoff
from tests.dist_train.test_deepspeed import COMMON, CONFIG, LOSS_RTOL, WEIGHT_ATOL, _model, _rows, _run_dir

pytestmark = pytest.mark.integration  # torchrun launches

FSDP = dict(train__strategy="fsdp")


def _launch(tmp: Path, *extra: str, resume: bool = False, **overrides: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(CONFIG), *(["--resume", "latest"] if resume else []),
           *tiny_overrides(tmp, **{**COMMON, **overrides}), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, overrides in (("ddp", {}), ("fsdp", FSDP)):
        _launch(base / name, **overrides)
        out[name] = _run_dir(base / name)
    part = base / "fsdp_resumed"
    _launch(part, train__stop_at_step=3, **FSDP)
    out["fsdp_stopped_step"] = safe_load(_run_dir(part) / "checkpoints" / "latest" / "trainer.pt")["client"]["loop"]["step"]
    _launch(part, resume=True, **FSDP)
    out["fsdp_resumed"] = _run_dir(part)
    return out


def test_fsdp_follows_ddp(runs: dict[str, Path]) -> None:
    ddp, rows = _rows(runs["ddp"]), _rows(runs["fsdp"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [int(r["epoch"]) for r in rows] == [int(r["epoch"]) for r in ddp]
    assert float(rows[0]["loss"]) == float(ddp[0]["loss"])  # same start, bit for bit
    for key in ("loss", "gender", "identity", "grad_norm"):
        ours, theirs = [float(r[key]) for r in rows], [float(r[key]) for r in ddp]
        assert ours == pytest.approx(theirs, rel=LOSS_RTOL), key
    assert [float(r["lr"]) for r in rows] == [float(r["lr"]) for r in ddp]
    assert float(ddp[0]["grad_norm"]) > COMMON["train__grad_clip"]  # clipping was active


def test_exported_weights_match_ddp(runs: dict[str, Path]) -> None:
    ddp, ours = _model(runs["ddp"] / "model.pt"), _model(runs["fsdp"] / "model.pt")
    assert ours.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(ours[key], ddp[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


def test_checkpoint_is_a_dcp_folder_that_exports_to_the_live_file(runs: dict[str, Path], tmp_path: Path) -> None:
    """`biomtl export` of the DCP folder (both ranks' shards read back without a
    process group) gives exactly the weights gathered at the end of training."""
    latest = runs["fsdp"] / "checkpoints" / "latest"
    assert (latest / ".metadata").is_file() and len(list(latest.glob("*.distcp"))) == 2
    assert (runs["fsdp"] / "checkpoints" / "best.pt").is_file()  # weights only (test_lean_folder_checkpoints.py)
    out = tmp_path / "fsdp.pt"
    proc = subprocess.run([PYTHON, "-m", "dist_train.cli", "export", "--checkpoint", str(runs["fsdp"]),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, live = _model(out), _model(runs["fsdp"] / "model.pt")
    assert exported.keys() == live.keys()
    for key in live:
        assert torch.equal(exported[key], live[key]), key
    assert safe_load(out)["config"]["train"]["strategy"] == "fsdp"


def test_resume_latest_ends_with_the_same_weights(runs: dict[str, Path]) -> None:
    assert runs["fsdp_stopped_step"] == 3
    full, resumed = _model(runs["fsdp"] / "model.pt"), _model(runs["fsdp_resumed"] / "model.pt")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    rows, ref = _rows(runs["fsdp_resumed"]), _rows(runs["fsdp"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == [float(r["loss"]) for r in ref]
    assert not list((runs["fsdp_resumed"] / "checkpoints").glob(".staging*"))


def test_crafted_index_is_refused_in_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    """DCP unpickles its index: a folder whose .metadata pickles anything but
    DCP's own classes is refused before it is unpickled (export and resume)."""
    import shutil

    from dist_train.config import ConfigError
    from dist_train.preflight import check_resume, load_checked_config
    from dist_train.strategies.dcp_files import DCPLoadError, read_index

    bad = tmp_path / "latest"
    shutil.copytree(runs["fsdp"] / "checkpoints" / "latest", bad)
    marker = tmp_path / "ran"
    (bad / ".metadata").write_bytes(pickle.dumps(_Touch(str(marker))))
    with pytest.raises(DCPLoadError, match=r"it pickles pathlib.Path.touch"):
        read_index(bad)
    cfg = load_checked_config(CONFIG, tiny_overrides(tmp_path, **{**COMMON, **FSDP}))
    with pytest.raises(ConfigError, match=r"\.metadata: refused"):
        check_resume(cfg, bad)
    proc = subprocess.run([PYTHON, "-m", "dist_train.cli", "export", "--checkpoint", str(bad), "--output",
                           str(tmp_path / "x.pt")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


class _Touch:
    """Unpickling it would create a file: the code a crafted index could run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_at_another_world_size_reshards_weights_and_optimizer(runs: dict[str, Path], tmp_path: Path) -> None:
    """The 2-rank checkpoint loads into one rank (one shard of everything): the
    weights are the live end-of-training ones and the optimizer's momentum
    buffers are both ranks' shards, whole."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from dist_train.precision import Precision
    from dist_train.schedulers import build_scheduler
    from dist_train.stored_recipe import recipe_from_stored
    from dist_train.strategies.base import StrategyOptions
    from dist_train.strategies.dcp_files import full_tensors
    from dist_train.strategies.fsdp import FSDPStrategy
    from dist_train.trainer import build_optimizer
    from recipes.model_file import read_stored

    ckpt = runs["fsdp"] / "checkpoints" / "latest"
    stored = read_stored(safe_load(ckpt / "trainer.pt"))
    rebuilt = recipe_from_stored(stored.config, stored.data_info)
    torch.manual_seed(123)  # other initial weights than the run's: the load must replace them all
    model = rebuilt.recipe.build_model()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        strategy = FSDPStrategy(model, torch.device("cpu"), build_optimizer(rebuilt.cfg, rebuilt.recipe),
                                lambda opt: build_scheduler(rebuilt.cfg.train.scheduler, opt, 5),
                                StrategyOptions(Precision("fp32", "cpu")))
        client = strategy.load_checkpoint(ckpt)
        weights, optim = get_state_dict(strategy.module, strategy.optimizer,
                                        options=StateDictOptions(full_state_dict=True))
    finally:
        dist.destroy_process_group()
    assert client["loop"]["step"] == 5
    live = _model(runs["fsdp"] / "model.pt")
    for key in live:
        assert torch.equal(weights[key].float(), live[key]), key
    saved = full_tensors(ckpt, "optim.state.")
    assert optim["state"] and any(bool(s["momentum_buffer"].abs().sum()) for s in optim["state"].values())
    for fqn, state in optim["state"].items():
        assert torch.equal(state["momentum_buffer"], saved[f"optim.state.{fqn}.momentum_buffer"]), fqn


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 3))
        self.seen: list[torch.dtype] = []

    def forward(self, batch):
        self.seen.append(self.net[0].weight.dtype)  # the dtype the compute sees
        logits = self.net(batch["x"])
        return {"loss": torch.nn.functional.cross_entropy(logits.float(), batch["y"])}


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_policy_accumulation_clipping_and_compile_compose(tmp_path: Path, compile: bool) -> None:
    """One rank: the forward computes with bf16 weights while the sharded master
    weights and their gradients stay fp32; a window of two micro-batches with
    active clipping steps once, under torch.compile too; the gathered block gives
    whole parameters to direct calls and shards them again afterwards."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from dist_train.precision import Precision
    from dist_train.strategies.base import StrategyOptions
    from dist_train.strategies.fsdp import FSDPStrategy

    torch.manual_seed(0)
    model = _Tiny()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}  # (not the BatchNorm statistics)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        s = FSDPStrategy(model, torch.device("cpu"), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0),
                         StrategyOptions(Precision("bf16", "cpu"), grad_clip=1e-3, compile=compile))
        batch = {"x": torch.randn(6, 8), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
        s.train()
        s.micro_step(batch, 0.5, boundary=False)
        s.micro_step(batch, 0.5, boundary=True)
        params = list(s.module.parameters())
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        stats = s.optimizer_step()
        with s.gathered() as m:
            direct = m.net[0](batch["x"])  # a submodule called outside the model's forward
            assert not isinstance(m.net[0].weight, DTensor)
        assert isinstance(next(s.module.parameters()), DTensor)
        after = s.export_state_dict()
        with s.gathered() as m:  # an epoch hook re-initialising a layer: kept in the shards
            torch.nn.init.constant_(m.net[3].bias, 0.25)
            m.net[3].weight = torch.nn.Parameter(torch.full_like(m.net[3].weight, -0.5))
        edited = s.export_state_dict()
    finally:
        dist.destroy_process_group()
    assert model.seen and set(model.seen) == {torch.bfloat16}
    assert stats.grad_norm > 1e-3 and not stats.skipped  # clipping was active
    assert direct.shape == (6, 16)
    assert bool((edited["net.3.bias"] == 0.25).all()) and bool((edited["net.3.weight"] == -0.5).all())
    assert all(torch.equal(edited[k], after[k]) for k in after if not k.startswith("net.3."))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "net.0.weight" in moved and after["net.0.weight"].dtype == torch.float32
    # clipped to global norm 1e-3 with lr 0.1: all weights together moved by at most 1e-4 (2-norm),
    # up to fp32 rounding: of the scaled update (gamma(8) relative) and of each new weight
    # (u |w| per element, so u ||w|| in 2-norm; tests/tolerance.py). Unclipped it moves ~1e3 x more.
    step = math.sqrt(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in moved))
    size = math.sqrt(sum(float(after[k].double().pow(2).sum()) for k in moved))
    assert step <= 0.1 * 1e-3 * (1 + gamma(8)) + unit_roundoff(torch.float32) * size


def test_fsdp_resume_from_a_file_or_a_deepspeed_folder_and_channels_last_are_one_line(tmp_path: Path) -> None:
    from dist_train.config import ConfigError
    from dist_train.preflight import check_resume, load_checked_config

    cfg = load_checked_config(CONFIG, tiny_overrides(tmp_path, **FSDP))
    file = tmp_path / "latest.pt"
    file.write_bytes(b"not read")
    ds = tmp_path / "latest"
    (ds / "state").mkdir(parents=True)
    (ds / "latest").write_text("state")
    for path in (file, ds):
        with pytest.raises(ConfigError, match="an FSDP checkpoint is a folder with a DCP index"):
            check_resume(cfg, path)
    with pytest.raises(ConfigError, match="train.channels_last: supported with train.strategy=ddp"):
        load_checked_config(CONFIG, tiny_overrides(tmp_path, train__channels_last="true", **FSDP))
