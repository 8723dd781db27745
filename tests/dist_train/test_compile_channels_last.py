"""GPU-path switches that also run on CPU (issue 16): ``train.compile`` and
``train.channels_last`` change how the step runs, not what it computes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_train.config import ConfigError, load_config
from dist_train.precision import Precision
from dist_train.strategies.ddp import DDPStrategy
from dist_train.trainer import build_optimizer, strategy_options
from tests.conftest import REPO


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.seen_layouts: list[bool] = []

    def forward(self, batch):
        x = batch["image"]
        self.seen_layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        y = self.head(self.conv(x).mean((2, 3)))
        return {"loss": nn.functional.cross_entropy(y, batch["label"])}


class Recipe:
    def param_groups(self, model, lr):
        return None


def strategy(**train) -> DDPStrategy:
    cfg = load_config(REPO / "configs" / "facecom.yaml", [f"train.{k}={v}" for k, v in train.items()])
    torch.manual_seed(0)
    return DDPStrategy(Net(), torch.device("cpu"), build_optimizer(cfg, Recipe()),
                       lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                       strategy_options(cfg, Precision("fp32", "cpu"), world_size=1))


def losses(s: DDPStrategy, steps: int = 3) -> list[float]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        batch = {"image": torch.randn(4, 3, 8, 8, generator=g), "label": torch.randint(0, 2, (4,), generator=g)}
        out.append(float(s.micro_step(batch, 1.0, True)["loss"].detach()))
        s.optimizer_step()
    return out


def test_channels_last_puts_weights_and_images_in_nhwc_and_computes_the_same():
    plain, nhwc = strategy(), strategy(channels_last="true")
    assert nhwc.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert losses(nhwc) == pytest.approx(losses(plain), rel=1e-5)
    assert all(nhwc.module.seen_layouts) and not any(plain.module.seen_layouts)


@pytest.mark.integration  # compiling takes a while on CPU (inductor + a C++ compiler)
def test_compiled_step_computes_what_the_eager_step_does():
    eager, compiled = strategy(), strategy(compile="true")
    assert compiled.model is not compiled.module  # the step runs the compiled module
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    # the checkpoint holds the plain module's names (no _orig_mod. prefix)
    assert set(compiled.module.state_dict()) == set(eager.module.state_dict())


def test_adamw_is_fused_only_on_gpu_parameters():
    opt = strategy().optimizer
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")


def test_deepspeed_refuses_the_ddp_only_switches():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(REPO / "configs" / "facecom.yaml", ["train.strategy=deepspeed", "train.compile=true",
                                                        f"deepspeed.config={REPO / 'configs/deepspeed/zero0.json'}"])
