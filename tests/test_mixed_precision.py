"""Mixed precision on the CPU: real CPU autocast (Lightning's bf16-mixed plugin, Predictor's precision).

Training with ``bf16-mixed`` runs for every adapter with finite losses; a trained model predicts the
same labels in bf16 as in fp32 on >= 99% of pixels; the deformable convolution (no bf16 kernel in
torchvision) runs inside autocast and on a ``.bfloat16()`` model.
"""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

import biosam2
from biosam2.cli import main
from biosam2.data.synthetic import write_synthetic_dataset
from biosam2.errors import ConfigError
from biosam2.inference.predictor import Predictor, _autocast_works
from biosam2.model.adapters import ModulatedDeformableConv
from biosam2.training import TrainConfig, train

QUICK_BF16 = dict(
    weights="random", epochs=1, limit_train_batches=2, batch_size=2, patch_size=64, lr=1e-3, loss="dice_ce",
    num_workers=0, overlays=0, evaluate_test=False, precision="bf16-mixed", accelerator="cpu",
)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=4, val=1, test=1, max_side=96)


class DecoderDtypes(Callback):
    """Records the dtype of the decoder's output in every training step: bf16 proves autocast was on."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer, module):
        def record(_module, _inputs, out):
            if module.training:
                self.dtypes.add(out.dtype)

        module.model.decoder.register_forward_hook(record)


def _train_losses(run: Path) -> list[float]:
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        return [float(row["train/loss_step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]


@pytest.mark.parametrize("adapter", ["hp", "lw", "lora", "full"])
def test_bf16_mixed_training_on_the_cpu(adapter, tiny_dataset, tmp_path):
    run = tmp_path / adapter
    seen = DecoderDtypes()
    summary = train(tiny_dataset, run, TrainConfig(adapter=adapter, **QUICK_BF16), progress_bar=False, callbacks=[seen])
    assert seen.dtypes == {torch.bfloat16}  # the training steps really ran under CPU bf16 autocast
    losses = _train_losses(run)
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses), losses
    assert summary["best_val_mIoU"] is not None and 0 <= summary["best_val_mIoU"] <= 1
    model = biosam2.load_model(run / "model")
    assert model.config.adapter == adapter
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(1, 1, 50, 70))).all()


@pytest.fixture(scope="module")
def trained_demo_run(tmp_path_factory):
    """The demo's data and recipe (LW, Adam 3e-3, Dice+CE, 128-px crops), smaller and shorter, in fp32:
    enough training that predictions are confident (random-weight logits are near ties)."""
    root = tmp_path_factory.mktemp("demo")
    data = write_synthetic_dataset(root / "data", train=8, val=2, test=4)
    config = TrainConfig(
        size="tiny", weights="random", adapter="lw", epochs=6, batch_size=4, lr=3e-3, loss="dice_ce", patch_size=128,
        num_workers=0, overlays=0, evaluate_test=False, precision="32",
    )
    train(data, root / "run", config, progress_bar=False)
    return data, root / "run"


def test_bf16_predictions_agree_with_fp32(trained_demo_run, tmp_path):
    data, run = trained_demo_run
    for precision in ("32", "bf16-mixed"):
        assert main(["predict", str(run), str(data / "imagesTs"), str(tmp_path / precision), "--precision", precision,
                     "--device", "cpu", "--probabilities"]) == 0
    agree = total = 0
    largest_difference = 0.0
    for fp32_file in sorted((tmp_path / "32").glob("*.png")):
        fp32 = np.asarray(Image.open(fp32_file))
        bf16 = np.asarray(Image.open(tmp_path / "bf16-mixed" / fp32_file.name))
        agree, total = agree + int((fp32 == bf16).sum()), total + fp32.size
        probabilities = [np.load(tmp_path / p / f"{fp32_file.stem}_probabilities.npy") for p in ("32", "bf16-mixed")]
        assert probabilities[1].dtype == np.float32
        largest_difference = max(largest_difference, float(np.abs(probabilities[0] - probabilities[1]).max()))
    assert total > 0 and largest_difference > 0  # bf16 really ran: the probabilities are not fp32's
    print(f"\nbf16-mixed vs fp32 predictions: {agree / total:.4%} of {total} test pixels agree")
    assert agree / total >= 0.99


def test_hp_logits_under_cpu_bf16_autocast_are_close_to_fp32():
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="hp").eval()
    dcns = [m for m in model.modules() if isinstance(m, ModulatedDeformableConv)]
    with torch.no_grad():  # non-zero offsets and a larger adapter output, so the DCN really shapes the logits
        for dcn in dcns:
            torch.nn.init.normal_(dcn.offset_and_mask.weight, std=0.05)
        for name, p in model.named_parameters():
            if name.endswith("adapter.up.weight"):
                torch.nn.init.normal_(p, std=0.02)
    dcn_dtypes = set()
    for dcn in dcns:
        dcn.register_forward_hook(lambda _m, _i, out: dcn_dtypes.add(out.dtype))
    images = torch.rand(2, 3, 80, 112)
    with torch.no_grad():
        fp32 = model(images)
        dcn_dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images)
    assert bf16.dtype == torch.bfloat16 and dcn_dtypes == {torch.bfloat16}  # ran inside autocast, no raise
    relative = ((bf16.float() - fp32).norm() / fp32.norm()).item()
    print(f"\nHP logits, CPU bf16 autocast vs fp32: relative difference {relative:.4f}")
    assert relative < 0.05


@pytest.mark.parametrize("adapter", ["hp", "lw"])
def test_a_whole_bf16_model_runs_forward(adapter):
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=adapter).eval()
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        fp32 = model(images)
        bf16 = copy.deepcopy(model).bfloat16()(images.bfloat16())
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert ((bf16.float() - fp32).norm() / fp32.norm()).item() < 0.1


def test_prediction_precision_choices():
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw")
    assert Predictor(model, device="cpu").autocast_dtype is None  # default on the CPU: fp32, as before
    assert Predictor(model, device="cpu", precision="bf16-mixed").autocast_dtype is torch.bfloat16
    _, probabilities = Predictor(model, device="cpu", precision="bf16-mixed").predict_2d(torch.rand(1, 3, 40, 50), return_probabilities=True)
    assert probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(1), np.ones((1, 40, 50)), atol=1e-5)
    with pytest.raises(ConfigError, match="precision='bf16': choose one of auto, 32, bf16-mixed, 16-mixed"):
        Predictor(model, device="cpu", precision="bf16")
    # The capability probe is real autocast: torch turns CPU autocast off (with a warning) for float64.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe itself must not leak torch's warning
        assert _autocast_works(torch.device("cpu"), torch.bfloat16)
        assert not _autocast_works(torch.device("cpu"), torch.float64)


def test_predict_cli_refuses_an_unknown_precision(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["predict", str(tmp_path), str(tmp_path), str(tmp_path / "out"), "--precision", "fp8"])
    assert stopped.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
