"""The LightningModule: loss, optimiser and schedule, and validation by hard mIoU over whole cases."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from biosam2.data.cases import Case
from biosam2.data.dataset_format import IGNORE_INDEX
from biosam2.errors import CheckpointError, TrainingDiverged
from biosam2.evaluation.metrics import iou_from_confusion
from biosam2.inference.predictor import Predictor
from biosam2.model.artifact import non_finite
from biosam2.model.segmenter import BioSAM2
from biosam2.training.config import TrainConfig


class SegmentationLoss(nn.Module):
    """Cross-entropy (the paper's), optionally plus soft Dice (MONAI), over annotated pixels only.

    Pixels labelled IGNORE_INDEX (the dataset's ignore label, padding, rotation corners) add nothing
    to either term; a batch without any annotated pixel has loss 0.
    """

    def __init__(self, kind: str):
        super().__init__()
        # summed, then divided by the annotated-pixel count below: PyTorch's mean is 0/0 = NaN without any
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        # MONAI masks the ignored pixels out of both softmax and target; an empty class scores
        # 1 - smooth/smooth = 0, so an all-ignored crop gives 0 here too
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, ignore_index=IGNORE_INDEX) if kind == "dice_ce" else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Under bf16/fp16 autocast the logits are half precision and neither CE (not on CPU autocast's
        # float32 list) nor MONAI's soft Dice casts them: their softmax and sums over pixels need float32.
        logits = logits.float()
        annotated = (target != IGNORE_INDEX).sum().clamp(min=1)
        loss = self.cross_entropy(logits, target) / annotated
        if self.dice is not None:
            loss = loss + self.dice(logits, target[:, None])
        return loss


class SegmentationModule(L.LightningModule):
    def __init__(self, model: BioSAM2, config: TrainConfig, class_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.config = config
        self.class_names = list(class_names)
        self.loss = SegmentationLoss(config.loss)
        # Hard confusion matrix over every pixel of every validation case: the paper's mIoU. With several
        # processes, compute() sums the matrices of all of them first (each validates its own shard).
        self.val_confusion = MulticlassConfusionMatrix(num_classes=model.num_classes, ignore_index=IGNORE_INDEX)
        # Checkpoints hold only what is trained; the frozen SAM2 comes from the base weights.
        self.strict_loading = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, labels = batch
        # crops are cut from images already resized to input_size (SliceDataset's resize_to): not squashed again
        loss = self.loss(self.model(images, already_resized=self.config.input_mode == "crop"), labels)
        self._last_loss = loss.detach()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop at the first non-finite gradient, before the step could write NaN into the weights.

        Gradients are checked rather than the loss because DDP has averaged them already: every process
        sees the same values and stops together. fp16's gradient scaler skips such steps by design.
        """
        if self.trainer.precision == "16-mixed":
            return
        gradients = {name: p.grad for name, p in self.model.named_parameters() if p.grad is not None}
        if not gradients or torch.stack([torch.isfinite(g).all() for g in gradients.values()]).all():
            return  # one device sync per step; names are looked up only when something is wrong
        bad = non_finite(gradients)
        raise TrainingDiverged(
            f"training diverged at epoch {self.current_epoch}, step {self.global_step}: loss {float(self._last_loss):.4g}, "
            f"{len(bad)} gradient(s) with NaN/Inf ({', '.join(bad[:2])}); the step was not applied. "
            f"Lower the learning rate (--lr, now {self.config.lr:g})"
        )

    def validation_step(self, batch: list[Case], batch_index: int) -> None:
        predictor = Predictor(self.model, batch_size=self.config.batch_size, device=self.device, precision="32")
        for case in batch:
            labels, _ = predictor.predict(case.image)
            self.val_confusion.update(
                torch.from_numpy(labels.astype(np.int64)).flatten().to(self.device),
                torch.from_numpy(case.label).flatten().to(self.device),
            )
        self.model.train(self.training)  # the predictor switched to eval mode

    def on_validation_epoch_end(self) -> None:
        iou = iou_from_confusion(self.val_confusion.compute())
        self.val_confusion.reset()
        self.log("val/mIoU", torch.nanmean(iou).float(), prog_bar=True, sync_dist=True)
        for name, value in zip(self.class_names, iou, strict=True):
            self.log(f"val/IoU_{name}", value.float(), sync_dist=True)

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # Small checkpoints: only trained tensors, plus the base fingerprint to catch a wrong base on resume.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trained_tensors = self.model.trained_state_dict()
        bad = non_finite(trained_tensors)
        if bad:  # never a NaN best.ckpt or last.ckpt (e.g. BatchNorm statistics of non-finite activations)
            raise TrainingDiverged(f"training diverged by epoch {self.current_epoch}: {len(bad)} trained tensor(s) hold NaN/Inf ({', '.join(bad[:2])}); lower the learning rate (--lr)")
        trained = {f"model.{name}" for name in trained_tensors}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained or not k.startswith("model.")}
        checkpoint["biosam2_base_fingerprint"] = self.model.base_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint(checkpoint, self.model, "the checkpoint")


def check_checkpoint(checkpoint: dict, model: BioSAM2, source: str) -> None:
    """A training checkpoint must hold exactly ``model``'s trained tensors, trained on the same base SAM2.

    SAM2 buffers that checkpoints from before the by-name bookkeeping may carry are dropped from
    ``checkpoint`` (in place), and the recorded fingerprint is compared without them.
    """
    state = checkpoint.get("state_dict", {})
    stored = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    legacy = model.check_trained_tensors(stored, source)
    for name in legacy:
        del state[f"model.{name}"]
    recorded = checkpoint.get("biosam2_base_fingerprint")
    if recorded is not None and recorded != model.base_fingerprint(leave_out=legacy):
        raise CheckpointError(
            f"{source}: trained on other base SAM2 weights than the ones loaded now; resume with the same --weights"
        )
