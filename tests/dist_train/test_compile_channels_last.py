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
from tests.tolerance import logsumexp_atol, module_atol, sum_atol


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


def _batches(steps: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(4, 3, 8, 8, generator=g), "label": torch.randint(0, 2, (4,), generator=g)}
            for _ in range(steps)]


def _step_loss_atol(s: DDPStrategy, batch: dict[str, torch.Tensor]) -> float:
    """Bound of one step's loss against the exact one (tests/tolerance.py): the logits within
    module_atol of the net (conv fan-in 27, the 8x8 mean pool, the 4-wide head), the
    cross-entropy moving by at most twice the logits' error (|p - onehot| sums to <= 2) plus its
    own log-sum-exp rounding, the batch mean of 4 its own."""
    delta = module_atol(s.module, batch, extra_reductions=(8 * 8,))
    with torch.no_grad():
        z = s.module.head(s.module.conv(batch["image"]).mean((2, 3))).double()
        per_sample = nn.functional.cross_entropy(z, batch["label"], reduction="none")
    row = 2 * delta + logsumexp_atol(2, float(z.abs().amax()) + delta)
    return row + sum_atol(4, float(per_sample.sum()) + 4 * row) / 4


def same_steps(reference: DDPStrategy, other: DDPStrategy, steps: int = 3) -> None:
    """``other`` computes what ``reference`` does, step by step: each step starts both from the
    reference's weights and optimizer state (so the check is of one step's computation, and
    rounding differences cannot compound over steps), and the two losses agree within twice the
    step's bound (each is within it of the exact loss)."""
    for batch in _batches(steps):
        other.module.load_state_dict(reference.module.state_dict())   # copy_: keeps other's layout
        other.optimizer.load_state_dict(reference.optimizer.state_dict())
        tol = 2 * _step_loss_atol(reference, batch)
        ours = float(other.micro_step(dict(batch), 1.0, True)["loss"].detach())
        theirs = float(reference.micro_step(dict(batch), 1.0, True)["loss"].detach())
        assert ours == pytest.approx(theirs, rel=0, abs=tol)
        other.optimizer_step()
        reference.optimizer_step()


def test_channels_last_puts_weights_and_images_in_nhwc_and_computes_the_same():
    plain, nhwc = strategy(), strategy(channels_last="true")
    assert nhwc.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    same_steps(plain, nhwc)
    assert nhwc.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(nhwc.module.seen_layouts) and not any(plain.module.seen_layouts)


@pytest.mark.integration  # compiling takes a while on CPU (inductor + a C++ compiler)
def test_compiled_step_computes_what_the_eager_step_does():
    eager, compiled = strategy(), strategy(compile="true")
    assert compiled.model is not compiled.module  # the step runs the compiled module
    same_steps(eager, compiled)
    # the checkpoint holds the plain module's names (no _orig_mod. prefix)
    assert set(compiled.module.state_dict()) == set(eager.module.state_dict())


def test_adamw_is_fused_only_on_gpu_parameters():
    opt = strategy().optimizer
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")


def test_deepspeed_refuses_the_ddp_only_switches():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(REPO / "configs" / "facecom.yaml", ["train.strategy=deepspeed", "train.compile=true",
                                                        f"deepspeed.config={REPO / 'configs/deepspeed/zero0.json'}"])
