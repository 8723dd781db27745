"""models/photometric.py: the CBAM block (Woo et al. 2018) written out: channel attention
``x * sigmoid(MLP(avgpool x) + MLP(maxpool x))`` then spatial attention
``x * sigmoid(conv7x7([mean_c x; max_c x]))`` at the end of each residual branch."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from models.photometric import CbamBlock, CbamResNet, ChannelAttention, SpatialAttention
from tests.tolerance import network_atol


def _randomise(module: torch.nn.Module) -> None:
    """Weights and BatchNorm statistics far from their init (identity-like BN, small convs), so
    every factor of the formula moves the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _hand_block(blk: CbamBlock, x: torch.Tensor) -> torch.Tensor:
    """Conv-BN-ReLU-Conv-BN, channel attention, spatial attention, + shortcut, ReLU (eval mode)."""
    conv1, bn1, _, conv2, bn2 = list(blk.body)[:5]
    ca = next(m for m in blk.modules() if isinstance(m, ChannelAttention))
    sa = next(m for m in blk.modules() if isinstance(m, SpatialAttention))
    y = F.relu(bn1(conv1(x)))
    y = bn2(conv2(y))
    fc1, fc2 = ca.mlp[0], ca.mlp[2]
    mlp = lambda v: F.conv2d(F.relu(F.conv2d(v, fc1.weight)), fc2.weight)  # noqa: E731
    y = y * torch.sigmoid(mlp(y.mean((2, 3), keepdim=True)) + mlp(y.amax((2, 3), keepdim=True)))
    pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
    y = y * torch.sigmoid(F.conv2d(pooled, sa.conv.weight, padding=3))
    return F.relu(y + blk.shortcut(x))


def test_cbam_block_is_channel_then_spatial_attention_on_the_residual_branch():
    torch.manual_seed(0)
    blk = CbamBlock(8, 16, stride=2)
    _randomise(blk)
    blk.eval()
    x = torch.randn(2, 8, 12, 12)
    blk64 = copy.deepcopy(blk).double()
    with torch.no_grad():
        ref = _hand_block(blk64, x.double())
        got = blk(x).double()
        plain = F.relu(blk64.body[:5](x.double()) + blk64.shortcut(x.double()))   # the block without CBAM
    # two 3x3 convolutions, the 1x1 MLP (fan-in 16 and 1), the 7x7 conv over 2 maps, the shortcut
    tol = 2 * network_atol([8 * 9, 16 * 9, 16, 1, 2 * 49, 8], float(ref.abs().amax()))
    assert torch.allclose(got, ref, rtol=0, atol=tol)
    assert (plain - ref).abs().amax() > 1e3 * tol                # the attention re-weights the branch


def test_every_cbam_resnet_block_carries_both_attentions():
    net = CbamResNet(3, 16, width=4, blocks=(1, 2))
    blocks = [m for m in net.modules() if isinstance(m, CbamBlock)]
    assert len(blocks) == 3
    for blk in blocks:
        kinds = [type(m) for m in blk.body]
        assert kinds[-2:] == [ChannelAttention, SpatialAttention]
