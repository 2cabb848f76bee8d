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
    fused = block.fuse()
    assert type(fused) is nn.Conv2d and fused.kernel_size == (3, 3)
    torch.testing.assert_close(fused(x), unfused, atol=1e-5, rtol=1e-5)


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
    assert len(spatial) == 12 and all(type(s) is nn.Conv2d for s in spatial)  # the module itself, as timm's
    assert not any(isinstance(m, RepConv3x3) for m in fused.modules())
    assert fused.config.reparameterized
    assert biosam2.count_parameters(fused).trainable < biosam2.count_parameters(lw_pair[0]).trainable


def test_reparameterize_refuses_models_without_lw_adapters():
    with pytest.raises(biosam2.ConfigError, match="LW"):
        biosam2.build_model("tiny", weights="random", adapter="hp").reparameterize()


def test_reparameterize_refuses_a_model_in_training_mode_and_leaves_it_unchanged():
    """BatchNorm in training mode uses batch statistics; the fused conv holds the running ones."""
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw")  # nn.Module: training mode
    randomise_batch_norms(model, torch.Generator().manual_seed(6))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        batch_statistics = model(images)
        with pytest.raises(biosam2.ConfigError, match=r"training mode.*model\.eval\(\)"):
            model.reparameterize()
        assert not model.config.reparameterized and any(isinstance(m, RepConv3x3) for m in model.modules())
        # what fusing would have done: the same model, other numbers
        assert (model.eval().reparameterize()(images) - batch_statistics).abs().max() > 1e-3


def test_reparameterize_not_in_place_returns_a_fused_copy_and_keeps_the_original(lw_pair):
    model, _ = lw_pair
    trained_before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(images)
        copy_ = model.reparameterize(inplace=False)
        got = copy_(images)
    assert copy_ is not model and copy_.config.reparameterized and not model.config.reparameterized
    assert any(isinstance(m, RepConv3x3) for m in model.modules())
    assert not any(isinstance(m, RepConv3x3) for m in copy_.modules())
    assert trained_before.keys() == model.trained_state_dict().keys()
    assert all(torch.equal(v, model.trained_state_dict()[k]) for k, v in trained_before.items())
    assert (got - expected).abs().max().item() <= 1e-4
    # the trained/frozen bookkeeping is by name: it survives the copy, and the new convs count as trained
    assert copy_.frozen_base_names == model.frozen_base_names
    assert copy_.base_fingerprint() == model.base_fingerprint()
    fused_names = set(copy_.trained_state_dict()) - set(model.trained_state_dict())
    assert fused_names and all(name.endswith((".spatial.weight", ".spatial.bias")) for name in fused_names)


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
