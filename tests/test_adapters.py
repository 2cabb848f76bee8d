"""HP (deformable) and LW (re-parameterisable) adapters do what the paper says they do."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import biosam2
from biosam2.model.adapters import ModulatedDeformableConv, RepConv3x3


def randomise_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, as after real training."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.1)
            bn.weight.data.copy_(torch.randn(c, generator=generator))
            bn.bias.data.copy_(torch.randn(c, generator=generator) * 0.5)


def make_adapters_matter(model: nn.Module, generator: torch.Generator) -> None:
    """Adapters start near zero; give their up-projections real weight so the test can fail."""
    for name, parameter in model.named_parameters():
        if ".adapter.up." in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


# ---- LW ---------------------------------------------------------------------------------------
def test_rep_block_fuses_to_one_conv_with_the_same_output():
    generator = torch.Generator().manual_seed(1)
    block = RepConv3x3(16)
    randomise_batch_norms(block, generator)
    block.eval()
    x = torch.randn(2, 16, 9, 13, generator=generator)
    unfused = block(x)
    block.reparameterize()
    assert isinstance(block.fused, nn.Conv2d) and block.fused.kernel_size == (3, 3)
    torch.testing.assert_close(block(x), unfused, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lw_pair():
    """A trained-looking LW model (eval) and its fused copy."""
    generator = torch.Generator().manual_seed(2)
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="lw")
    randomise_batch_norms(model, generator)
    make_adapters_matter(model, generator)
    model.eval()
    fused = copy.deepcopy(model).reparameterize()
    return model, fused


@pytest.mark.parametrize("height,width", [(64, 64), (97, 211), (256, 192), (33, 47)])
def test_lw_fused_model_equals_unfused_within_1e_4(lw_pair, height, width):
    model, fused = lw_pair
    images = torch.rand(2, 3, height, width)
    with torch.no_grad():
        expected = model(images)
        got = fused(images)
        # Control: without one branch of the LW blocks the logits differ far more than 1e-4,
        # so agreement below really means the fusion is exact.
        without = copy.deepcopy(model)
        for block in without.modules():
            if isinstance(block, RepConv3x3):
                block.branch_1x1[1].weight.data.zero_()
                block.branch_1x1[1].bias.data.zero_()
        control = without(images)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (control - expected).abs().max().item() > 1e-3


def test_fused_model_has_no_batch_norm_or_1x1_branch_left_in_adapters(lw_pair):
    _, fused = lw_pair
    adapter_modules = [m for n, m in fused.named_modules() if ".mlp.adapter" in n]
    assert adapter_modules
    assert not any(isinstance(m, nn.BatchNorm2d) for m in adapter_modules)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in adapter_modules)
    spatial = [m.spatial for m in adapter_modules if hasattr(m, "spatial")]
    assert len(spatial) == 12 and all(isinstance(s.fused, nn.Conv2d) and len(list(s.children())) == 1 for s in spatial)
    assert fused.config.reparameterized
    assert biosam2.count_parameters(fused).trainable < biosam2.count_parameters(lw_pair[0]).trainable


def test_reparameterize_refuses_models_without_lw_adapters():
    with pytest.raises(biosam2.ConfigError, match="LW"):
        biosam2.build_model("tiny", weights="random", adapter="hp").reparameterize()


# ---- HP ---------------------------------------------------------------------------------------
def test_deformable_conv_with_zero_offsets_and_unit_modulation_is_a_plain_conv():
    generator = torch.Generator().manual_seed(3)
    module = ModulatedDeformableConv(8)
    x = torch.randn(2, 8, 11, 7, generator=generator)
    zero_offsets = torch.zeros(2, 18, 11, 7)
    unit_mask = torch.ones(2, 9, 11, 7)
    plain = F.conv2d(x, module.conv.weight, module.conv.bias, padding=1)
    torch.testing.assert_close(module.conv(x, zero_offsets, unit_mask), plain, atol=1e-5, rtol=1e-5)


def test_deformable_conv_starts_as_a_plain_conv_and_its_offsets_matter():
    generator = torch.Generator().manual_seed(4)
    module = ModulatedDeformableConv(8)
    x = torch.randn(1, 8, 10, 10, generator=generator)
    bias = module.conv.bias.reshape(1, -1, 1, 1)
    # Initialisation: zero offsets, modulation sigmoid(0) = 0.5 (DCNv2's own initialisation).
    at_init = 0.5 * F.conv2d(x, module.conv.weight, None, padding=1) + bias
    torch.testing.assert_close(module(x), at_init, atol=1e-5, rtol=1e-5)
    # Once the offset predictor has weights, sampling moves and the output changes.
    nn.init.normal_(module.offset_and_mask.weight, std=0.5)
    assert (module(x) - at_init).abs().max() > 1e-2
