"""train.low_memory_build: a model built with its parameters sliced over the ranks
(dist_train/low_memory_build.py) has the ordinary build's initial weights bit for bit,
and each rank holds about 1/world of them; FSDP2 and ZeRO-3 take it over. Two gloo
ranks on the CPU (torch.multiprocessing), compared with a whole build in the same process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import REPO

WORLD = 2


def _timm(name: str, **kw) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kw)


class AliasInit(nn.Module):
    """Initialisers the way hand-written models run them after their children are
    built: through a ``.data`` alias held across the build of another child, a loop
    over ``self.modules()``, ``copy_`` between parameters, and a tied weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        alias = self.embed.weight.data  # held while the next child is built
        self.body = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24))
        alias.normal_(0, 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.uniform_(m.bias, -0.1, 0.1)
        self.out = nn.Linear(24, 50, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.extra = nn.Parameter(torch.empty(24, 24))
        with torch.no_grad():
            self.extra.copy_(self.body[2].weight[:, :24] * 2)


MODELS = {
    # timm's init_weights through named_apply over built blocks; trunc_normal_ of pos_embed / cls_token
    "vit": lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7),
    # named_apply with the head's weights scaled afterwards
    "convnext": lambda: _timm("convnext_atto", num_classes=7),
    # a loop over every module after the whole network is built (timm's efficientnet_init_weights)
    "mobilenetv3": lambda: _timm("mobilenetv3_small_050", num_classes=7),
    "alias": AliasInit,
}


def _init(rank: int, store: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)


def _build_worker(rank: int, store: str, out: str) -> None:
    from dist_train.low_memory_build import build_partitioned

    _init(rank, store)
    report = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        whole = make()
        expected = {k: v.clone() for k, v in whole.state_dict().items()}
        rng_after = torch.get_rng_state()
        total = sum(p.numel() * p.element_size() for p in whole.parameters())
        del whole
        torch.manual_seed(0)
        model, parts = build_partitioned(make, rank, WORLD, torch.device("cpu"))
        same_rng = torch.equal(rng_after, torch.get_rng_state())
        # what the model's parameters still hold after the build (placeholders: one element each)
        held = sum(p.untyped_storage().nbytes() for p in model.parameters())
        diff = [k for k, p in model.named_parameters() if not torch.equal(parts.full(p), expected[k])]
        diff += [k for k, b in model.named_buffers() if not torch.equal(b, expected[k])]
        report[name] = {"diff": diff, "same_rng": same_rng, "sliced": parts.sliced_bytes(), "held": held,
                        "total": total, "n": len(list(model.parameters())), "gathers": parts.gathers}
    torch.save(report, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("lowmem")
    mp.spawn(_build_worker, args=(f"file://{tmp}/store", str(tmp / "report")), nprocs=WORLD, join=True)
    return [torch.load(f"{tmp / 'report'}.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(MODELS))
def test_sliced_build_has_the_whole_builds_weights_bit_for_bit(built: list[dict], name: str) -> None:
    for rank, report in enumerate(built):
        r = report[name]
        assert r["diff"] == [], f"rank {rank}: {r['diff']}"
        assert r["same_rng"], "the build drew another number of random values"
    if name != "alias":  # these re-initialise built children: the values come back through gathers
        assert built[0][name]["gathers"] > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_each_rank_holds_its_slice_of_the_parameters(built: list[dict], name: str) -> None:
    for report in built:
        r = report[name]
        # ceil(numel / world) elements per parameter: at most one padding element each
        assert r["sliced"] <= r["total"] / WORLD + 4 * r["n"]
        assert r["sliced"] >= r["total"] / WORLD - 4 * r["n"]
        assert r["held"] <= 8 * r["n"]  # the placeholders


def _strategy(name: str, model: nn.Module, precision: str, parts=None):
    from dist_train.config import load_config
    from dist_train.precision import Precision
    from dist_train.strategies import build_strategy
    from dist_train.trainer import strategy_options

    overrides = [f"train.precision={precision}", "data.batch_size=2"]
    overrides += (["train.strategy=deepspeed", f"deepspeed.config={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"]
                  if name == "zero3" else ["train.strategy=fsdp"])
    cfg = load_config(REPO / "configs" / "facecom.yaml", overrides)
    options = strategy_options(cfg, Precision(precision, "cpu"), WORLD)
    return build_strategy(cfg.train.strategy, model=model, device=torch.device("cpu"),
                          make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                          make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          options=options, **({"partitions": parts} if parts is not None else {}))


def _strategy_worker(rank: int, store: str, out: str) -> None:
    from dist_train.low_memory_build import build_model

    _init(rank, store)
    make = MODELS["vit"]
    report = {}
    # (FSDP2 keeps fp32 shards whatever the precision: its bf16 build is its fp32 one)
    for name, precision in (("fsdp", "fp32"), ("zero3", "fp32"), ("zero3", "bf16")):
        torch.manual_seed(0)
        expected = _strategy(name, make(), precision).export_state_dict()
        torch.manual_seed(0)
        ds_json = {"zero_optimization": {"stage": 3}} if name == "zero3" else None
        strategy = "deepspeed" if name == "zero3" else name
        model, parts = build_model(make, "auto", strategy, ds_json, rank, WORLD, torch.device("cpu"))
        sliced = parts is not None and parts.sliced_bytes() > 0
        got = _strategy(name, model, precision, parts).export_state_dict()
        report[f"{name}/{precision}"] = {
            "sliced": sliced, "released": parts is not None and parts.sliced_bytes() == 0,
            "keys": sorted(got) == sorted(expected),
            "diff": [k for k in expected if k in got and not torch.equal(got[k], expected[k])]}
    torch.save(report, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.integration  # DeepSpeed's ZeRO-3 engine in two processes
def test_fsdp2_and_zero3_take_a_sliced_build_over_with_the_whole_builds_weights(tmp_path: Path) -> None:
    """The exported (gathered, fp32) weights right after the strategy is built: from a
    sliced build and from a whole one, bit for bit (bf16: ZeRO-3's fp32 master is the
    16-bit weight widened in both; FSDP2 keeps fp32 shards)."""
    mp.spawn(_strategy_worker, args=(f"file://{tmp_path}/store", str(tmp_path / "report")), nprocs=WORLD,
             join=True)
    report = torch.load(f"{tmp_path / 'report'}.0", weights_only=True)  # (FSDP2 exports on rank 0)
    assert set(report) == {"fsdp/fp32", "zero3/fp32", "zero3/bf16"}
    for key, r in report.items():
        assert r["sliced"], f"{key}: the build was not sliced"
        assert r["released"], f"{key}: slices left after the strategy took the parameters"
        assert r["keys"], key
        assert r["diff"] == [], f"{key}: {r['diff']}"


@pytest.mark.parametrize("overrides, fragment", [
    (["train.low_memory_build=always"], "train.low_memory_build: 'always' needs train.strategy=fsdp or deepspeed"),
    (["train.low_memory_build=always", "train.strategy=deepspeed",
      f"deepspeed.config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}"],
     "train.low_memory_build: 'always' needs ZeRO stage 3"),
    (["train.low_memory_build=yes"], "train.low_memory_build"),
])
def test_on_where_nothing_is_sliced_is_one_line(overrides: list[str], fragment: str) -> None:
    from dist_train.config import ConfigError
    from dist_train.preflight import load_checked_config

    with pytest.raises(ConfigError) as info:
        load_checked_config(REPO / "configs" / "facecom.yaml", overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_auto_slices_under_fsdp_and_zero3_only_with_several_ranks() -> None:
    from dist_train.low_memory_build import wanted

    zero3, zero2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}
    assert wanted("auto", "fsdp", None, 2) and wanted("auto", "deepspeed", zero3, 4) and wanted("always", "fsdp", None, 2)
    assert not wanted("auto", "deepspeed", zero2, 2) and not wanted("auto", "ddp", None, 2)
    assert not wanted("never", "fsdp", None, 2) and not wanted("auto", "fsdp", None, 1)


def _recipe(name: str, cache: Path):
    """The recipe of ``tests/recipes/test_compile_steps.py``'s tiny config ``name`` (its synthetic data cached)."""
    from dist_train.config import load_config, recipe_params, synthetic_spec
    from recipes.base import get_recipe
    from shards.manifest import Manifest
    from shards.synthetic import ensure_synthetic
    from tests.recipes.test_compile_steps import COMMON, RECIPES

    config, extra = RECIPES[name]
    values = {**COMMON, "experiment.output_dir": str(cache / "runs"), "data.synthetic.cache_dir": str(cache), **extra}
    cfg = load_config(REPO / "configs" / config, [f"{k}={v}" for k, v in values.items()])
    data = ensure_synthetic(Path(cfg.data.synthetic.cache_dir), synthetic_spec(cfg))
    return get_recipe(cfg.recipe.name)(recipe_params(cfg), Manifest.load(data).data_info())


def _recipes_worker(rank: int, store: str, cache: str, out: str) -> None:
    from dist_train.low_memory_build import build_partitioned
    from tests.recipes.test_compile_steps import RECIPES

    _init(rank, store)
    report = {}
    for name in RECIPES:
        recipe = _recipe(name, Path(cache))
        torch.manual_seed(0)
        whole = recipe.build_model()
        expected = {k: v.clone() for k, v in whole.state_dict(keep_vars=False).items()}
        del whole
        torch.manual_seed(0)
        model, parts = build_partitioned(recipe.build_model, rank, WORLD, torch.device("cpu"))
        report[name] = [k for k, p in model.named_parameters() if not torch.equal(parts.full(p), expected[k])]
    torch.save(report, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.integration  # every recipe's model, two processes
def test_every_recipe_builds_sliced_with_its_whole_weights(tmp_path: Path) -> None:
    from tests.recipes.test_compile_steps import RECIPES

    cache = tmp_path / "data"
    for name in RECIPES:  # the synthetic data once, before the ranks start
        _recipe(name, cache)
    mp.spawn(_recipes_worker, args=(f"file://{tmp_path}/store", str(cache), str(tmp_path / "report")),
             nprocs=WORLD, join=True)
    for rank in range(WORLD):
        report = torch.load(f"{tmp_path / 'report'}.{rank}", weights_only=True)
        assert set(report) == set(RECIPES)
        assert {k: v for k, v in report.items() if v} == {}, f"rank {rank}"
