"""The data side of a run: augmented training slices and whole validation cases, per process."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from biosam2.data.cases import Case
from biosam2.data.training_data import CaseDataset, EpochSeededSampler, ShardSampler, SliceDataset, collate_cases
from biosam2.training.config import TrainConfig


class SegmentationData(L.LightningDataModule):
    """Builds the loaders once the trainer knows how many processes share the work (multi-GPU)."""

    def __init__(self, train_cases: Sequence[Case], val_cases: Sequence[Case], config: TrainConfig):
        super().__init__()
        self.config = config
        self.train_set = SliceDataset(
            train_cases, config.patch_size, config.input_mode, config.augment, seed=config.seed, resize_to=config.input_size,
            foreground_share=config.foreground_share,
        )
        self.val_set = CaseDataset(val_cases)

    def _replicas(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._replicas()
        sampler = EpochSeededSampler(len(self.train_set), self.config.seed, num_replicas=replicas, rank=rank)
        workers = self.config.num_workers
        return DataLoader(
            self.train_set,
            batch_size=self.config.batch_size,
            sampler=sampler,
            drop_last=len(sampler) > self.config.batch_size,  # no 1-sample batches for the LW adapters' BatchNorm
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        replicas, rank = self._replicas()
        return DataLoader(self.val_set, batch_size=1, sampler=ShardSampler(len(self.val_set), replicas, rank), collate_fn=collate_cases)
