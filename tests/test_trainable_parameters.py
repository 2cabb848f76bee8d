"""Only the right parameters train: SAM2 stays bit-identical, every trainable tensor moves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import biosam2


def train_steps(model, steps: int):
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    images = torch.rand(2, 3, 64, 96)
    labels = torch.randint(0, model.num_classes, (2, 64, 96))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                assert parameter.grad is None, f"gradient reached frozen {name}"
        optimizer.step()


# LoRA's B matrices start at zero (peft's standard init), so its A matrices only receive a gradient
# from the second step on; every other variant moves every trainable tensor in the first step.
@pytest.mark.parametrize(
    "adapter,pos_encoding,steps",
    [("hp", "peg", 1), ("lw", "peg", 1), ("none", "sam2", 1), ("adaptformer", "peg", 1), ("lora", "peg", 2), ("full", "peg", 1)],
)
def test_frozen_sam2_is_bit_identical_and_every_trainable_tensor_changes(adapter, pos_encoding, steps):
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=adapter, pos_encoding=pos_encoding)
    before = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}
    frozen = set(model.frozen_base_state_dict())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable

    train_steps(model, steps)

    after = model.state_dict()
    changed_frozen = [n for n in frozen if not torch.equal(before[n], after[n])]
    unchanged_trainable = [n for n in trainable if torch.equal(before[n], after[n])]
    assert not changed_frozen, f"frozen SAM2 tensors changed: {changed_frozen[:5]}"
    assert not unchanged_trainable, f"trainable tensors did not change: {unchanged_trainable[:5]}"


def test_vanilla_sam2_trains_only_the_class_tokens_and_mlps():
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="none", pos_encoding="sam2")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("decoder.class_tokens", "decoder.class_mlps.")) for n in names)


def test_every_hiera_block_gets_an_adapter_unless_told_otherwise():
    everywhere = biosam2.build_model("tiny", weights="random", adapter="hp")
    some = biosam2.build_model("tiny", weights="random", adapter="hp", adapter_blocks=[0, 5, 11])
    def adapted(model):
        return sorted({int(n.split(".")[4]) for n, _ in model.named_parameters() if ".mlp.adapter." in n})
    assert adapted(everywhere) == list(range(12))
    assert adapted(some) == [0, 5, 11]


def test_adapter_ratio_sets_the_bottleneck_width():
    model = biosam2.build_model("tiny", weights="random", adapter="adaptformer", adapter_ratio=0.5)
    first = model.encoder.blocks[0].mlp.adapter
    assert first.down.out_features == 48  # block 0 has width 96


def test_count_parameters_reports_total_and_trainable():
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="none", pos_encoding="sam2")
    counts = biosam2.count_parameters(model)
    by_hand = sum(p.numel() for p in model.decoder.class_mlps.parameters()) + model.decoder.class_tokens.numel()
    assert counts.trainable == by_hand
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert 0 < counts.trainable_fraction < 0.05
