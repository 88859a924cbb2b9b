"""Projectors (NdLinear parity with the published package, parameter counts) and losses by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmcache.align.losses import InfoNCELoss, SigmoidLoss
from vlmcache.align.projectors import MLPProjector, NdLinear, NdLinearProjector, build_projector, count_parameters, grid_shape


def test_ndlinear_matches_the_published_package_for_the_same_weights():
    ndlinear = pytest.importorskip("ndlinear")
    torch.manual_seed(0)
    reference = ndlinear.NdLinear((24, 32), (16, 12))
    ours = NdLinear((24, 32), (16, 12))
    ours.load_state_dict(reference.state_dict())
    inputs = torch.randn(5, 24, 32)
    assert torch.allclose(ours(inputs), reference(inputs), atol=1e-6)


def test_ndlinear_parameter_count_768_to_768_as_24x32():
    projector = NdLinearProjector(768, 768, in_grid=(24, 32), out_grid=(24, 32))
    assert count_parameters(projector) == 1656  # 24*24+24 + 32*32+32


def test_ndlinear_projector_default_grids_and_shapes():
    assert grid_shape(1280) == (32, 40) and grid_shape(384) == (16, 24) and grid_shape(256) == (16, 16)
    projector = build_projector("ndlinear", 1280, 256)
    assert projector(torch.randn(3, 1280)).shape == (3, 256)
    with pytest.raises(ValueError, match="do not multiply"):
        NdLinearProjector(1280, 256, in_grid=(30, 40))


def test_linear_and_mlp_shapes_and_residual_head():
    assert build_projector("linear", 10, 4)(torch.randn(2, 10)).shape == (2, 4)
    mlp = MLPProjector(10, 4, hidden=32, layers=3)
    assert mlp(torch.randn(2, 10)).shape == (2, 4)
    head = MLPProjector(10, 4, residual=True).eval()
    out = head(torch.randn(6, 10))
    assert torch.allclose(out.mean(-1), torch.zeros(6), atol=1e-5)  # ends in LayerNorm
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("conv", 10, 4)


def test_infonce_by_hand():
    loss = InfoNCELoss(init_scale=1.0)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cosines: [[1, .7071], [0, .7071]]
    c = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(c)))
    row1 = -math.log(math.exp(c) / (math.exp(0) + math.exp(c)))
    col0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    col1 = -math.log(math.exp(c) / (math.exp(c) + math.exp(c)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert loss(image, text).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_scale_starts_at_1_over_0_07_and_clamps_at_100():
    loss = InfoNCELoss()
    assert loss.scale() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    loss.clamp_()
    assert loss.scale() == pytest.approx(100.0)


def test_sigmoid_loss_by_hand():
    loss = SigmoidLoss(init_scale=2.0, init_bias=-1.0)
    assert loss.scale() == pytest.approx(2.0) and loss.logit_bias.item() == -1.0
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosines = identity
    def minus_log_sigmoid(value: float) -> float:
        return -math.log(1 / (1 + math.exp(-value)))

    positive = minus_log_sigmoid(+1 * (2 * 1 - 1))  # diagonal: z = +1, logit = t·cos + b = 1
    negative = minus_log_sigmoid(-1 * (2 * 0 - 1))  # off-diagonal: z = -1, logit = -1
    assert loss(image, text).item() == pytest.approx((2 * positive + 2 * negative) / 4, rel=1e-6)
    assert SigmoidLoss().scale() == pytest.approx(10.0) and SigmoidLoss().logit_bias.item() == -10.0


def test_same_image_pairs_are_masked_out():
    torch.manual_seed(0)
    image, text = torch.randn(3, 4), torch.randn(3, 4)
    ids = torch.tensor([7, 7, 8])  # rows 0 and 1 are two captions of one image
    loss = InfoNCELoss(init_scale=1.0)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    logits[0, 1] = logits[1, 0] = -math.inf
    labels = torch.arange(3)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss(image, text, ids).item() == pytest.approx(float(expected), rel=1e-6)
    sigmoid = SigmoidLoss(init_scale=1.0, init_bias=0.0)
    pair = -F.logsigmoid((2 * torch.eye(3) - 1) * (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T))
    keep = torch.ones(3, 3)
    keep[0, 1] = keep[1, 0] = 0
    assert sigmoid(image, text, ids).item() == pytest.approx(float((pair * keep).sum() / 7), rel=1e-6)
